"""The PROMA update of one parameter tensor, as in the note's figures 1 and 3.

For a tensor ``t`` with running gradient ``acc = t.grad`` and a microbatch of ``k`` sequences with
sequence-wise gradients ``g_1 .. g_k`` (``mcb_seq_grads``) and microbatch gradient ``g``
(``mcb_policy_grad``)::

    proj_on_span = P_span(g_1..g_k)(acc)                   # figure 1, project_to_complement
    proj_on_span *= min(1, clamp * ‖g‖ / ‖proj_on_span‖)   # section 3, the clamp
    t.grad = acc - strength * proj_on_span + g

Everything works on the ``k × k`` Gram matrix ``G_ij = ⟨g_i, g_j⟩`` and the inner products
``r_i = ⟨g_i, acc⟩``: the projection is ``Σ_i c_i g_i`` for coefficients ``c`` solved here in
float64, so the sequence gradients themselves are only touched by the layer kernels (to form
``G``, ``r`` and the final combination ``Σ_i w_i g_i``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

Projection = Literal["exact", "gs2"]

# Eigenvalues of the normalised Gram matrix Ĝ below RANK_RTOL * λ_max count as zero: singular
# values of the unit sequence gradients below 1e-5 of the largest, about 100 float32 ulps,
# which float32 gradients cannot resolve. ``proma_accum.testing`` uses the same threshold.
RANK_RTOL = 1e-10


class SequenceGradients(Protocol):
    """The sequence-wise gradients ``g_1 .. g_k`` of one tensor, as the kernels provide them."""

    num_sequences: int

    def gram_and_inner(self, acc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, r)``: ``G: (k, k)`` float64 Gram matrix, ``r: (k,)`` float64 ``⟨g_i, acc⟩``."""
        ...

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_i weights[i] g_i``, shaped like the tensor. ``weights: (k,)``."""
        ...

    def plus_combination(
        self, acc: torch.Tensor, mcb_grad: torch.Tensor | None, weights: torch.Tensor
    ) -> torch.Tensor:
        """A new tensor ``acc + mcb_grad + Σ_i weights[i] g_i`` (``mcb_grad`` None: left out)."""
        ...

    # None, or ``(normalized_gram(G), torch.linalg.eigh(Ĝ) or None)`` of the ``G`` that
    # ``gram_and_inner`` returned, when it computed them anyway.
    spectrum: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None] | None


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
    flat = x.reshape(-1)
    if flat.numel() <= _NORM_SMALL or x.dtype == torch.float64:
        return torch.linalg.vector_norm(flat, dtype=torch.float64)
    head = flat.numel() - flat.numel() % _NORM_ROW
    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = torch.linalg.vector_norm(flat[:head].view(-1, _NORM_ROW), dim=1, dtype=dtype)
    if head < flat.numel():
        rows = torch.cat([rows, torch.linalg.vector_norm(flat[head:], dtype=dtype)[None]])
    return torch.linalg.vector_norm(rows, dtype=torch.float64)


def normalized_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Ĝ, inv_norms, nonzero)``: the Gram matrix of the unit vectors ``g_i / ‖g_i‖``.

    ``inv_norms_i = 1 / ‖g_i‖``, and 0 for a zero ``g_i``, whose row and column of ``Ĝ`` are
    then zero. The span does not depend on the lengths of the ``g_i``, and each ``g_i`` is
    known to its own relative precision, so rank decisions and conditioning are judged on
    ``Ĝ`` (a sequence scaled by a tiny advantage is still a full direction of the span).
    """
    norms = gram.diagonal().sqrt()  # sums of squares: never negative
    nonzero = norms > 0
    inv_norms = torch.where(nonzero, norms.reciprocal(), 0.0)
    return gram * torch.outer(inv_norms, inv_norms), inv_norms, nonzero


def span_coefficients_exact(gram: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``c`` with ``Σ c_i g_i`` the orthogonal projection of ``acc`` onto ``span(g)``.

    The note's ``project_to_complement_v1`` (QR), done rank-revealingly on the unit vectors
    ``u_i = g_i / ‖g_i‖``: ``α = Ĝ⁺ r̂`` with the pseudo-inverse over the eigenvalues of ``Ĝ``
    above ``RANK_RTOL · λ_max``, ``r̂_i = ⟨u_i, acc⟩`` and ``c_i = α_i / ‖g_i‖``. Duplicate,
    linearly dependent and zero sequence gradients are fine.
    """
    normalized = normalized_gram(gram)
    eigh = torch.linalg.eigh(normalized[0])
    return _coefficients_exact(normalized, eigh, _kept(eigh[0]), inner)


def _coefficients_exact(
    normalized: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    eigh: tuple[torch.Tensor, torch.Tensor],
    kept: torch.Tensor,
    inner: torch.Tensor,
) -> torch.Tensor:
    _, inv_norms, _ = normalized
    eigval, eigvec = eigh
    inv = torch.where(kept, eigval.reciprocal(), 0.0)
    alpha = eigvec @ (inv * (eigvec.T @ (inner * inv_norms)))
    return alpha * inv_norms


def span_coefficients_gs2(gram: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``c`` with ``Σ c_i g_i`` what the note's ``project_to_complement_v2`` removes.

    Two passes of ``for u in U: acc -= ⟨acc, u⟩ u`` over the normalised ``u_i = g_i / ‖g_i‖``.
    One pass is one forward Gauss–Seidel sweep on ``Ĝ α = r̂`` (``Ĝ`` the Gram of the ``u_i``,
    ``r̂_i = ⟨u_i, acc⟩``): ``(I + L) α = r̂`` with ``L`` the strictly lower part of ``Ĝ``.
    Zero sequence gradients are skipped (the note's code would divide by zero).
    """
    return _coefficients_gs2(normalized_gram(gram), inner)


def _coefficients_gs2(
    normalized: tuple[torch.Tensor, torch.Tensor, torch.Tensor], inner: torch.Tensor
) -> torch.Tensor:
    unit_gram, inv_norms, _ = normalized
    unit_inner = inner * inv_norms
    sweep = unit_gram.tril(-1)
    sweep.diagonal().fill_(1.0)  # I + L
    alpha = torch.linalg.solve_triangular(sweep, unit_inner[:, None], upper=False)  # 1st pass
    residual = unit_inner[:, None] - unit_gram @ alpha
    alpha += torch.linalg.solve_triangular(sweep, residual, upper=False)  # 2nd pass
    return alpha[:, 0] * inv_norms


SPAN_COEFFICIENTS = {"exact": span_coefficients_exact, "gs2": span_coefficients_gs2}


@dataclass
class UpdateInfo:
    """Diagnostics of one tensor's update (0-d float64 tensors; no host sync needed)."""

    num_sequences: int
    rank: torch.Tensor
    acc_norm: torch.Tensor
    removed_norm: torch.Tensor
    clamp_bound: torch.Tensor
    mcb_norm: torch.Tensor


def _kept(eigval: torch.Tensor) -> torch.Tensor:
    """Which eigenvalues of ``Ĝ`` (ascending, as ``eigh`` returns them) count as nonzero:
    those above ``RANK_RTOL · λ_max``; their number is the dimension of ``span(g)``."""
    return eigval > RANK_RTOL * eigval[-1].clamp(min=0)


def _span_coefficients_and_rank(
    projection: Projection,
    gram: torch.Tensor,
    inner: torch.Tensor,
    spectrum: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``SPAN_COEFFICIENTS[projection](gram, inner)`` and the dimension of ``span(g)``, with
    one eigendecomposition of ``Ĝ`` serving both (or the one the sequence gradients computed)."""
    normalized, eigh = spectrum or (normalized_gram(gram), None)
    if projection == "exact":
        eigh = eigh or torch.linalg.eigh(normalized[0])
        kept = _kept(eigh[0])
        return _coefficients_exact(normalized, eigh, kept, inner), kept.sum()
    eigval = eigh[0] if eigh else torch.linalg.eigvalsh(normalized[0])
    return _coefficients_gs2(normalized, inner), _kept(eigval).sum()


def accumulate_proma(
    acc: torch.Tensor | None,
    mcb_grad: torch.Tensor,
    seq_grads: SequenceGradients,
    *,
    projection: Projection,
    clamp: float | None,
    strength: float,
    advantages: torch.Tensor | None = None,
    world: int = 1,
) -> tuple[torch.Tensor, UpdateInfo | None]:
    """The new running gradient ``acc - strength · clamp(P_span(acc)) + g`` of one tensor.

    Args:
        acc: running gradient ``t.grad`` before this microbatch (None: nothing accumulated).
        mcb_grad: the microbatch gradient autograd computed (loss mode), same shape as ``acc``.
        seq_grads: the sequence-wise gradients ``g_1 .. g_k``.
        advantages: ``(k,)`` float64; if given, the microbatch gradient is ``Σ_i adv_i g_i``
            (the backward was of unit-advantage log-probabilities) and ``mcb_grad`` is ignored.
        world: ``W > 1`` when the result is averaged over ``W`` data-parallel ranks that share
            ``acc``: the clamp bound becomes ``clamp · ‖g‖ / W`` and ``W`` times the clamped
            projection is removed, so the average removes ``Σ_r clamp(P_r(acc))``.

    Returns:
        The new running gradient (compute dtype) and diagnostics (None when nothing was
        accumulated yet, so nothing was projected).
    """
    gram, inner = seq_grads.gram_and_inner(acc)  # G_ij = ⟨g_i, g_j⟩, r_i = ⟨g_i, acc⟩
    if advantages is None:
        mcb_norm = norm(mcb_grad)
        mcb_weights = None
    else:
        mcb_norm = (advantages @ (gram @ advantages)).clamp(min=0).sqrt()
        mcb_weights = advantages
    if acc is None:
        if advantages is None:
            return mcb_grad, None
        return seq_grads.combine(advantages), None

    coeffs, rank = _span_coefficients_and_rank(projection, gram, inner, seq_grads.spectrum)
    proj_norm = (coeffs @ (gram @ coeffs)).clamp(min=0).sqrt()
    if clamp is None:
        scale = torch.ones_like(proj_norm)
        clamped = torch.zeros_like(proj_norm, dtype=torch.bool)
    else:
        bound = mcb_norm * (clamp / world)
        scale = (bound / proj_norm.clamp(min=1e-300)).clamp(max=1.0)
        clamped = proj_norm > bound
    # The weights of the g_i in complemented_acc_grad + mcb_policy_grad - acc.
    weights = coeffs * (scale * (-world * strength))
    if mcb_weights is not None:
        weights += mcb_weights
    # Both combinations done in one pass.
    new = seq_grads.plus_combination(acc, mcb_grad if advantages is None else None, weights)
    info = UpdateInfo(
        num_sequences=seq_grads.num_sequences,
        rank=rank,
        acc_norm=norm(acc),
        removed_norm=scale * proj_norm * (world * strength),
        clamp_bound=clamped,
        mcb_norm=mcb_norm,
    )
    return new, info
