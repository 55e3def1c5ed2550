"""The PROMA update of one parameter tensor, as in the note's figures 1 and 3.

For a tensor ``t`` with running gradient ``running = t.grad`` and a microbatch of ``k``
sequences with sequence-wise gradients ``g_1 .. g_k`` (``mcb_seq_grads``) and microbatch
gradient ``g`` (``mcb_policy_grad``)::

    proj_on_span = P_span(g_1..g_k)(running)               # figure 1, project_to_complement
    proj_on_span *= min(1, clamp * ‖g‖ / ‖proj_on_span‖)   # section 3, the clamp
    t.grad = running - strength * proj_on_span + g

Everything works on the ``k × k`` Gram matrix ``G_ij = ⟨g_i, g_j⟩`` and the inner products
``r_i = ⟨g_i, running⟩``: the projection is ``Σ_i c_i g_i`` for coefficients ``c`` solved here in
float64, so the sequence gradients themselves are only touched by the layer kernels (to form
``G``, ``r`` and the final combination ``Σ_i w_i g_i``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ._numerics import RANK_RTOL, UnitGram, norm, normalized_gram

Projection = Literal["exact", "gs2"]


class SequenceGradients(Protocol):
    """The sequence-wise gradients ``g_1 .. g_k`` of one tensor, as the kernels provide them."""

    num_sequences: int

    def gram_and_inner(self, running: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, r)``: ``G: (k, k)`` float64 Gram matrix, ``r: (k,)`` float64 ``⟨g_i, running⟩``."""
        ...

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_i weights[i] g_i``, shaped like the tensor. ``weights: (k,)``."""
        ...

    def plus_combination(
        self, running: torch.Tensor, mcb_grad: torch.Tensor | None, weights: torch.Tensor
    ) -> torch.Tensor:
        """A new tensor ``running + mcb_grad + Σ_i weights[i] g_i`` (``mcb_grad`` None: omitted)."""
        ...


def span_coefficients_exact(gram: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``c`` with ``Σ c_i g_i`` the orthogonal projection of ``running`` onto ``span(g)``.

    The note's ``project_to_complement_v1`` (QR), done rank-revealingly on the unit vectors
    ``u_i = g_i / ‖g_i‖`` without an eigensolver (which synchronises with the host on CUDA):
    ``α`` solves ``Ĝ α = r̂`` (``r̂_i = ⟨u_i, running⟩``) by the regularised solve
    ``(Ĝ + εI)⁻¹`` plus one step of iterative refinement, ``ε = RANK_RTOL · tr Ĝ / 100``, and
    ``c_i = α_i / ‖g_i‖``. In ``Ĝ``'s eigenbasis this projects each direction of the span with
    weight ``1 − (ε / (λ + ε))²``: fully (to ``1e-4``) above the rank cut ``λ > RANK_RTOL · tr
    Ĝ``, not at all when ``λ ≪ ε`` (duplicate sequences, rounding noise) — an
    eigendecomposition's rank cut, made smooth and sync-free. Duplicate, linearly dependent and
    zero sequence gradients are fine.
    """
    unit = normalized_gram(gram)
    return _coefficients_exact(unit, _regularised_inverse(gram, unit), inner)[0]


def _regularised_inverse(gram: torch.Tensor, unit: UnitGram) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, ε)``: the Cholesky factor of ``Ĝ + εI`` with ``ε = RANK_RTOL · max(tr Ĝ, 1) / 100``
    (``tr Ĝ`` is the number of nonzero ``g_i``, within a factor ``k`` of ``λ_max``). ``Ĝ`` is
    formed from exact products (its eigenvalues err by ~1e-16), so ``Ĝ + εI`` is positive
    definite; ``cholesky_ex`` and triangular solves neither check nor synchronise."""
    eps = (RANK_RTOL / 100) * unit.gram.diagonal().sum().clamp(min=1.0)
    eye = torch.eye(unit.gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.cholesky_ex(unit.gram + eps * eye).L, eps


def _solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ rhs`` by two triangular solves (backward stable, unlike an explicit inverse)."""
    y = torch.linalg.solve_triangular(factor, rhs[:, None], upper=False)
    return torch.linalg.solve_triangular(factor.mT, y, upper=True)[:, 0]


def _coefficients_exact(
    unit: UnitGram, inverse: tuple[torch.Tensor, torch.Tensor], inner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, ‖Σ c_i g_i‖²)`` from the regularised factor (see :func:`span_coefficients_exact`)."""
    factor, _ = inverse
    unit_inner = inner * unit.inv_norms
    alpha = _solve(factor, unit_inner)
    alpha = alpha + _solve(factor, unit_inner - unit.gram @ alpha)  # one step of refinement
    return alpha * unit.inv_norms, alpha @ (unit.gram @ alpha)


def _rank(inverse: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The dimension of ``span(g)``: how many ``u_j`` lie farther than the rank cut from the
    span of ``u_1 .. u_{j-1}``. Cholesky's pivots are those squared distances (plus ``ε``):
    ``L_jj² − ε > RANK_RTOL · tr Ĝ = 100 ε``. (The count of such ``j`` is the rank, whatever the
    order, up to directions at the cut itself.)"""
    factor, eps = inverse
    return (factor.diagonal().square() > 101 * eps).sum()


def span_coefficients_gs2(gram: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``c`` with ``Σ c_i g_i`` what the note's ``project_to_complement_v2`` removes.

    Two passes of ``for u in U: running -= ⟨running, u⟩ u`` over the normalised
    ``u_i = g_i / ‖g_i‖``. One pass is one forward Gauss–Seidel sweep on ``Ĝ α = r̂`` (``Ĝ`` the
    Gram of the ``u_i``, ``r̂_i = ⟨u_i, running⟩``): ``(I + L) α = r̂`` with ``L`` the strictly
    lower part of ``Ĝ``. Zero sequence gradients are skipped (the note's code would divide by
    zero).
    """
    return _coefficients_gs2(normalized_gram(gram), inner)


def _coefficients_gs2(unit: UnitGram, inner: torch.Tensor) -> torch.Tensor:
    unit_inner = inner * unit.inv_norms
    sweep = unit.gram.tril(-1)
    sweep.diagonal().fill_(1.0)  # I + L
    alpha = torch.linalg.solve_triangular(sweep, unit_inner[:, None], upper=False)  # 1st pass
    residual = unit_inner[:, None] - unit.gram @ alpha
    alpha += torch.linalg.solve_triangular(sweep, residual, upper=False)  # 2nd pass
    return alpha[:, 0] * unit.inv_norms


SPAN_COEFFICIENTS = {"exact": span_coefficients_exact, "gs2": span_coefficients_gs2}


@dataclass
class UpdateInfo:
    """Diagnostics of one tensor's update (0-d tensors; no host sync needed).

    ``clamped`` is True when the projection was longer than the clamp bound (and was scaled
    down to it).
    """

    num_sequences: int
    rank: torch.Tensor
    running_norm: torch.Tensor
    removed_norm: torch.Tensor
    clamped: torch.Tensor
    mcb_norm: torch.Tensor


def _span_coefficients(
    projection: Projection, gram: torch.Tensor, inner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c, ‖Σ c_i g_i‖², rank)`` for ``SPAN_COEFFICIENTS[projection]``; one Cholesky factor of
    the regularised ``Ĝ`` serves the exact coefficients and the rank. No eigensolver and no
    host synchronisation."""
    unit = normalized_gram(gram)
    inverse = _regularised_inverse(gram, unit)
    if projection == "exact":
        coeffs, proj_sq = _coefficients_exact(unit, inverse, inner)
    else:
        coeffs = _coefficients_gs2(unit, inner)
        proj_sq = coeffs @ (gram @ coeffs)
    return coeffs, proj_sq, _rank(inverse)


def accumulate_proma(
    running: torch.Tensor | None,
    mcb_grad: torch.Tensor,
    seq_grads: SequenceGradients,
    *,
    projection: Projection,
    clamp: float | None,
    strength: float,
    advantages: torch.Tensor | None = None,
    world: int = 1,
) -> tuple[torch.Tensor, UpdateInfo | None]:
    """The new running gradient ``running - strength · clamp(P_span(running)) + g`` of one tensor.

    Args:
        running: running gradient ``t.grad`` before this microbatch (None: nothing accumulated).
        mcb_grad: the microbatch gradient autograd computed (loss mode), same shape as
            ``running``.
        seq_grads: the sequence-wise gradients ``g_1 .. g_k``.
        advantages: ``(k,)`` float64; if given, the microbatch gradient is ``Σ_i adv_i g_i``
            (the backward was of unit-advantage log-probabilities) and ``mcb_grad`` is ignored.
        world: ``W > 1`` when the result is averaged over ``W`` data-parallel ranks that share
            ``running``: the clamp bound becomes ``clamp · ‖g‖ / W`` and ``W`` times the clamped
            projection is removed, so the average removes ``Σ_r clamp(P_r(running))``.

    Returns:
        The new running gradient (compute dtype) and diagnostics (None when nothing was
        accumulated yet, so nothing was projected).

    Non-finite values: when ``G``, ``r`` or ``‖g‖`` is not finite (a NaN or Inf in the
    microbatch or in ``running``), nothing is projected and the update is plain accumulation
    (``running + g``; with ``advantages``, ``running + Σ_i adv_i g_i``): the result is
    non-finite where plain accumulation's is (an Inf may come out as NaN). Decided on the
    device, with no host synchronisation; the eigensolver only ever sees finite input.
    """
    gram, inner = seq_grads.gram_and_inner(running)  # G_ij = ⟨g_i, g_j⟩, r_i = ⟨g_i, running⟩
    if advantages is None:
        mcb_norm = norm(mcb_grad)
        mcb_weights = None
    else:
        mcb_norm = (advantages @ (gram @ advantages)).clamp(min=0).sqrt()
        mcb_weights = advantages
    if running is None:
        if advantages is None:
            return mcb_grad, None
        return seq_grads.combine(advantages), None

    # Everything finite iff this sum is (x - x is 0 for finite x, NaN otherwise).
    total = gram.sum() + inner.sum() + mcb_norm
    finite = (total - total) == 0
    gram, inner = gram.nan_to_num(0.0, 0.0, 0.0), inner.nan_to_num(0.0, 0.0, 0.0)
    coeffs, proj_sq, rank = _span_coefficients(projection, gram, inner)
    proj_norm = proj_sq.clamp(min=0).sqrt()
    if clamp is None:
        scale = finite.double()
        clamped = torch.zeros_like(finite)
    else:
        bound = mcb_norm * (clamp / world)
        scale = torch.where(finite, (bound / proj_norm.clamp(min=1e-300)).clamp(max=1.0), 0.0)
        clamped = (proj_norm > bound) & finite
    # The weights of the g_i in complemented_acc_grad + mcb_policy_grad - running.
    weights = coeffs * (scale * (-world * strength))
    if mcb_weights is not None:
        weights += mcb_weights
    # Both combinations done in one pass.
    new = seq_grads.plus_combination(running, mcb_grad if advantages is None else None, weights)
    info = UpdateInfo(
        num_sequences=seq_grads.num_sequences,
        rank=rank,
        running_norm=norm(running),
        removed_norm=scale * proj_norm * (world * strength),
        clamped=clamped,
        mcb_norm=mcb_norm,
    )
    return new, info
