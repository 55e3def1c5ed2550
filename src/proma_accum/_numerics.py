"""Numerics of the update and the sequence gradients: norms, the normalised Gram, the rank cut.

Everything here works on 0-d or ``k × k`` float64 tensors and never leaves the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# The rank threshold on the normalised Gram matrix Ĝ of k sequences: directions of the span
# with eigenvalues below RANK_RTOL * k (k ≥ tr Ĝ ≥ λ_max; singular values of the unit sequence
# gradients below ~1e-5 of the largest, about 100 float32 ulps, which float32 gradients cannot
# resolve) are not projected (see ``_proma.span_coefficients_exact``). ``proma_accum.testing``
# cuts at the same level, relative to the largest singular value.
RANK_RTOL = 1e-10

# Norms are reduced in float64 over float32 norms of rows of this many elements: as accurate
# as a float64 reduction in practice, without a float64 copy of the tensor. Up to _NORM_SMALL
# elements the float64 copy is cheaper than the extra ops.
_NORM_ROW = 256
_NORM_SMALL = 4096


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``‖x‖²`` as a 0-d float64 tensor (see :func:`norm`)."""
    return norm(x).square()


def norm(x: torch.Tensor) -> torch.Tensor:
    """``‖x‖`` as a 0-d float64 tensor.

    Each row of ``_NORM_ROW`` elements is reduced in ``x``'s compute dtype (relative error about
    one rounding of that dtype) and the row norms in float64, so no float64 copy of a large
    ``x`` is made (that copy costs ~20x the reduction).
    """
    if x.numel() <= _NORM_SMALL or x.dtype == torch.float64:
        return torch.linalg.vector_norm(x, dtype=torch.float64)
    flat = x.reshape(-1)
    head = flat.numel() - flat.numel() % _NORM_ROW
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = torch.linalg.vector_norm(flat[:head].view(-1, _NORM_ROW), dim=1, dtype=dtype)
    if head < flat.numel():
        rows = torch.cat([rows, torch.linalg.vector_norm(flat[head:], dtype=dtype)[None]])
    return torch.linalg.vector_norm(rows, dtype=torch.float64)


class UnitGram(NamedTuple):
    """The Gram matrix of the unit vectors ``u_i = g_i / ‖g_i‖``.

    ``gram: (k, k)`` is ``Ĝ``; ``inv_norms: (k,)`` is ``1 / ‖g_i‖``, and 0 for a zero ``g_i``
    (whose row and column of ``Ĝ`` are then zero).
    """

    gram: torch.Tensor
    inv_norms: torch.Tensor

    @property
    def nonzero(self) -> torch.Tensor:
        """``(k,)``: which ``g_i`` are nonzero."""
        return self.inv_norms > 0


def normalized_gram(gram: torch.Tensor) -> UnitGram:
    """``Ĝ`` of ``G: (k, k)``.

    The span does not depend on the lengths of the ``g_i``, and each ``g_i`` is known to its own
    relative precision, so rank decisions and conditioning are judged on ``Ĝ`` (a sequence scaled
    by a tiny advantage is still a full direction of the span).
    """
    # G_ii are sums of squares (never negative): 1/sqrt(0) = inf and NaN become 0.
    inv_norms = gram.diagonal().rsqrt().nan_to_num(0.0, 0.0, 0.0)
    return UnitGram(gram * torch.outer(inv_norms, inv_norms), inv_norms)
