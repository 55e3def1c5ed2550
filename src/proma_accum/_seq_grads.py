"""Sequence-wise gradients of one parameter tensor, formed from its layers' captured data.

A tensor may be used by several layers (tied weights) and a layer may run several times in a
microbatch; every use with a gradient contributes. The per-sequence gradients
``S: (k + 1, rows, ...)`` are formed chunk by chunk over the tensor's rows (:class:`ChunkPlan`),
each chunk at most ``chunk_bytes``, and freed as soon as it is used. When one chunk holds
everything it is kept between the two passes (``gram_and_inner`` then ``combine``); otherwise it
is formed again. The first pass also measures how far they are from autograd's gradient
(``_consistency``).

Precision. ``S`` is formed in the parameter's compute dtype (float32 for bf16, fp16 and float32
parameters). Nearly dependent sequence gradients need the Gram matrix to resolve eigenvalues
far below float32's, and bring large coefficients of mixed sign that cancel catastrophically in
a float32 combination; both are exact when float32 values are multiplied in float64. Two
policies give that, and each is exact:

* on a GPU (and any device but the CPU), decided without looking at the data: the Gram
  matrix, the inner products and the combination always multiply in float64 (no host
  synchronisation, at the price of float64 passes);
* on the CPU, where reading a value on the host costs nothing (there is no device queue to
  drain), the cheap float32 passes are used and repeated in float64 only when the data needs
  it: a normalised Gram matrix with condition number above ``_FP32_GRAM_MAX_CONDITION``, a
  combination whose cancellation factor exceeds ``_FP32_MAX_CANCELLATION``. This is the one
  CPU-only trick of the hot path (``HOST_DECISIONS_ON_CPU``; the tests run both policies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._capture import Capture
from ._consistency import Consistency, check_remainder
from ._kernels import LayerUse
from ._kernels._base import Rows
from ._numerics import normalized_gram
from ._workspace import Workspace

# Column blocks of the passes over S (Gram, inner products, check, float64 combination). On
# the CPU a block stays in cache while the pass reads it for all three; elsewhere a block only
# bounds the transient float64 copy, and each block costs a dozen kernel launches.
_GRAM_BLOCK_BYTES = {"cpu": 8 * 2**20}
_DEVICE_BLOCK_BYTES = 256 * 2**20


def block_columns(device: torch.device, rows: int, itemsize: int) -> int:
    """Columns of a block of ``rows`` rows of ``itemsize`` bytes on ``device``."""
    budget = _GRAM_BLOCK_BYTES.get(device.type, _DEVICE_BLOCK_BYTES)
    return max(1, budget // (itemsize * max(rows, 1)))


_FP32_MAX_CANCELLATION = 64.0
_FP32_GRAM_MAX_CONDITION = 100.0
# The CPU-only precision policy of the module docstring (False: the device policy everywhere).
HOST_DECISIONS_ON_CPU = True


def host_decisions(device: torch.device) -> bool:
    """Whether the precision policy may read values on the host (on the CPU only)."""
    return HOST_DECISIONS_ON_CPU and device.type == "cpu"


# Called with (rows, S) for every chunk of per-sequence gradients the first pass reads.
Observer = Callable[[Rows, torch.Tensor], None]


def _weighted_sum(w: torch.Tensor, s: torch.Tensor, exact: bool) -> torch.Tensor:
    """``Σ_i w_i s_i`` for ``s: (k, ...)`` and float64 ``w``; with ``exact``, the float32 values
    are multiplied and accumulated in float64 blocks (see the module docstring)."""
    flat = s.reshape(s.shape[0], -1)
    if not exact:
        return (w.to(s.dtype) @ flat).view(s.shape[1:])
    out = torch.empty(flat.shape[1], dtype=s.dtype, device=s.device)
    cols = block_columns(s.device, s.shape[0], 8)
    for a in range(0, flat.shape[1], cols):
        out[a : a + cols] = w @ flat[:, a : a + cols].double()
    return out.view(s.shape[1:])


def _add_weighted_sum(out: torch.Tensor, w: torch.Tensor, s: torch.Tensor, exact: bool) -> None:
    """``out += Σ_i w_i s_i`` in place, for a contiguous ``out`` shaped like ``s[0]`` (``s`` may
    be flat: ``(k, out.numel())``)."""
    flat = s.reshape(s.shape[0], -1)
    target = out.view(-1)
    if flat.dtype == torch.float64:  # exact already
        target += w @ flat
        return
    if not exact:
        target.addmv_(flat.T, w.to(s.dtype))
        return
    cols = block_columns(s.device, s.shape[0], 8)
    if cols >= flat.shape[1]:  # one block: no slicing
        target += w @ flat.double()
        return
    for a in range(0, flat.shape[1], cols):
        target[a : a + cols] += w @ flat[:, a : a + cols].double()


def _needs_float64_gram(gram: torch.Tensor) -> bool:
    """The CPU policy: whether a Gram matrix formed from float32 products must be formed again
    in float64 — ``λ_min(Ĝ) < λ_max(Ĝ) / _FP32_GRAM_MAX_CONDITION`` over the nonzero ``g_i``
    (each float32 entry is accurate to about ``eps32 · ‖g_i‖ ‖g_j‖``, enough when ``Ĝ`` is well
    conditioned). Reads values on the host: CPU only."""
    unit = normalized_gram(gram)
    nonzero = unit.nonzero
    eigval = torch.linalg.eigvalsh(unit.gram[nonzero][:, nonzero])
    return bool(eigval.numel()) and bool(eigval[0] * _FP32_GRAM_MAX_CONDITION < eigval[-1])


def _sum_parts(
    parts: list[torch.Tensor], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The float64 sum of partial results of this shape (zero when there are none)."""
    if not parts:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    if len(parts) == 1:
        return parts[0].double()
    return torch.stack(parts).double().sum(0)


def _untouched_sq_norm(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``‖t‖²`` over the rows of ``t`` (along dim 0) not listed in ``rows`` (float64, 0-d)."""
    row_sq = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=torch.float64)
    row_sq = row_sq.square()
    row_sq[rows] = 0.0
    return row_sq.sum()


@dataclass(frozen=True)
class ChunkPlan:
    """Which rows of a tensor are formed together: ``rows`` is the sorted set of rows any use
    can touch (None: all rows) and ``chunks`` splits them so that ``(k + 1) ×`` a chunk fits
    ``chunk_bytes``."""

    rows: torch.Tensor | None
    chunks: list[Rows]

    @classmethod
    def plan(
        cls,
        param: torch.Tensor,
        touched: Sequence[torch.Tensor | None],
        num_sequences: int,
        dtype: torch.dtype,
        chunk_bytes: int,
    ) -> ChunkPlan:
        """``touched``: per use, the rows it can touch (None: any)."""
        rows: torch.Tensor | None = None
        if touched and all(t is not None for t in touched):
            # Each use's rows are sorted and unique already: one use needs no union.
            rows = touched[0] if len(touched) == 1 else torch.unique(torch.cat(touched))  # type: ignore[arg-type]
            n_rows = rows.numel()
        else:
            n_rows = param.shape[0] if param.dim() else 1
        row_numel = param[0].numel() if param.dim() > 1 else 1
        row_bytes = (num_sequences + 1) * row_numel * dtype.itemsize
        per_chunk = max(1, chunk_bytes // max(row_bytes, 1))
        bounds = [(a, min(a + per_chunk, n_rows)) for a in range(0, n_rows, per_chunk)]
        chunks: list[Rows] = [slice(a, b) if rows is None else rows[a:b] for a, b in bounds]
        return cls(rows, chunks)


class TensorSequenceGradients:
    """The ``k`` sequence-wise gradients of one tensor (implements ``SequenceGradients``).

    Args:
        name: the tensor's parameter name.
        param: the tensor (under FSDP2, its unsharded copy).
        uses: ``(capture, role)`` of every layer call that used the tensor with a gradient.
        num_sequences: ``k``.
        autograd_grad: the microbatch gradient autograd computed for the tensor.
        chunk_bytes: byte budget of one chunk of ``S``.
        workspace: where buffers come from and are metered.
        check: the consistency check to run in the first pass, or None (the gradient provably
            is the fused sum).
        observer: called with every chunk the first pass reads (``proma_accum.testing``).
    """

    def __init__(
        self,
        name: str,
        param: torch.Tensor,
        uses: Sequence[tuple[Capture, str]],
        num_sequences: int,
        autograd_grad: torch.Tensor,
        *,
        chunk_bytes: int,
        workspace: Workspace,
        check: Consistency | None,
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        self.param = param
        self.num_sequences = num_sequences
        self.autograd_grad = autograd_grad
        self.workspace = workspace
        self.check = check
        self.observer = observer
        self.dtype = torch.promote_types(param.dtype, torch.float32)
        self.host_decisions = host_decisions(param.device)
        self._gram: torch.Tensor | None = None  # G, once gram_and_inner formed it
        # Per use: the kernel, and either its fused per-sequence gradients (taken from the
        # capture: consumed by this tensor alone) with the sum autograd received, or its input.
        self._fused: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._inputs: list[tuple[Capture, LayerUse]] = []
        for cap, role in uses:
            if cap.fused:
                self._fused.append((cap.formed.pop(role), cap.returned.get(role)))
            else:
                self._inputs.append((cap, cap.use(role)))
        if check is not None and check.needs_scale:
            for cap, use in self._inputs:
                if cap.layer.kernel.low_precision_accumulation:
                    check.add_scale(cap.layer.kernel.contribution_norm_sum(use))
        if check is not None and check.needs_sq_scale:
            for cap, use in self._inputs:
                if cap.layer.kernel.per_token_rounding:
                    check.add_sq_scale(cap.layer.kernel.contribution_sq_norm_sum(use))
        touched = [cap.layer.kernel.touched_rows(use) for cap, use in self._inputs]
        if self._fused:
            touched.append(None)
        self.plan = ChunkPlan.plan(param, touched, num_sequences, self.dtype, chunk_bytes)
        self._kept: torch.Tensor | None = None
        # The float64 copy of the sequence rows the first pass made, when it is all of them in
        # one block (the combination then reads it instead of converting again).
        self._kept64: torch.Tensor | None = None
        # Check by subtracting the fused uses' returned sums (see ``_consistency``) when every
        # fused use has one and the other uses say which rows they touch.
        others = touched[: len(self._inputs)]
        self._remainder_rows: torch.Tensor | None = None
        if (
            self._fused
            and all(returned is not None for _, returned in self._fused)
            and all(t is not None for t in others)
        ):
            if not others:
                self._remainder_rows = torch.empty(0, dtype=torch.long, device=param.device)
            elif len(others) == 1:  # sorted and unique already (no host synchronisation)
                self._remainder_rows = others[0]
            else:
                self._remainder_rows = torch.unique(torch.cat(others))  # type: ignore[arg-type]

    def _form(self, rows: Rows) -> torch.Tensor:
        """``(k + 1, len(rows), ...)``: every use's per-sequence gradient of these rows, summed.

        Fused gradients are used as they are (their rows are a view); the result may alias
        them, which is fine since each is consumed by this tensor alone.
        """
        total = None
        for formed, _ in self._fused:
            part = formed[:, rows]
            if total is None:
                # Adding other uses into a view of a fused tensor is only safe when each chunk
                # is formed once.
                total = part if len(self.plan.chunks) == 1 else part.clone()
            else:
                total.add_(part)
        for cap, use in self._inputs:
            kernel = cap.layer.kernel
            if total is None:
                total = kernel.seq_grads(use, rows, self.dtype)
                self.workspace.formed(total)
            else:
                kernel.add_seq_grads(total, use, rows)
        assert total is not None
        return total

    def _release(self, s: torch.Tensor) -> None:
        if not self._fused:
            self.workspace.released(s)

    def gram_and_inner(self, running: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, r)`` in float64, from one pass over the sequence gradients, which also runs the
        consistency check (its result stays on the device: ``check.ratio``); products in
        float64, or, under the CPU policy, in float32 with a float64 pass when needed."""
        check = self.check
        if check is not None and self._remainder_rows is not None:
            check_remainder(
                check,
                self.autograd_grad,
                [returned for _, returned in self._fused if returned is not None],
                [(cap.layer.kernel, use) for cap, use in self._inputs],
                self._remainder_rows,
                self.dtype,
            )
            check = None
        precise = not self.host_decisions
        gram, inner = self._pass(running, precise, check, first=True)
        if not precise and _needs_float64_gram(gram):
            gram, inner = self._pass(running, True, None, first=False)
        self._gram = gram
        return gram, inner

    def _pass(
        self, running: torch.Tensor | None, precise: bool, check: Consistency | None, first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over the chunks: ``(G, r)``, products in float64 if ``precise``."""
        k = self.num_sequences
        # Partial results of the blocks, summed in float64 at the end.
        grams: list[torch.Tensor] = []
        inners: list[torch.Tensor] = []
        grad = self.autograd_grad
        chunks = self.plan.chunks
        for rows in chunks:
            s = self._kept if self._kept is not None else self._form(rows)
            self._kept = None
            if self.observer is not None and first:
                self.observer(rows, s)
            flat = s.reshape(k + 1, -1)
            whole = isinstance(rows, slice) and rows == slice(None)  # no indexing op: all rows
            g_rows = (grad if whole else grad[rows]).reshape(-1)
            running_rows = None
            if running is not None:
                running_rows = (running if whole else running[rows]).reshape(-1)
            # Column blocks that stay in cache: the Gram matrix, the inner products and the
            # sum check read each block once (whole-tensor calls would read S three times).
            cols = block_columns(s.device, k + 1, 8 if precise else 4)
            one = False
            for a in range(0, flat.shape[1], cols):
                one = cols >= flat.shape[1]  # one block: no slicing ops
                block = flat if one else flat[:, a : a + cols]
                g_block = g_rows if one else g_rows[a : a + cols]
                if check is not None:
                    check.add_block(block, g_block)
                seqs = block[:k].double() if precise else block[:k]
                grams.append(seqs @ seqs.T)
                if running_rows is not None:
                    r_block = running_rows if one else running_rows[a : a + cols]
                    inners.append(seqs @ r_block.to(seqs.dtype))
            if len(chunks) == 1:
                self._kept = s
                if precise and one:
                    self._kept64 = seqs
            else:
                self._release(s)
        device = self.param.device
        if check is not None:
            rows = self.plan.rows
            check.finish(device, None if rows is None else _untouched_sq_norm(grad, rows))
        return _sum_parts(grams, (k, k), device), _sum_parts(inners, (k,), device)

    def whole(self) -> torch.Tensor | None:
        """``S: (k + 1, numel)``, all of the tensor's per-sequence gradients at once, when one
        chunk holds them, their float64 copy fits one column block (the transient the passes
        allow themselves), no check reads them and nobody observes them (else None): for
        ``accumulate_proma``'s compiled path, which does the passes itself."""
        numel = self.param.numel()
        if (
            len(self.plan.chunks) != 1
            or self.plan.rows is not None
            or self.check is not None
            or self.observer is not None
            or block_columns(self.param.device, self.num_sequences + 1, 8) < numel
        ):
            return None
        s = self._kept if self._kept is not None else self._form(slice(None))
        self._kept = s  # freed by release()
        return s.reshape(s.shape[0], -1)

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_i w_i g_i``, float32 values multiplied in float64 (under the CPU policy: in
        float32 unless the cancellation factor ``κ = Σ_i |w_i| ‖g_i‖ / ‖Σ_i w_i g_i‖`` exceeds
        ``_FP32_MAX_CANCELLATION``; float32's error is ``κ · eps32``)."""
        out = torch.empty(self.param.shape, dtype=self.dtype, device=self.param.device)
        if self.plan.rows is not None or len(self.plan.chunks) > 1:
            out.zero_()
        return self._combine_into(out, weights, add=False)

    def plus_combination(
        self, running: torch.Tensor, mcb_grad: torch.Tensor | None, weights: torch.Tensor
    ) -> torch.Tensor:
        """A new tensor ``running + mcb_grad + Σ_i w_i g_i`` (``mcb_grad`` None: left out).

        The combination is added into ``running + mcb_grad`` in the same pass that reads the
        sequence gradients (no temporary of the tensor's size), with the precision of
        :meth:`combine`.
        """
        if mcb_grad is None:
            base = running.to(self.dtype, copy=True)
        else:
            base = running.to(self.dtype) + mcb_grad.to(self.dtype)
        return self._combine_into(base, weights, add=True)

    def _combine_into(self, out: torch.Tensor, weights: torch.Tensor, add: bool) -> torch.Tensor:
        k = self.num_sequences
        w = weights.to(torch.float64)
        exact = True
        if self.host_decisions:
            gram = self._gram
            assert gram is not None, "gram_and_inner() forms G before any combination"
            # κ > _FP32_MAX_CANCELLATION, compared squared: (Σ|w_i| ‖g_i‖)² > κ_max² ‖Σ w_i g_i‖².
            spread = w.abs() @ gram.diagonal().sqrt()
            exact = bool(spread.square() > _FP32_MAX_CANCELLATION**2 * (w @ (gram @ w)))
        kept64, self._kept64 = self._kept64, None
        rows = self.plan.chunks[0] if len(self.plan.chunks) == 1 else None
        if (
            add
            and exact
            and kept64 is not None
            and self._kept is not None
            and isinstance(rows, slice)
        ):
            _add_weighted_sum(out[rows], w, kept64, exact)
            self._release(self._kept)
            self._kept = None
            return out
        for rows in self.plan.chunks:
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
        """Free everything: a chunk kept for ``combine``, and the fused gradients."""
        self._kept64 = None
        if self._kept is not None:
            self._release(self._kept)
            self._kept = None
        for formed, _ in self._fused:
            # Formed by the fused backward, used by this tensor alone: may be kept for reuse.
            self.workspace.released(formed, keep=True)
        self._fused = []
