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

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch

from ._numerics import RANK_RTOL, UnitGram, norm, normalized_gram, sq_norm

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
    ``(Ĝ + εI)⁻¹`` plus one step of iterative refinement, ``ε = RANK_RTOL · k / 100``, and
    ``c_i = α_i / ‖g_i‖``. In ``Ĝ``'s eigenbasis this projects each direction of the span with
    weight ``1 − (ε / (λ + ε))²``: fully (to ``1e-4``) above the rank cut ``λ > RANK_RTOL · k``
    (``k ≥ tr Ĝ ≥ λ_max``), not at all when ``λ ≪ ε`` (duplicate sequences, rounding noise) —
    an eigendecomposition's rank cut, made smooth and sync-free. Duplicate, linearly dependent
    and zero sequence gradients are fine.
    """
    return _coefficients("exact", normalized_gram(gram), inner)[0]


def span_coefficients_gs2(gram: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``c`` with ``Σ c_i g_i`` what the note's ``project_to_complement_v2`` removes.

    Two passes of ``for u in U: running -= ⟨running, u⟩ u`` over the normalised
    ``u_i = g_i / ‖g_i‖``. One pass is one forward Gauss–Seidel sweep on ``Ĝ α = r̂`` (``Ĝ`` the
    Gram of the ``u_i``, ``r̂_i = ⟨u_i, running⟩``): ``(I + L) α = r̂`` with ``L`` the strictly
    lower part of ``Ĝ``. Zero sequence gradients are skipped (the note's code would divide by
    zero).
    """
    return _coefficients("gs2", normalized_gram(gram), inner)[0]


def _eye(k: int, device: torch.device, scale: float) -> torch.Tensor:
    """``scale · I`` of size ``k`` (float64), made once per size and device (inside a compiled
    graph: made there, fused into its kernels)."""
    if torch.compiler.is_compiling():
        return scale * torch.eye(k, dtype=torch.float64, device=device)
    key = (k, device, scale)
    eye = _EYES.get(key)
    if eye is None:
        eye = _EYES[key] = scale * torch.eye(k, dtype=torch.float64, device=device)
    return eye


_EYES: dict[tuple[int, torch.device, float], torch.Tensor] = {}


def _coefficients(
    projection: Projection, unit: UnitGram, inner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c, ‖Σ c_i g_i‖², pivots)`` of :func:`span_coefficients_exact` or
    :func:`span_coefficients_gs2`; ``pivots`` is the diagonal of the Cholesky factor of
    ``Ĝ + εI``, whose squares above ``101 ε`` count the rank (:func:`rank_of`).

    The regularised factor comes from ``cholesky_ex`` (no error check, so no host
    synchronisation; ``Ĝ`` is formed from exact products, its eigenvalues err by ~1e-16, so
    ``Ĝ + εI`` is positive definite). Both solves are backward stable (no explicit inverse).
    """
    k = inner.shape[0]
    eps = _eye(k, inner.device, _EPS_PER_SEQUENCE * k)
    factor = torch.linalg.cholesky_ex(unit.gram + eps).L
    rhs = (inner * unit.inv_norms)[:, None]  # r̂
    if projection == "exact":
        alpha = torch.cholesky_solve(rhs, factor)
        # One step of refinement against the unregularised Ĝ (the weight 1 − (ε/(λ+ε))²).
        alpha = alpha + torch.cholesky_solve(rhs - unit.gram @ alpha, factor)
    else:
        sweep = unit.gram.tril(-1) + _eye(k, inner.device, 1.0)  # I + L
        alpha = torch.linalg.solve_triangular(sweep, rhs, upper=False)  # 1st pass
        alpha = alpha + torch.linalg.solve_triangular(sweep, rhs - unit.gram @ alpha, upper=False)
    alpha = alpha[:, 0]
    proj_sq = alpha @ (unit.gram @ alpha)
    return alpha * unit.inv_norms, proj_sq, factor.diagonal()


# ε of the regularised solve per sequence: RANK_RTOL · k / 100 in all.
_EPS_PER_SEQUENCE = RANK_RTOL / 100


def rank_of(diagonals: torch.Tensor) -> torch.Tensor:
    """The dimension of ``span(g)`` from the Cholesky factors' diagonals ``(..., k)``: how many
    ``u_j`` lie farther than the rank cut from the span of ``u_1 .. u_{j-1}``. Cholesky's
    pivots are those squared distances (plus ``ε``): ``L_jj² − ε > RANK_RTOL · k = 100 ε``.
    (The count of such ``j`` is the rank, whatever the order, up to directions at the cut
    itself.)"""
    eps = _EPS_PER_SEQUENCE * diagonals.shape[-1]
    return (diagonals.square() > 101 * eps).sum(-1)


SPAN_COEFFICIENTS = {"exact": span_coefficients_exact, "gs2": span_coefficients_gs2}


@dataclass
class UpdateInfo:
    """Diagnostics of one tensor's update, as 0-d device tensors (no host sync needed).

    Kept raw (what the update computed anyway) and combined when read: the statistics of a
    microbatch are formed for all its tensors at once (``_stats``).
    """

    num_sequences: int
    pivots: torch.Tensor  # (k,): diagonal of the regularised Cholesky factor (see rank_of)
    running_sq: torch.Tensor  # ‖running‖²
    proj_norm: torch.Tensor  # ‖P_span(running)‖ (the projection before the clamp)
    scale: torch.Tensor | float  # the clamp's factor in [0, 1] (1.0: no clamp)
    bound: torch.Tensor | float  # the clamp bound (inf: no clamp)
    finite: torch.Tensor  # whether the inputs were finite (else: plain accumulation)
    removed_factor: float  # world · strength: the removed norm is removed_factor · scale · proj

    @property
    def rank(self) -> torch.Tensor:
        return torch.where(self.finite, rank_of(self.pivots), 0)

    @property
    def running_norm(self) -> torch.Tensor:
        return self.running_sq.sqrt()

    @property
    def removed_norm(self) -> torch.Tensor:
        """``‖removed‖``: the clamped, strength-scaled projection taken off ``running``."""
        return torch.where(self.finite, self.scale * self.proj_norm * self.removed_factor, 0.0)

    @property
    def clamped(self) -> torch.Tensor:
        """True when the projection was longer than the clamp bound (and was scaled to it)."""
        return (self.proj_norm > self.bound) & self.finite


class Weights(NamedTuple):
    """What :func:`update_weights` solved (device tensors; floats when there is no clamp)."""

    weights: torch.Tensor  # (k,): w with Σ_i w_i g_i = −world · strength · clamp(P(running))
    proj_norm: torch.Tensor  # ‖P_span(running)‖, before the clamp
    scale: torch.Tensor | float  # the clamp's factor min(1, bound / ‖P‖) (1.0: no clamp)
    bound: torch.Tensor | float  # the clamp bound (inf: no clamp)
    finite: torch.Tensor  # whether the inputs were finite (if not, w = 0)
    pivots: torch.Tensor  # (k,): for rank_of


def update_weights(
    gram: torch.Tensor,
    inner: torch.Tensor,
    mcb_norm: torch.Tensor,
    *,
    projection: Projection,
    relative_bound: float | None,
    removed_factor: float,
) -> Weights:
    """Figure 1's ``k × k`` part: the weights ``w`` of the ``g_i`` in the removed part
    ``Σ_i w_i g_i = −removed_factor · clamp(P_span(running))``.

    Args:
        gram: ``G: (k, k)``, ``inner``: ``r: (k,)``, ``mcb_norm``: ``‖g‖`` (0-d), all float64.
        relative_bound: the clamp bound over ``‖g‖`` (None: no clamp).
        removed_factor: ``world · strength``.

    Non-finite inputs make the coefficients NaN, so the weights are selected, not scaled, away
    (``w = 0``: plain accumulation).
    """
    # Everything finite iff this sum is (x - x is 0 for finite x, NaN otherwise).
    total = gram.sum() + inner.sum() + mcb_norm
    finite = (total - total) == 0
    coeffs, proj_sq, pivots = _coefficients(projection, normalized_gram(gram), inner)
    proj_norm = proj_sq.clamp(min=0).sqrt()
    if relative_bound is None:
        weights = coeffs * -removed_factor
        scale: torch.Tensor | float = 1.0
        bound: torch.Tensor | float = math.inf
    else:
        bound = mcb_norm * relative_bound
        scale = (bound / proj_norm.clamp(min=1e-300)).clamp(max=1.0)
        weights = coeffs * (scale * -removed_factor)
    weights = torch.where(finite, weights, 0.0)
    return Weights(weights, proj_norm, scale, bound, finite, pivots)


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
    compile: bool = False,
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
        compile: run the update as ``torch.compile``'d code (``_compiled``): the passes and
            the algebra in one function when ``seq_grads.whole()`` gives all of ``S``, else
            the algebra alone; eager under a ``TorchDispatchMode``.

    Returns:
        The new running gradient (compute dtype) and diagnostics (None when nothing was
        accumulated yet, so nothing was projected).

    Non-finite values: when ``G``, ``r`` or ``‖g‖`` is not finite (a NaN or Inf in the
    microbatch or in ``running``), nothing is projected and the update is plain accumulation
    (``running + g``; with ``advantages``, ``running + Σ_i adv_i g_i``): the result is
    non-finite where plain accumulation's is (an Inf may come out as NaN). Decided on the
    device, with no host synchronisation (the factorisation may see the non-finite values:
    ``cholesky_ex`` does not raise, and the weights it gives are selected away).
    """
    removed_factor = world * strength
    relative_bound = None if clamp is None else clamp / world
    settings = (projection, relative_bound, removed_factor)
    whole = getattr(seq_grads, "whole", None)
    compiled = None
    if compile:
        from . import _compiled  # it compiles this module's functions

        compiled = _compiled.compiler(*settings, mcb_grad.device)
    if compiled is not None and running is not None and advantages is None and whole is not None:
        # One compiled function for the passes and the algebra, when one chunk holds S.
        s = whole()
        if s is not None:
            dense = compiled(_compiled.dense_update)  # type: ignore[union-attr]
            new, solved, running_sq = dense(s, running.reshape(-1), mcb_grad.reshape(-1))
            return new.view(running.shape), _info(seq_grads, solved, running_sq, removed_factor)

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

    if compiled is not None:
        solved = compiled(update_weights)(gram, inner, mcb_norm)
    else:
        solved = update_weights(
            gram,
            inner,
            mcb_norm,
            projection=projection,
            relative_bound=relative_bound,
            removed_factor=removed_factor,
        )
    weights = solved.weights
    if mcb_weights is not None:
        weights = weights + mcb_weights
    # Both combinations done in one pass.
    new = seq_grads.plus_combination(running, mcb_grad if advantages is None else None, weights)
    return new, _info(seq_grads, solved, sq_norm(running), removed_factor)


def _info(
    seq_grads: SequenceGradients, solved: Weights, running_sq: torch.Tensor, removed_factor: float
) -> UpdateInfo:
    return UpdateInfo(
        num_sequences=seq_grads.num_sequences,
        pivots=solved.pivots,
        running_sq=running_sq,
        proj_norm=solved.proj_norm,
        scale=solved.scale,
        bound=solved.bound,
        finite=solved.finite,
        removed_factor=removed_factor,
    )
