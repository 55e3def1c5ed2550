"""The consistency check: a covered tensor's gradient must be the sum of its per-sequence parts.

Before anything is projected, ``Σ_i S_i`` (padding row included) is compared with the gradient
autograd computed for the tensor: a mismatch means part of the gradient came from outside the
hooked layers (a fused LM head, a penalty on the weights) and raises
:class:`IncompleteSequenceDataError` instead of silently using incomplete per-sequence data.

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
_HALF = (torch.float16, torch.bfloat16)
# Relative mismatch allowed between Σ_i S_i and autograd's gradient: float32 GEMMs agree to
# ~1e-6; reduced-precision GEMMs (bf16, fp16, TF32) differ from ours by up to ~1e-2 relative.
# A missing use of the weight differs by O(1).
RTOL_FULL_PRECISION = 1e-3
RTOL_REDUCED_PRECISION = 2e-2


class IncompleteSequenceDataError(RuntimeError):
    """A covered tensor's gradient is not the sum of the per-sequence parts its layers saw."""


def tolerance(target_dtype: torch.dtype, input_dtypes: Iterable[torch.dtype | None]) -> float:
    """The relative tolerance of the check for a tensor of ``target_dtype`` whose layers
    multiplied inputs of ``input_dtypes`` (None: not recorded)."""
    low_precision = target_dtype in _HALF or any(d in _HALF for d in input_dtypes)
    loose = low_precision or torch.get_float32_matmul_precision() != "highest"
    return RTOL_REDUCED_PRECISION if loose else RTOL_FULL_PRECISION


@dataclass
class Consistency:
    """The check of one tensor: its name and layer kinds (for the message), and the tolerance."""

    name: str
    layers: Sequence[str]
    rtol: float
    observed: Sequence[str] = ()  # what the accumulator saw that can cause a mismatch
    # Partial squared norms, summed in float64 at the end: ‖Σ_i S_i − g‖² and ‖g‖².
    _mismatch: list[torch.Tensor] = field(default_factory=list)
    _total: list[torch.Tensor] = field(default_factory=list)

    def add_block(self, seq_block: torch.Tensor, grad_block: torch.Tensor) -> None:
        """Account one column block: ``seq_block: (k + 1, n)`` per-sequence parts, ``grad_block:
        (n,)`` autograd's gradient there."""
        g_block = grad_block.to(seq_block.dtype)
        residual = seq_block.sum(0)
        residual -= g_block  # in place: one temporary per block, not two
        self._mismatch.append(sq_norm(residual))
        self._total.append(sq_norm(g_block))

    def verify(self, device: torch.device, outside: torch.Tensor | None = None) -> None:
        """Raise unless the blocks added so far match; ``outside`` is ``‖g‖²`` on rows no
        sequence touched (their norm is taken directly: a difference of two large norms would
        cancel)."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        mismatch = torch.stack(self._mismatch).sum() if self._mismatch else zero
        total = torch.stack(self._total).sum() if self._total else zero
        if outside is not None:
            mismatch, total = mismatch + outside, total + outside
        self.raise_unless_close(mismatch, total)

    def raise_unless_close(self, mismatch: torch.Tensor, total: torch.Tensor) -> None:
        """Raise unless ``sqrt(mismatch) <= rtol * sqrt(total)`` (squared norms)."""
        if bool(mismatch.sqrt() > self.rtol * total.sqrt() + 1e-30):
            observed = f" Observed: {'; '.join(self.observed)}." if self.observed else ""
            raise IncompleteSequenceDataError(
                f"parameter '{self.name}': its gradient is not the sum of the per-sequence "
                f"gradients its hooked layers ({', '.join(sorted(set(self.layers)))}) saw "
                f"(relative mismatch "
                f"{float(mismatch.sqrt() / total.sqrt().clamp(min=1e-300)):.3g}): autograd's "
                "gradient of the tensor differs from the sum of the gradients formed from "
                f"those layers' inputs and output gradients.{observed} Likely causes: part of "
                "the gradient comes from outside those layers' forward (a fused LM head that "
                "uses the weight directly, a penalty term on the weight); a gradient hook on "
                "the parameter that changes its gradient; a forward hook, forward pre-hook or "
                "patched forward that changes the layer's output before PROMA's hook sees it. "
                "Call the layer module itself, remove the hook, or exclude the parameter with "
                "exclude=[...]."
            )


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
    per_block = max(1, _CHECK_BLOCK_BYTES // (row_numel * dtype.itemsize))
    buffer = torch.empty((min(per_block, n), *grad.shape[1:]), dtype=dtype, device=device)
    bounds = torch.searchsorted(rows, torch.arange(0, n + per_block, per_block, device=device))
    starts = bounds.tolist()
    for i, a in enumerate(range(0, n, per_block)):
        b = min(a + per_block, n)
        rest = buffer[: b - a]
        rest.copy_(grad[a:b])
        for returned in fused_sums:
            rest -= returned[a:b]
        rest.index_fill_(0, rows[starts[i] : starts[i + 1]] - a, 0)
        mismatch = mismatch + sq_norm(rest)
    check.raise_unless_close(mismatch, sq_norm(grad))
