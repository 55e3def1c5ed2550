"""The consistency check: a covered tensor's gradient must be the sum of its per-sequence parts.

``Σ_i S_i`` (padding row included) is compared with the gradient autograd computed for the
tensor: a mismatch means part of the gradient came from outside the hooked layers (a fused LM
head, a penalty on the weights, a user hook) and the microbatch fails with
:class:`IncompleteSequenceDataError` instead of silently using incomplete per-sequence data.

The comparison stays on the device: each tensor's relative mismatch is kept as a 0-d tensor, and
:func:`verify_all` checks every tensor of a microbatch at once when its context exits (one host
synchronisation per microbatch, whatever the number of tensors); a failure there restores every
``p.grad`` like any other failure inside the microbatch.

Uses whose weight gradient autograd received from the fused backward (``Capture.returned``, the
sum of their per-sequence gradients) are subtracted from that gradient instead of being summed
again (:func:`check_remainder`), so a tied LM head's per-sequence gradients are not read for the
check: the rest is compared with the other uses' gradient (an embedding's, on the rows its ids
touch), formed without the per-sequence split (``Kernel.grad_sum``).

The tolerance policy (:func:`tolerance`) lives here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ._kernels import Kernel, LayerUse
from ._numerics import sq_norm

_CHECK_BLOCK_BYTES = 2**20
# Float32 GEMMs in another order (ours against autograd's) agree to ~1e-6 relative; a missing
# use of the weight differs by O(1). The floor of the relative tolerance.
RTOL_FLOOR = 1e-3
# Unit roundoff (half an ulp of 1) of the precisions a layer may compute in.
_UNIT_ROUNDOFF = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}
# What torch.get_float32_matmul_precision() lets float32 matmuls use: TF32 (10-bit mantissa)
# for "high", bfloat16 for "medium".
_MATMUL_ROUNDOFF = {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}


class IncompleteSequenceDataError(RuntimeError):
    """A covered tensor's gradient is not the sum of the per-sequence parts its layers saw."""


@dataclass(frozen=True)
class Tolerance:
    """``‖Σ_i S_i − g‖ ≤ rtol · ‖g‖ + accumulation · Σ_t ‖c_t‖ + per_token · (Σ_t ‖c_t‖²)^½
    (+ absolute)``, where ``g`` is autograd's gradient of the tensor and ``c_t`` each token's
    contribution to it.

    Derived from the unit roundoff ``u`` of the lowest precision the layers computed in (the
    parameter dtype, the dtype an input was multiplied in, the float32 matmul precision):

    * ``rtol = max(RTOL_FLOOR, 2u)``: autograd's gradient is rounded to the parameter dtype
      (each element within ``u`` relative, so the norm within ``u · ‖g‖``), and our float32
      recomputation of the layer (``x̂`` of a norm, an autocast input) differs from autograd's
      by about as much again; ``2u`` is twice that for margin (measured on CPU: up to
      ``0.45 u`` for bf16 Linear, Conv1D and RMSNorm weights, whatever the number of tokens);
    * ``accumulation = u_param`` when the kernel's layer kind has torch accumulate its
      gradient over the tokens in the parameter's half dtype, or round per-token intermediates
      to it (``low_precision_accumulation``: LayerNorm, Embedding on CPU, MoE blocks), else
      0: such a sum errs by a fraction of ``u · Σ_t ‖c_t‖`` (measured: up to
      ``0.26 u Σ_t ‖c_t‖`` for bf16 LayerNorm, whose relative error then
      grows with the number of tokens, to 10% at 16k tokens).

    * ``per_token = 2 u_param`` when the layer forms each token's contribution in the
      parameter's half dtype and sums the rounded contributions in float32
      (``per_token_rounding``: the RMSNorms, whose ``w ⊙ x̂`` is a half-precision product;
      norms covered by structure), else 0: independent roundings of at most ``u |c_t|`` add up
      like a random walk, to about ``u / √3 · (Σ_t ‖c_t‖²)^½``; the bound is ~3.5x that.
      (Measured before this term: a tiny bf16 Qwen3's ``k_norm`` — 8 features, contributions
      from every token and head — failed the ``2u`` bound at ``2.14u`` in 1 of 60 runs.)

    * ``absolute = 2⁻²⁴ · sqrt(N · numel)`` when float16 is in play (parameters or an autocast
      input; ``N`` tokens, ``numel`` elements of the tensor): float16's subnormal range starts
      at 6e-5, and unscaled output gradients fall below it (measured: 99.7% of a small LM's),
      where each product is rounded to an absolute spacing of ``2⁻²⁴``; the bound is ~3.5x
      the random-rounding estimate ``2⁻²⁵ sqrt(N · numel / 3)``. (bfloat16 has float32's
      exponent range and no such term.)

    A contribution from outside the hooked layers is caught when it exceeds this bound: in
    float32, above 0.1% of the gradient's norm; with bf16 parameters above ~0.8% for GEMM and
    RMSNorm layers, and above the (token-count dependent) accumulation term for LayerNorm and
    Embedding, whose autograd gradient is itself no more precise than that.
    """

    rtol: float
    accumulation: float
    absolute: float = 0.0
    per_token: float = 0.0


def tolerance(
    param_dtype: torch.dtype,
    input_dtypes: Iterable[torch.dtype | None],
    low_precision_accumulation: bool,
    tokens: int = 0,
    numel: int = 0,
    per_token_rounding: bool = False,
) -> Tolerance:
    """The :class:`Tolerance` for a tensor of ``param_dtype`` and ``numel`` elements whose
    layers multiplied inputs of ``input_dtypes`` (None: not recorded) over ``tokens`` tokens."""
    input_dtypes = list(input_dtypes)
    u_param = _UNIT_ROUNDOFF.get(param_dtype, 2.0**-24)
    u = max(
        u_param,
        _MATMUL_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0**-24),
        *(_UNIT_ROUNDOFF.get(d, 0.0) for d in input_dtypes if d is not None),
    )
    half = param_dtype in (torch.float16, torch.bfloat16)
    accumulation = u_param if half and low_precision_accumulation else 0.0
    fp16 = param_dtype == torch.float16 or torch.float16 in input_dtypes
    absolute = 2.0**-24 * (tokens * numel) ** 0.5 if fp16 else 0.0
    per_token = 2 * u_param if half and per_token_rounding else 0.0
    return Tolerance(max(RTOL_FLOOR, 2 * u), accumulation, absolute, per_token)


@dataclass
class Consistency:
    """The check of one tensor: its name and layer kinds (for the message), and the tolerance."""

    name: str
    layers: Sequence[str]
    tolerance: Tolerance
    observed: Sequence[str] = ()  # what the accumulator saw that can cause a mismatch
    # Partial squared norms, summed in float64 at the end: ‖Σ_i S_i − g‖² and ‖g‖².
    _mismatch: list[torch.Tensor] = field(default_factory=list)
    _total: list[torch.Tensor] = field(default_factory=list)
    # Σ_t ‖c_t‖ of the uses whose accumulation the tolerance allows for, and Σ_t ‖c_t‖² of
    # those whose per-token rounding it allows for (0-d tensors).
    _scales: list[torch.Tensor] = field(default_factory=list)
    _sq_scales: list[torch.Tensor] = field(default_factory=list)
    # ‖Σ_i S_i − g‖ / ‖g‖ and the tolerance in the same unit, as 0-d float64 tensors once
    # computed (see ``verify_all``).
    ratio: torch.Tensor | None = None
    allowed: torch.Tensor | None = None

    @property
    def needs_scale(self) -> bool:
        return self.tolerance.accumulation > 0

    def add_scale(self, contribution_norm_sum: torch.Tensor) -> None:
        self._scales.append(contribution_norm_sum)

    @property
    def needs_sq_scale(self) -> bool:
        return self.tolerance.per_token > 0

    def add_sq_scale(self, contribution_sq_norm_sum: torch.Tensor) -> None:
        self._sq_scales.append(contribution_sq_norm_sum)

    def add_block(self, seq_block: torch.Tensor, grad_block: torch.Tensor) -> None:
        """Account one column block: ``seq_block: (k + 1, n)`` per-sequence parts, ``grad_block:
        (n,)`` autograd's gradient there."""
        g_block = grad_block.to(seq_block.dtype)
        residual = seq_block.sum(0)
        residual -= g_block  # in place: one temporary per block, not two
        self._mismatch.append(sq_norm(residual))
        self._total.append(sq_norm(g_block))

    def finish(self, device: torch.device, outside: torch.Tensor | None = None) -> None:
        """Reduce the blocks added so far to :attr:`ratio`; ``outside`` is ``‖g‖²`` on rows no
        sequence touched (their norm is taken directly: a difference of two large norms would
        cancel)."""
        mismatch, total = _sum(self._mismatch, device), _sum(self._total, device)
        if outside is not None:
            mismatch, total = mismatch + outside, total + outside
        self.set_ratio(mismatch, total)

    def set_ratio(self, mismatch: torch.Tensor, total: torch.Tensor) -> None:
        """:attr:`ratio` and :attr:`allowed` from squared norms (0 when both are 0)."""
        norm = total.sqrt().clamp(min=1e-300)
        self.ratio = mismatch.sqrt() / norm
        limit = self.tolerance
        extra = limit.absolute
        if self._scales:
            extra = extra + limit.accumulation * _sum(self._scales, norm.device)
        if self._sq_scales:
            extra = extra + limit.per_token * _sum(self._sq_scales, norm.device).sqrt()
        if isinstance(extra, torch.Tensor) or extra:
            self.allowed = limit.rtol + extra / norm
        else:  # one op, not three: the common float32 case
            self.allowed = torch.full_like(norm, limit.rtol)

    def error(self) -> IncompleteSequenceDataError:
        ratio = float(self.ratio) if self.ratio is not None else float("nan")
        allowed = float(self.allowed) if self.allowed is not None else float("nan")
        observed = f" Observed: {'; '.join(self.observed)}." if self.observed else ""
        return IncompleteSequenceDataError(
            f"parameter '{self.name}': its gradient is not the sum of the per-sequence "
            f"gradients its hooked layers ({', '.join(sorted(set(self.layers)))}) saw "
            f"(relative mismatch {ratio:.3g}, tolerance {allowed:.3g}): autograd's gradient of "
            "the tensor differs from the sum of the gradients formed from those layers' inputs "
            f"and output gradients.{observed} Likely causes: part of the gradient comes from "
            "outside those layers' forward (a fused LM head that uses the weight directly, a "
            "penalty term on the weight); a gradient hook on the parameter that changes its "
            "gradient; a forward hook, forward pre-hook or patched forward that changes the "
            "layer's output before PROMA's hook sees it. Call the layer module itself, remove "
            "the hook, or exclude the parameter with exclude=[...]. Every p.grad has been "
            "restored to what it was before this microbatch."
        )


def _sum(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(parts).sum()


def verify_all(checks: Sequence[Consistency]) -> None:
    """Raise the first failed check's error, with one host synchronisation for all of them.

    A non-finite ratio (a NaN or Inf in the microbatch) does not fail: non-finite values are
    accumulated as plain accumulation would (see ``accumulate_proma``).
    """
    done = [c for c in checks if c.ratio is not None]
    if not done:
        return
    ratios = torch.stack([c.ratio for c in done])  # type: ignore[misc]
    allowed = torch.stack([c.allowed for c in done])  # type: ignore[misc]
    failed = ratios > allowed
    if bool(failed.any()):
        raise done[int(failed.to(torch.uint8).argmax())].error()


def check_remainder(
    check: Consistency,
    grad: torch.Tensor,
    fused_sums: Sequence[torch.Tensor],
    others: Sequence[tuple[Kernel, LayerUse]],
    other_rows: torch.Tensor,
    dtype: torch.dtype,
) -> None:
    """The check with the fused uses' returned sums subtracted from autograd's gradient ``grad``:
    the remainder must be the sum of the other uses' gradients on the rows they touch
    (``other_rows``, sorted), and zero elsewhere.

    The remainder is formed in row blocks of ``_CHECK_BLOCK_BYTES`` in one reused buffer (a
    temporary of the tensor's size would be mapped afresh and page-fault).
    """
    device = grad.device
    rows = other_rows
    mismatch = torch.zeros((), dtype=torch.float64, device=device)
    if others:
        # Σ_i S_i of the other uses, formed without the per-sequence split.
        residual = sum(kernel.grad_sum(use, rows, dtype) for kernel, use in others)
        assert isinstance(residual, torch.Tensor)
        residual -= grad[rows].to(dtype)
        for returned in fused_sums:
            residual += returned[rows].to(dtype)
        mismatch = sq_norm(residual)
    # Rows no other use touched: autograd's gradient minus the fused sums must be zero.
    n, row_numel = grad.shape[0], grad[0].numel()  # fused uses are Linear-like: dim >= 1
    untouched = torch.ones(n, dtype=dtype, device=device)
    untouched[rows] = 0  # 1 on the rows to check here, 0 on the rows checked above
    per_block = max(1, _CHECK_BLOCK_BYTES // (row_numel * dtype.itemsize))
    buffer = torch.empty((min(per_block, n), row_numel), dtype=dtype, device=device)
    for a in range(0, n, per_block):
        b = min(a + per_block, n)
        rest = buffer[: b - a]
        rest.copy_(grad[a:b].reshape(b - a, row_numel))
        for returned in fused_sums:
            rest -= returned[a:b].reshape(b - a, row_numel)
        rest *= untouched[a:b, None]
        mismatch = mismatch + sq_norm(rest)
    check.set_ratio(mismatch, sq_norm(grad))
