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

from ._numerics import UnitGram, kept_eigenvalues, norm, normalized_gram

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
    ``u_i = g_i / ‖g_i‖``: ``α = Ĝ⁺ r̂`` with the pseudo-inverse over the eigenvalues of ``Ĝ``
    above ``RANK_RTOL · λ_max``, ``r̂_i = ⟨u_i, running⟩`` and ``c_i = α_i / ‖g_i‖``. Duplicate,
    linearly dependent and zero sequence gradients are fine.
    """
    unit = normalized_gram(gram)
    eigh = torch.linalg.eigh(unit.gram)
    return _coefficients_exact(unit, eigh, kept_eigenvalues(eigh[0]), inner)[0]


def _coefficients_exact(
    unit: UnitGram,
    eigh: tuple[torch.Tensor, torch.Tensor],
    kept: torch.Tensor,
    inner: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, ‖P(running)‖²)``: ``α = V Λ⁺ Vᵀ r̂``, and ``‖Σ c_i g_i‖² = r̂ᵀ Ĝ⁺ r̂``, which is
    ``(Vᵀr̂)ᵀ Λ⁺ (Vᵀr̂)``."""
    eigval, eigvec = eigh
    inv = torch.where(kept, eigval.reciprocal(), 0.0)
    rotated = eigvec.T @ (inner * unit.inv_norms)
    scaled = inv * rotated
    return (eigvec @ scaled) * unit.inv_norms, rotated @ scaled


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
    """``(c, ‖Σ c_i g_i‖², dim span(g))`` for ``SPAN_COEFFICIENTS[projection]``, with one
    eigendecomposition of ``Ĝ`` serving the coefficients and the rank."""
    unit = normalized_gram(gram)
    if projection == "exact":
        eigh = torch.linalg.eigh(unit.gram)
        kept = kept_eigenvalues(eigh[0])
        coeffs, proj_sq = _coefficients_exact(unit, eigh, kept, inner)
        return coeffs, proj_sq, kept.sum()
    eigval = torch.linalg.eigvalsh(unit.gram)
    coeffs = _coefficients_gs2(unit, inner)
    return coeffs, coeffs @ (gram @ coeffs), kept_eigenvalues(eigval).sum()


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
