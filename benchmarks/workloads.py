"""Workloads: a small Qwen3 causal LM trained with a REINFORCE-style loss.

One *optimizer step* of a workload is ``microbatches`` forward/backward passes. Each
microbatch holds ``seqs`` sequences (``k``, the number of directions PROMA projects out per
microbatch) of ``seq_len`` tokens. Tokens are random ids standing in for sampled completions;
every sequence gets a random advantage. The loss is the negative advantage-weighted token
log-probability of the sampled tokens, averaged over all tokens of the step (token-mean).

Packed workloads put ``seqs_per_row`` sequences side by side in one row, with ``position_ids``
restarting at 0 for every sequence, ``attention_mask=None`` and ``use_cache=False`` (the
combination under which Hugging Face models keep packed sequences apart), and per-token
sequence ids of shape ``(rows, row_len)``.

Everything runs in fp32, with the model in ``eval()`` mode (no dropout) and grad enabled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the Qwen3 model (``Qwen3ForCausalLM``, tied embeddings), built offline."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 16384

    def build(self, seed: int = 0) -> nn.Module:
        """Build the model with seeded random weights, in eval mode (no dropout)."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(**asdict(self), tie_word_embeddings=True)
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
        model.eval()
        return model

    def as_dict(self) -> dict:
        return {"class": "Qwen3ForCausalLM", "tie_word_embeddings": True, **asdict(self)}


TINY_MODEL = ModelSpec(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)


@dataclass
class Microbatch:
    """Inputs of one microbatch.

    ``seq_ids`` is what a PROMA accumulator is given: shape ``(rows,)`` (one sequence per row)
    or ``(rows, row_len)`` (packed rows). ``token_seq`` always has one sequence id per token.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    seq_ids: torch.Tensor
    token_seq: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor


@dataclass(frozen=True)
class Workload:
    """One benchmark workload: model shape, microbatch shape and number of microbatches."""

    name: str
    description: str
    seq_len: int
    seqs: int
    microbatches: int = 4
    seqs_per_row: int = 1
    rounds: int = 3
    model: ModelSpec = field(default_factory=ModelSpec)
    #: variants run by default (None: all); ``--variants`` overrides it
    variants: tuple[str, ...] | None = None

    @property
    def packed(self) -> bool:
        return self.seqs_per_row > 1

    @property
    def rows(self) -> int:
        return self.seqs // self.seqs_per_row

    @property
    def row_len(self) -> int:
        return self.seq_len * self.seqs_per_row

    @property
    def tokens_per_step(self) -> int:
        return self.microbatches * self.seqs * self.seq_len

    def with_(self, **changes) -> Workload:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data.update(changes)
        return Workload(**data)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "seq_len": self.seq_len,
            "seqs_per_microbatch": self.seqs,
            "microbatches": self.microbatches,
            "rows_per_microbatch": self.rows,
            "seqs_per_row": self.seqs_per_row,
            "packed": self.packed,
            "tokens_per_step": self.tokens_per_step,
            "model": self.model.as_dict(),
        }

    def make_batches(self, seed: int = 0, microbatches: int | None = None) -> list[Microbatch]:
        """Deterministic random microbatches for one optimizer step."""
        n = self.microbatches if microbatches is None else microbatches
        return [self._microbatch(seed * 1000 + i) for i in range(n)]

    def _microbatch(self, seed: int) -> Microbatch:
        gen = torch.Generator().manual_seed(seed)
        rows, row_len, per_row = self.rows, self.row_len, self.seqs_per_row
        input_ids = torch.randint(0, self.model.vocab_size, (rows, row_len), generator=gen)
        advantages = torch.randn(self.seqs, generator=gen)
        pos_in_row = torch.arange(row_len)
        token_seq = torch.arange(rows).unsqueeze(1) * per_row + (
            pos_in_row // self.seq_len
        ).unsqueeze(0)
        targets = torch.full_like(input_ids, IGNORE)
        targets[:, :-1] = input_ids[:, 1:]
        # The last token of a sequence predicts nothing (in packed rows: not the next sequence).
        targets[:, :-1][token_seq[:, :-1] != token_seq[:, 1:]] = IGNORE
        if self.packed:
            position_ids = (pos_in_row % self.seq_len).unsqueeze(0).expand(rows, row_len)
            seq_ids = token_seq.clone()
        else:
            position_ids = None
            seq_ids = torch.arange(rows)
        return Microbatch(
            input_ids=input_ids,
            position_ids=position_ids,
            seq_ids=seq_ids,
            token_seq=token_seq,
            targets=targets,
            advantages=advantages,
        )


def tokens_in_loss(batches: list[Microbatch]) -> int:
    """Number of tokens with a target over the whole step (the token-mean denominator)."""
    return int(sum((mb.targets != IGNORE).sum().item() for mb in batches))


def reinforce_loss(model: nn.Module, mb: Microbatch, n_tokens: int) -> torch.Tensor:
    """Advantage-weighted negative log-probability of the sampled tokens, token-mean.

    ``n_tokens`` is the number of target tokens of the whole optimizer step, so that the
    microbatch losses add up to the step's token-mean loss.
    """
    out = model(
        input_ids=mb.input_ids,
        position_ids=mb.position_ids,
        attention_mask=None,
        use_cache=False,
    )
    logits = out.logits
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        mb.targets.reshape(-1),
        reduction="none",
        ignore_index=IGNORE,
    )
    weights = mb.advantages[mb.token_seq].reshape(-1)
    return (weights * nll).sum() / n_tokens


#: Variants of the long-sequence and k=32 sweep points (the two baselines are measured on the
#: default, T64 and packed workloads).
SWEEP_VARIANTS = ("plain", "proma-exact", "proma-gs2")


def standard_workloads() -> dict[str, Workload]:
    """The full suite: the default workload, a sequence-length sweep, k=32 and packed rows.

    Every workload is 4 microbatches per step. To keep the suite within about a quarter of
    an hour on two quiet CPU cores, the large sweep points (8192 or more tokens per
    microbatch) run fewer rounds and only plain and the two PROMA projections.
    """
    default = Workload(
        name="default",
        description="4 microbatches x 8 sequences x 256 tokens",
        seq_len=256,
        seqs=8,
        rounds=5,
    )
    return {
        "default": default,
        "T64": default.with_(
            name="T64",
            description="4 microbatches x 8 sequences x 64 tokens",
            seq_len=64,
        ),
        "T1024": default.with_(
            name="T1024",
            description="4 microbatches x 8 sequences x 1024 tokens",
            seq_len=1024,
            rounds=1,
            variants=SWEEP_VARIANTS,
        ),
        "T2048": default.with_(
            name="T2048",
            description="4 microbatches x 8 sequences x 2048 tokens",
            seq_len=2048,
            rounds=1,
            variants=SWEEP_VARIANTS,
        ),
        "k32": default.with_(
            name="k32",
            description="4 microbatches x 32 sequences x 256 tokens",
            seqs=32,
            rounds=1,
            variants=SWEEP_VARIANTS,
        ),
        "packed": default.with_(
            name="packed",
            description="4 microbatches x 2 rows x (4 packed sequences x 256 tokens)",
            seqs_per_row=4,
            rounds=3,  # an odd count: the median is one round, not the mean of two
        ),
    }


def quick_workloads() -> dict[str, Workload]:
    """Tiny versions of the default and packed workloads (seconds; for smoke tests)."""
    base = Workload(
        name="default",
        description="tiny model; 2 microbatches x 4 sequences x 32 tokens",
        seq_len=32,
        seqs=4,
        microbatches=2,
        rounds=1,
        model=TINY_MODEL,
    )
    return {
        "default": base,
        "packed": base.with_(
            name="packed",
            description="tiny model; 2 microbatches x 2 rows x (2 packed sequences x 32 tokens)",
            seqs_per_row=2,
        ),
    }


class LayerKindModel(nn.Module):
    """Embedding → one layer of ``kind`` → tanh → LM head (tied to the embedding with ``tied``):
    the smallest model that exercises one layer kind, for the correctness checks.

    ``kind``: ``"linear"``, ``"layer_norm"``, ``"rms_norm"``, ``"hf_rms_norm"`` (Qwen3's) or
    ``"conv1d"`` (transformers' GPT-2 layer).
    """

    def __init__(self, kind: str, vocab: int, d: int, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        if kind == "linear":
            self.mid: nn.Module = nn.Linear(d, d)
        elif kind == "layer_norm":
            self.mid = nn.LayerNorm(d)
        elif kind == "rms_norm":
            self.mid = nn.RMSNorm(d, eps=1e-6)
        elif kind == "hf_rms_norm":
            from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

            self.mid = Qwen3RMSNorm(d)
        elif kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.mid = Conv1D(d, d)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
        with torch.no_grad():  # non-trivial parameters (a norm's weight starts at ones)
            for p in self.mid.parameters():
                p.add_(0.3 * torch.randn_like(p))
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))
