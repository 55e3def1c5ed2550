"""Shared test models and microbatch builders.

A microbatch is a dict with ``input_ids (B, T)``, ``targets (B, T)`` (``-100`` = no loss),
``seq_ids`` (``(B,)`` or ``(B, T)``) and, for HF models, ``position_ids``. Each sequence's loss
term is the sum of its tokens' cross-entropies; the microbatch loss is their sum.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch.set_num_threads(2)


class ToyLM(nn.Module):
    """Every covered layer kind, token-wise (no attention): embedding → linear → norms → head."""

    def __init__(self, vocab: int = 23, d: int = 6, tied: bool = False, conv1d: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.conv = None
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.conv = Conv1D(d, d)
            nn.init.normal_(self.conv.weight, std=0.3)
            nn.init.normal_(self.conv.bias, std=0.1)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        with torch.no_grad():  # non-trivial affine parameters
            for norm in (self.ln, self.rms):
                norm.weight.add_(0.3 * torch.randn_like(norm.weight))
            self.ln.bias.add_(0.1 * torch.randn_like(self.ln.bias))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(input_ids)))
        h = self.rms(self.ln(h))
        if self.conv is not None:
            h = h + torch.tanh(self.conv(h))
        return self.head(h)


def toy_token_losses(model: nn.Module, mb: dict) -> torch.Tensor:
    logits = model(mb["input_ids"])
    return nn.functional.cross_entropy(
        logits.transpose(1, 2), mb["targets"], ignore_index=-100, reduction="none"
    )


def hf_token_losses(model: nn.Module, mb: dict) -> torch.Tensor:
    kwargs = {"use_cache": False}
    if "position_ids" in mb:
        kwargs["position_ids"] = mb["position_ids"]
    logits = model(input_ids=mb["input_ids"], **kwargs).logits
    return nn.functional.cross_entropy(
        logits.transpose(1, 2), mb["targets"], ignore_index=-100, reduction="none"
    )


def ids_in_order(seq_ids: torch.Tensor) -> torch.Tensor:
    """The distinct ids of ``seq_ids`` in order of first appearance (the accumulator's order)."""
    seen: dict[int, None] = {}
    for i in seq_ids.reshape(-1).tolist():
        if i >= 0:
            seen.setdefault(i, None)
    return torch.tensor(list(seen), dtype=torch.long)


def sequence_losses_from_tokens(token_losses: torch.Tensor, mb: dict) -> torch.Tensor:
    """``(k,)`` per-sequence sums of token losses, in order of first appearance."""
    seq_ids = mb["seq_ids"]
    if seq_ids.dim() == 1:
        seq_ids = seq_ids[:, None].expand_as(token_losses)
    valid = (seq_ids >= 0) & (mb["targets"] != -100)
    ids = ids_in_order(mb["seq_ids"])
    dense = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    dense[ids] = torch.arange(ids.numel())
    out = token_losses.new_zeros(ids.numel())
    return out.index_add(0, dense[seq_ids.clamp(min=0)][valid], token_losses[valid])


def make_loss_fn(token_loss_fn):
    def sequence_losses(model, mb):
        return sequence_losses_from_tokens(token_loss_fn(model, mb), mb)

    return sequence_losses


toy_sequence_losses = make_loss_fn(toy_token_losses)
hf_sequence_losses = make_loss_fn(hf_token_losses)


def row_microbatches(
    gen: torch.Generator,
    n_mb: int,
    rows: int,
    length: int,
    vocab: int,
    *,
    revisit: bool = True,
    pad: bool = True,
    id_offset: int = 0,
) -> list[dict]:
    """One sequence per row, right-padded; later microbatches revisit earlier sequences."""
    pool = torch.randint(0, vocab, (n_mb * rows, length + 1), generator=gen)
    out = []
    for m in range(n_mb):
        idx = torch.arange(m * rows, (m + 1) * rows)
        if revisit and m > 0:  # half the rows repeat sequences of the previous microbatch
            idx[: rows // 2] = idx[: rows // 2] - rows
        seqs = pool[idx]
        input_ids, targets = seqs[:, :-1].clone(), seqs[:, 1:].clone()
        if pad:
            lengths = torch.randint(max(1, length // 2), length + 1, (rows,), generator=gen)
            mask = torch.arange(length)[None, :] >= lengths[:, None]
            targets[mask] = -100
        seq_ids = torch.randperm(rows, generator=gen) * 3 + id_offset  # arbitrary labels
        out.append({"input_ids": input_ids, "targets": targets, "seq_ids": seq_ids})
    return out


def packed_microbatches(
    gen: torch.Generator, n_mb: int, rows: int, per_row: int, seg_len: int, vocab: int
) -> list[dict]:
    """Several sequences per row, position ids restarting at 0, one trailing pad token."""
    out = []
    prev = None
    for _m in range(n_mb):
        seqs = torch.randint(0, vocab, (rows * per_row, seg_len + 1), generator=gen)
        if prev is not None:
            seqs[: rows * per_row // 2] = prev[: rows * per_row // 2]
        prev = seqs
        length = per_row * seg_len + 1
        input_ids = torch.zeros(rows, length, dtype=torch.long)
        targets = torch.full((rows, length), -100)
        seq_ids = torch.full((rows, length), -1)
        position_ids = torch.zeros(rows, length, dtype=torch.long)
        for r in range(rows):
            for j in range(per_row):
                s = r * per_row + j
                sl = slice(j * seg_len, (j + 1) * seg_len)
                input_ids[r, sl] = seqs[s, :-1]
                targets[r, sl] = seqs[s, 1:]
                seq_ids[r, sl] = 7 * s + 2
                position_ids[r, sl] = torch.arange(seg_len)
        position_ids[:, -1] = 0
        out.append(
            {
                "input_ids": input_ids,
                "targets": targets,
                "seq_ids": seq_ids,
                "position_ids": position_ids,
            }
        )
    return out


def run_accumulator(model, microbatches, loss_fn, advantages=None, **kwargs):
    """Run microbatches through a fresh accumulator (grads start at None); return it."""
    from proma_accum import ProjectedAccumulator

    model.zero_grad(set_to_none=True)
    acc = ProjectedAccumulator(model, **kwargs)
    with acc:
        for m, mb in enumerate(microbatches):
            adv = None if advantages is None else advantages[m]
            with acc.microbatch(mb["seq_ids"], advantages=adv):
                loss_fn(model, mb).sum().backward()
    return acc


def tiny_qwen3(tied: bool = False, layers: int = 2, vocab: int = 61):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=tied,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    _perturb_norms(model)
    return model


def tiny_llama(vocab: int = 61):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    _perturb_norms(model)
    return model


def tiny_gpt2(vocab: int = 61):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    _perturb_norms(model)
    return model


def _perturb_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
