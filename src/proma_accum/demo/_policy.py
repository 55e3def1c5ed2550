"""The policy: a tiny Qwen3 causal LM built from a config, sampling, and a warm start.

Shapes: ``N`` sequences, ``P`` prompt tokens, ``L`` response tokens, ``V`` vocabulary size.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from ._task import AdditionTask


def build_policy(
    vocab_size: int, *, seed: int, hidden_size: int = 64, layers: int = 2
) -> nn.Module:
    """A randomly initialised ``Qwen3ForCausalLM`` with tied embeddings (as in Qwen-3 0.6B).

    Dropout is zero in this architecture and the model is returned in eval mode.
    """
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def response_logits(
    policy: nn.Module, prompts: torch.Tensor, responses: torch.Tensor
) -> torch.Tensor:
    """Next-token logits at the response positions.

    prompts (N, P), responses (N, L) -> logits (N, L, V) in float32, where ``logits[:, t]``
    is the distribution of ``responses[:, t]`` given the prompt and ``responses[:, :t]``.
    Tokens after ``<eos>`` are padding; they sit after the tokens that matter, so causal
    attention keeps them from influencing any scored position and no attention mask is needed.
    """
    ids = torch.cat([prompts, responses], dim=1)
    logits = policy(input_ids=ids, use_cache=False).logits
    p = prompts.shape[1]
    return logits[:, p - 1 : -1].float()


@torch.no_grad()
def sample_responses(
    policy: nn.Module,
    prompts: torch.Tensor,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (temperature 1) or greedily decode responses.

    prompts (N, P) -> ``(responses, mask)``, both (N, max_len): tokens after the first
    ``<eos>`` are ``pad_id`` and have mask 0; the ``<eos>`` itself has mask 1.
    """
    n = prompts.shape[0]
    ids = prompts
    done = torch.zeros(n, dtype=torch.bool)
    out, mask = [], []
    for _ in range(max_len):
        logits = policy(input_ids=ids, use_cache=False).logits[:, -1].float()  # (N, V)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        mask.append((~done).float())
        out.append(nxt)
        done = done | (nxt == eos_id)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return torch.stack(out, 1), torch.stack(mask, 1)


def warm_start(
    policy: nn.Module,
    task: AdditionTask,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    generator: torch.Generator,
) -> list[float]:
    """Short supervised warm start on correct answers (teacher forcing, response tokens only).

    Deliberately short: the resulting policy knows the answer format and succeeds on part of
    the prompts, so RL has room to improve and the policy keeps real entropy.
    Returns the per-step cross-entropy.
    """
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        pairs = task.sample_pairs(batch_size, generator)
        prompts = task.encode_prompts(pairs)
        answers, mask = task.encode_answers(pairs)
        logits = response_logits(policy, prompts, answers)  # (B, L, V)
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), answers, reduction="none"
        )  # (B, L)
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    return losses
