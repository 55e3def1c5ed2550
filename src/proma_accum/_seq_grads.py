"""Sequence-wise gradients of one parameter tensor, formed from its layers' hooked data.

A tensor may be used by several layers (tied weights) and a layer may run several times in a
microbatch; every use with a gradient contributes. The per-sequence gradients
``S: (k + 1, rows, ...)`` are formed chunk by chunk over the tensor's rows, each chunk at most
``chunk_bytes``, and freed as soon as it is used. When one chunk holds everything it is kept
between the two passes (``gram_and_inner`` then ``combine``); otherwise it is formed again.

Before anything is projected, ``Σ_i S_i`` (padding included) is compared with the gradient
autograd computed for the tensor: a mismatch means part of the gradient came from outside the
hooked layers (a fused LM head, a penalty on the weights) and raises instead of silently using
incomplete per-sequence data. Uses whose weight gradient autograd received from the fused
backward (``Use.returned``, the sum of their per-sequence gradients) are subtracted from that
gradient instead of being summed again, so a tied LM head's per-sequence gradients are not read
for the check: the rest is compared with the other uses' gradient (an embedding's, on the rows
its ids touch), formed without the per-sequence split (``Kernel.grad_sum``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._kernels import Kernel
from ._layout import TokenSegments
from ._memory import BufferPool
from ._proma import normalized_gram, sq_norm

_GRAM_BLOCK_BYTES = 8 * 2**20
_CHECK_BLOCK_BYTES = 2**20
_FP32_MAX_CANCELLATION = 64.0
_FP32_GRAM_MAX_CONDITION = 100.0


def _weighted_sum(w: torch.Tensor, s: torch.Tensor, exact: bool) -> torch.Tensor:
    """``Σ_i w_i s_i`` for ``s: (k, ...)``; with ``exact``, accumulated in float64 blocks.

    The projection coefficients of nearly dependent sequence gradients are large and of mixed
    sign; summing those in float32 cancels catastrophically (error ~ κ · eps32).
    """
    flat = s.reshape(s.shape[0], -1)
    if not exact:
        return (w.to(s.dtype) @ flat).view(s.shape[1:])
    out = torch.empty(flat.shape[1], dtype=s.dtype, device=s.device)
    cols = max(1, _GRAM_BLOCK_BYTES // (8 * max(s.shape[0], 1)))
    for a in range(0, flat.shape[1], cols):
        out[a : a + cols] = (w @ flat[:, a : a + cols].double()).to(s.dtype)
    return out.view(s.shape[1:])


def _add_weighted_sum(out: torch.Tensor, w: torch.Tensor, s: torch.Tensor, exact: bool) -> None:
    """``out += Σ_i w_i s_i`` in place, for a contiguous ``out`` shaped like ``s[0]``."""
    flat = s.reshape(s.shape[0], -1)
    target = out.view(-1)
    if not exact:
        target.addmv_(flat.T, w.to(s.dtype))
        return
    cols = max(1, _GRAM_BLOCK_BYTES // (8 * max(s.shape[0], 1)))
    for a in range(0, flat.shape[1], cols):
        target[a : a + cols] += (w @ flat[:, a : a + cols].double()).to(s.dtype)


def _sum_parts(
    parts: list[torch.Tensor], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The float64 sum of partial results of this shape (zero when there are none)."""
    if not parts:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    if len(parts) == 1:
        return parts[0].double()
    return torch.stack(parts).double().sum(0)


def _untouched(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` (along dim 0) not listed in ``rows``."""
    keep = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    keep[rows] = False
    return t[keep]


class IncompleteSequenceDataError(RuntimeError):
    """A covered tensor's gradient is not the sum of the per-sequence parts its layers saw."""


@dataclass
class Use:
    """One forward of a hooked layer whose output received a gradient.

    Either ``x`` and ``grad_out`` (the kernel forms the sequence gradients on demand) or
    ``precomputed``: ``(k + 1, *param.shape)`` sequence gradients formed during the backward,
    with ``returned`` their sum as handed to autograd.
    """

    kernel: Kernel
    module: nn.Module
    role: str
    seg: TokenSegments
    x: torch.Tensor | None = None
    grad_out: torch.Tensor | None = None
    precomputed: torch.Tensor | None = None
    returned: torch.Tensor | None = None


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
        check_rtol: float | None,
        pool: BufferPool | None = None,
    ) -> None:
        self.name = name
        self.param = param
        self.uses = uses
        self.num_sequences = num_sequences
        self.autograd_grad = autograd_grad
        self.meter = meter
        self.check_rtol = check_rtol
        self.pool = pool
        self.dtype = torch.promote_types(param.dtype, torch.float32)
        touched = [
            None if u.precomputed is not None else u.kernel.touched_rows(u.module, u.role, u.x)
            for u in uses
        ]
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
        # normalized_gram(G) and torch.linalg.eigh(Ĝ) (None when some g_i is zero) of the G
        # that gram_and_inner returned, for the projection to reuse.
        self.spectrum: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None] | None = (
            None
        )
        self._gram: torch.Tensor | None = None  # G, once gram_and_inner formed it
        # Check by subtracting the fused uses' returned sums (see the module docstring) when
        # every fused use has one and the other uses say which rows they touch.
        fused = [u for u in uses if u.precomputed is not None]
        other_rows = [t for u, t in zip(uses, touched, strict=True) if u.precomputed is None]
        self._check_by_remainder = (
            bool(fused)
            and all(u.returned is not None for u in fused)
            and all(t is not None for t in other_rows)
        )
        # The rows the other uses touch (sorted), for the remainder check.
        self._other_rows: torch.Tensor | None = None
        if self._check_by_remainder:
            self._other_rows = (
                torch.unique(torch.cat(other_rows))  # type: ignore[arg-type]
                if other_rows
                else torch.empty(0, dtype=torch.long, device=param.device)
            )

    def _chunk(self, start: int, stop: int) -> slice | torch.Tensor:
        return slice(start, stop) if self.rows is None else self.rows[start:stop]

    def _form(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """``(k + 1, len(rows), ...)``: every use's per-sequence gradient of these rows, summed.

        Precomputed gradients are used as they are (their rows are a view); the result may
        alias them, which is fine since each is consumed by this tensor alone.
        """
        total = None
        for u in sorted(self.uses, key=lambda u: u.precomputed is None):
            if u.precomputed is not None:
                part = u.precomputed[:, rows]
                if total is None:
                    # Adding other uses into a view of a precomputed tensor is only safe when
                    # each chunk is formed once.
                    total = part if len(self.chunks) == 1 else part.clone()
                else:
                    total.add_(part)
            elif total is None:
                total = u.kernel.seq_grads(
                    u.module, u.role, u.x, u.grad_out, u.seg, rows, self.dtype
                )
                self.meter.add(total.numel() * total.element_size())
            else:
                u.kernel.add_seq_grads(total, u.module, u.role, u.x, u.grad_out, u.seg, rows)
        assert total is not None
        return total

    def _release(self, s: torch.Tensor) -> None:
        if not any(u.precomputed is not None for u in self.uses):
            self.meter.add(-s.numel() * s.element_size())

    def gram_and_inner(self, acc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, r)`` in float64, from one float32 pass over the sequence gradients.

        Each float32 entry ``G_ij`` is accurate to about ``eps32 · ‖g_i‖ ‖g_j‖``, enough when the
        normalised Gram ``Ĝ`` of the nonzero ``g_i`` is well conditioned; when
        ``λ_min(Ĝ) < λ_max(Ĝ) / _FP32_GRAM_MAX_CONDITION`` (nearly dependent or repeated
        sequences) ``G`` and ``r`` are formed again in float64, so the rank decision and the
        projection stay exact. The same pass checks
        ``‖Σ_i S_i − g‖`` (padding row included) against autograd's gradient ``g``, unless
        the tensor has fused uses (then :meth:`_check_remainder` checks it without reading
        their per-sequence gradients).
        """
        check = self.check_rtol is not None
        if check and self._check_by_remainder:
            self._check_remainder()
            check = False
        gram, inner = self._pass(acc, precise=False, check=check)
        normalized = normalized_gram(gram)
        unit_gram, _, nonzero = normalized
        eigh = None
        if bool(nonzero.all()):
            eigh = torch.linalg.eigh(unit_gram)  # the projection needs it too
            eigval = eigh[0]
        else:
            eigval = torch.linalg.eigvalsh(unit_gram[nonzero][:, nonzero])
        self.spectrum = (normalized, eigh)
        if eigval.numel() and bool(eigval[0] * _FP32_GRAM_MAX_CONDITION < eigval[-1]):
            gram, inner = self._pass(acc, precise=True, check=False)
            self.spectrum = None
        self._gram = gram
        return gram, inner

    def _pass(
        self, acc: torch.Tensor | None, precise: bool, check: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.num_sequences
        # Partial results of the blocks, summed in float64 at the end.
        grams: list[torch.Tensor] = []
        inners: list[torch.Tensor] = []
        mismatches: list[torch.Tensor] = []
        covered: list[torch.Tensor] = []
        grad = self.autograd_grad
        for rows in self.chunks:
            s = self._kept if self._kept is not None else self._form(rows)
            self._kept = None
            flat = s.reshape(k + 1, -1)
            g_rows = grad[rows].reshape(-1)
            acc_rows = None if acc is None else acc[rows].reshape(-1)
            # Column blocks that stay in cache: the Gram matrix, the inner products and the
            # sum check read each block once (whole-tensor calls would read S three times).
            item = 8 if precise else flat.element_size()
            cols = max(1, _GRAM_BLOCK_BYTES // (item * (k + 1)))
            for a in range(0, flat.shape[1], cols):
                block = flat[:, a : a + cols]
                if check:
                    g_block = g_rows[a : a + cols].to(block.dtype)
                    residual = block.sum(0)
                    residual -= g_block  # in place: one temporary per block, not two
                    mismatches.append(sq_norm(residual))
                    covered.append(sq_norm(g_block))
                seqs = block[:k].double() if precise else block[:k]
                grams.append(seqs @ seqs.T)
                if acc_rows is not None:
                    inners.append(seqs @ acc_rows[a : a + cols].to(seqs.dtype))
            if len(self.chunks) == 1:
                self._kept = s
            else:
                self._release(s)
        device = self.param.device
        if check:
            mismatch = _sum_parts(mismatches, (), device)
            total = _sum_parts(covered, (), device)
            if self.rows is not None:
                # Rows no sequence touched must have no gradient either (their norm is taken
                # directly: a difference of two large norms would cancel).
                outside = sq_norm(_untouched(self.autograd_grad, self.rows))
                mismatch, total = mismatch + outside, total + outside
            self._check(mismatch, total)
        return _sum_parts(grams, (k, k), device), _sum_parts(inners, (k,), device)

    def _check_remainder(self) -> None:
        """The check with the fused uses' returned sums subtracted from autograd's gradient:
        the remainder must be the sum of the other uses' per-sequence gradients on the rows
        they touch, and zero elsewhere.

        The remainder is formed in row blocks of ``_CHECK_BLOCK_BYTES`` in one reused buffer
        (a temporary of the tensor's size would be mapped afresh and page-fault).
        """
        grad = self.autograd_grad
        fused = [u.returned for u in self.uses if u.returned is not None]
        others = [u for u in self.uses if u.precomputed is None]
        device = grad.device
        rows = self._other_rows
        assert rows is not None
        mismatch = torch.zeros((), dtype=torch.float64, device=device)
        if others:
            # Σ_i S_i of the other uses, formed without the per-sequence split.
            residual = sum(
                u.kernel.grad_sum(u.module, u.role, u.x, u.grad_out, u.seg, rows, self.dtype)
                for u in others
            )
            assert isinstance(residual, torch.Tensor)
            residual -= grad[rows].to(self.dtype)
            for returned in fused:
                residual += returned[rows].to(self.dtype)
            mismatch = sq_norm(residual)
        # Rows no other use touched: autograd's gradient minus the fused sums must be zero.
        n, row_numel = grad.shape[0], grad[0].numel()  # fused uses are Linear-like: dim >= 1
        per_block = max(1, _CHECK_BLOCK_BYTES // (row_numel * self.dtype.itemsize))
        buffer = torch.empty((min(per_block, n), *grad.shape[1:]), dtype=self.dtype, device=device)
        bounds = torch.searchsorted(rows, torch.arange(0, n + per_block, per_block, device=device))
        starts = bounds.tolist()
        for i, a in enumerate(range(0, n, per_block)):
            b = min(a + per_block, n)
            rest = buffer[: b - a]
            rest.copy_(grad[a:b])
            for returned in fused:
                rest -= returned[a:b]
            rest.index_fill_(0, rows[starts[i] : starts[i + 1]] - a, 0)
            mismatch = mismatch + sq_norm(rest)
        self._check(mismatch, sq_norm(grad))

    def _check(self, mismatch: torch.Tensor, total: torch.Tensor) -> None:
        """Raise unless ``sqrt(mismatch) <= check_rtol * sqrt(total)`` (squared norms)."""
        rtol = self.check_rtol or 0.0
        if bool(mismatch.sqrt() > rtol * total.sqrt() + 1e-30):
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
        """``Σ_i w_i g_i``; in float32 unless cancellation would cost accuracy.

        The cancellation factor ``κ = Σ_i |w_i| ‖g_i‖ / ‖Σ_i w_i g_i‖`` (from the Gram matrix)
        bounds the float32 error by ``κ · eps32`` relative; above ``_FP32_MAX_CANCELLATION`` the
        sum is accumulated in float64 (nearly dependent sequence gradients, large coefficients).
        """
        out = torch.empty(self.param.shape, dtype=self.dtype, device=self.param.device)
        if self.rows is not None or len(self.chunks) > 1:
            out.zero_()
        return self._combine_into(out, weights, add=False)

    def plus_combination(
        self, acc: torch.Tensor, mcb_grad: torch.Tensor | None, weights: torch.Tensor
    ) -> torch.Tensor:
        """A new tensor ``acc + mcb_grad + Σ_i w_i g_i`` (``mcb_grad`` None: left out).

        The combination is added into ``acc + mcb_grad`` in the same pass that reads the
        sequence gradients (no temporary of the tensor's size), with the precision of
        :meth:`combine`.
        """
        if mcb_grad is None:
            base = acc.to(self.dtype, copy=True)
        else:
            base = acc.to(self.dtype) + mcb_grad.to(self.dtype)
        return self._combine_into(base, weights, add=True)

    def _combine_into(self, out: torch.Tensor, weights: torch.Tensor, add: bool) -> torch.Tensor:
        k = self.num_sequences
        w = weights.to(torch.float64)
        gram = self._gram
        assert gram is not None, "gram_and_inner() forms G before any combination"
        # κ > _FP32_MAX_CANCELLATION, compared squared: (Σ|w_i| ‖g_i‖)² > κ_max² ‖Σ w_i g_i‖².
        spread = w.abs() @ gram.diagonal().sqrt()
        exact = bool(spread.square() > _FP32_MAX_CANCELLATION**2 * (w @ (gram @ w)))
        for rows in self.chunks:
            s = self._kept if self._kept is not None else self._form(rows)
            self._kept = None
            if not add:
                out[rows] = _weighted_sum(w, s[:k], exact)
            elif isinstance(rows, slice):
                _add_weighted_sum(out[rows], w, s[:k], exact)  # a view: rows of dim 0
            else:
                out.index_add_(0, rows, _weighted_sum(w, s[:k], exact))
            self._release(s)
        return out

    def release(self) -> None:
        """Free everything: a chunk kept for ``combine``, and precomputed gradients."""
        if self._kept is not None:
            self._release(self._kept)
            self._kept = None
        for u in self.uses:
            if u.precomputed is not None:
                self.meter.add(-u.precomputed.numel() * u.precomputed.element_size())
                if self.pool is not None:  # formed by the fused backward, used by us alone
                    self.pool.give(u.precomputed)
                u.precomputed = None
