"""Sequence-wise gradients of one parameter tensor, formed from its layers' hooked data.

A tensor may be used by several layers (tied weights) and a layer may run several times in a
microbatch; every use with a gradient contributes. The per-sequence gradients
``S: (k + 1, rows, ...)`` are formed chunk by chunk over the tensor's rows, each chunk at most
``chunk_bytes``, and freed as soon as it is used. When one chunk holds everything it is kept
between the two passes (``gram_and_inner`` then ``combine``); otherwise it is formed again.

Before anything is projected, ``Σ_i S_i`` (padding included) is compared with the gradient
autograd computed for the tensor: a mismatch means part of the gradient came from outside the
hooked layers (a fused LM head, a penalty on the weights) and raises instead of silently using
incomplete per-sequence data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._kernels import Kernel
from ._layout import TokenSegments

_GRAM_BLOCK_BYTES = 8 * 2**20


def _weighted_sum(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i s_i`` for ``s: (k, ...)``, accumulated in float64 block by block.

    The projection coefficients of nearly dependent sequence gradients are large and of mixed
    sign; summing in float32 would cancel catastrophically (error ~ cond · eps32).
    """
    flat = s.reshape(s.shape[0], -1)
    out = torch.empty(flat.shape[1], dtype=s.dtype, device=s.device)
    cols = max(1, _GRAM_BLOCK_BYTES // (8 * max(s.shape[0], 1)))
    for a in range(0, flat.shape[1], cols):
        out[a : a + cols] = (w @ flat[:, a : a + cols].double()).to(s.dtype)
    return out.view(s.shape[1:])


class IncompleteSequenceDataError(RuntimeError):
    """A covered tensor's gradient is not the sum of the per-sequence parts its layers saw."""


@dataclass
class Use:
    """One forward of a hooked layer whose output received a gradient."""

    kernel: Kernel
    module: nn.Module
    role: str
    x: torch.Tensor
    grad_out: torch.Tensor
    seg: TokenSegments


@dataclass
class ByteMeter:
    """Live and peak bytes of per-sequence gradient chunks."""

    live: int = 0
    peak: int = 0

    def add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)


class TensorSequenceGradients:
    """The ``k`` sequence-wise gradients of ``param`` (implements ``SequenceGradients``)."""

    def __init__(
        self,
        name: str,
        param: torch.Tensor,
        uses: list[Use],
        num_sequences: int,
        autograd_grad: torch.Tensor,
        chunk_bytes: int,
        meter: ByteMeter,
        check_rtol: float,
    ) -> None:
        self.name = name
        self.param = param
        self.uses = uses
        self.num_sequences = num_sequences
        self.autograd_grad = autograd_grad
        self.meter = meter
        self.check_rtol = check_rtol
        self.dtype = torch.promote_types(param.dtype, torch.float32)
        touched = [u.kernel.touched_rows(u.module, u.role, u.x) for u in uses]
        if all(t is not None for t in touched):
            self.rows: torch.Tensor | None = torch.unique(torch.cat(touched))  # type: ignore[arg-type]
            n_rows = self.rows.numel()
        else:
            self.rows = None
            n_rows = param.shape[0] if param.dim() else 1
        row_numel = param[0].numel() if param.dim() > 1 else 1
        row_bytes = (num_sequences + 1) * row_numel * self.dtype.itemsize
        per_chunk = max(1, chunk_bytes // max(row_bytes, 1))
        starts = range(0, n_rows, per_chunk)
        self.chunks = [self._chunk(a, min(a + per_chunk, n_rows)) for a in starts]
        self._kept: torch.Tensor | None = None

    def _chunk(self, start: int, stop: int) -> slice | torch.Tensor:
        return slice(start, stop) if self.rows is None else self.rows[start:stop]

    def _form(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """``(k + 1, len(rows), ...)``: every use's per-sequence gradient of these rows, summed."""
        total = None
        for u in self.uses:
            part = u.kernel.seq_grads(u.module, u.role, u.x, u.grad_out, u.seg, rows, self.dtype)
            total = part if total is None else total.add_(part)
        assert total is not None
        self.meter.add(total.numel() * total.element_size())
        return total

    def _release(self, s: torch.Tensor) -> None:
        self.meter.add(-s.numel() * s.element_size())

    def gram_and_inner(self, acc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.num_sequences
        device = self.param.device
        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        inner = torch.zeros(k, dtype=torch.float64, device=device)
        mismatch = torch.zeros((), dtype=torch.float64, device=device)
        covered = torch.zeros((), dtype=torch.float64, device=device)
        grad = self.autograd_grad
        for rows in self.chunks:
            s = self._form(rows)
            flat = s.reshape(k + 1, -1)
            g_rows = grad[rows].reshape(-1).to(self.dtype)
            mismatch += torch.linalg.vector_norm(flat.sum(0) - g_rows, dtype=torch.float64) ** 2
            covered += torch.linalg.vector_norm(g_rows, dtype=torch.float64) ** 2
            acc_rows = None if acc is None else acc[rows].reshape(-1)
            cols = max(1, _GRAM_BLOCK_BYTES // (8 * max(k, 1)))
            for a in range(0, flat.shape[1], cols):
                block = flat[:k, a : a + cols].double()
                gram += block @ block.T
                if acc_rows is not None:
                    inner += block @ acc_rows[a : a + cols].double()
            if len(self.chunks) == 1:
                self._kept = s
            else:
                self._release(s)
        self._check(mismatch, covered)
        return gram, inner

    def _check(self, mismatch: torch.Tensor, covered: torch.Tensor) -> None:
        total = torch.linalg.vector_norm(self.autograd_grad, dtype=torch.float64) ** 2
        # Rows no sequence touched must have no gradient either.
        mismatch = mismatch + (total - covered).clamp(min=0)
        if bool(mismatch.sqrt() > self.check_rtol * total.sqrt() + 1e-30):
            layers = sorted({type(u.module).__name__ for u in self.uses})
            raise IncompleteSequenceDataError(
                f"parameter '{self.name}': its gradient is not the sum of the per-sequence "
                f"gradients its hooked layers ({', '.join(layers)}) saw (relative mismatch "
                f"{float(mismatch.sqrt() / total.sqrt().clamp(min=1e-300)):.3g}). Part of the "
                "gradient comes from outside those layers' forward, e.g. a fused LM head that "
                "uses the weight directly, or a penalty term on the weight. Call the layer "
                "module itself, or exclude the parameter with exclude=[...]."
            )

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        k = self.num_sequences
        w = weights.to(torch.float64)
        out = torch.empty(self.param.shape, dtype=self.dtype, device=self.param.device)
        if self.rows is not None or len(self.chunks) > 1:
            out.zero_()
        for rows in self.chunks:
            s = self._kept if self._kept is not None else self._form(rows)
            self._kept = None
            out[rows] = _weighted_sum(w, s[:k])
            self._release(s)
        return out

    def release(self) -> None:
        """Free a chunk kept for ``combine`` that was not needed."""
        if self._kept is not None:
            self._release(self._kept)
            self._kept = None
