"""Brute-force reference for PROMA, written for clarity, and helpers to compare against it.

Per-sequence gradients come from one ``torch.autograd.grad`` call per sequence; PROMA is then
applied per tensor in float64, literally as the note writes it (figure 1, figure 3, and the
clamp of section 3). The fast path in :class:`proma_accum.ProjectedAccumulator` is tested
against this module.

Example::

    from proma_accum.testing import reference_accumulate, assert_grads_close

    expected = reference_accumulate(model, microbatches, sequence_losses, clamp=0.5)
    ...  # run the same microbatches through ProjectedAccumulator
    assert_grads_close(model, expected)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._numerics import RANK_RTOL

if TYPE_CHECKING:
    from ._accumulator import ProjectedAccumulator

__all__ = [
    "accumulate_proma_reference",
    "assert_grads_close",
    "per_sequence_gradients",
    "project_to_complement_v1",
    "project_to_complement_v2",
    "record_sequence_gradients",
    "reference_accumulate",
]

# Singular values below this fraction of the largest count as zero (the fast path thresholds
# the Gram eigenvalues at RANK_RTOL, the square of this).
SINGULAR_RTOL = RANK_RTOL**0.5


def project_to_complement_v1(acc_vec: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """Figure 3, v1: remove from ``acc_vec: (d,)`` its projection onto ``span(vecs: (d, k))``.

    An orthonormal basis of the span from the SVD of the normalised nonzero columns, keeping
    singular values above ``SINGULAR_RTOL`` of the largest: rank-revealing, unlike a plain QR.
    """
    norms = torch.linalg.vector_norm(vecs, dim=0)
    vecs = vecs[:, norms > 0] / norms[norms > 0]  # the span does not depend on the lengths
    if vecs.shape[1] == 0:
        return acc_vec.clone()
    u, s, _ = torch.linalg.svd(vecs, full_matrices=False)
    q = u[:, s > SINGULAR_RTOL * s.max()] if s.max() > 0 else u[:, :0]
    return acc_vec - q @ (q.T @ acc_vec)


def project_to_complement_v2(acc_vec: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """Figure 3, v2: two passes of Gram–Schmidt over the normalised columns of ``vecs``.

    Zero columns are skipped (the note's code would divide by zero).
    """
    acc_vec = acc_vec.clone()
    norms = torch.linalg.vector_norm(vecs, dim=0)
    units = [vecs[:, i] / norms[i] for i in range(vecs.shape[1]) if norms[i] > 0]
    for _ in range(2):
        for u in units:
            acc_vec -= torch.dot(acc_vec, u) * u
    return acc_vec


def accumulate_proma_reference(
    acc: torch.Tensor | None,
    mcb_grad: torch.Tensor,
    seq_grads: torch.Tensor,
    *,
    projection: str = "exact",
    clamp: float | None = 0.5,
    strength: float = 1.0,
) -> torch.Tensor:
    """Figure 1 with the clamp, for one tensor, in float64.

    Args:
        acc: running gradient (any shape), or None.
        mcb_grad: microbatch gradient, same shape.
        seq_grads: ``(k, *shape)`` sequence-wise gradients.

    Returns:
        ``acc − strength · clamp(proj_on_span) + mcb_grad``.
    """
    mcb = mcb_grad.double()
    if acc is None:
        return mcb.clone()
    shape = acc.shape
    acc_vec = acc.double().reshape(-1)
    vecs = seq_grads.double().reshape(seq_grads.shape[0], -1).T  # (d, k)
    if projection == "exact":
        complemented = project_to_complement_v1(acc_vec, vecs)
    elif projection == "gs2":
        complemented = project_to_complement_v2(acc_vec, vecs)
    else:
        raise ValueError(f"projection must be 'exact' or 'gs2', got {projection!r}")
    proj_on_span = acc_vec - complemented
    if clamp is not None:
        bound = clamp * mcb.norm()
        if proj_on_span.norm() > bound:
            proj_on_span = proj_on_span * bound / proj_on_span.norm()
    return (acc_vec - strength * proj_on_span).reshape(shape) + mcb


def per_sequence_gradients(
    losses: torch.Tensor, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """One ``autograd.grad`` per sequence: ``[(k, *p.shape)]`` in float64, zeros if unused.

    ``losses: (k,)`` holds each sequence's term of the loss (their sum is the loss).
    """
    per_param: list[list[torch.Tensor]] = [[] for _ in params]
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            per_param[j].append(
                torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
            )
    return [torch.stack(gs) for gs in per_param]


def reference_accumulate(
    model: nn.Module,
    microbatches: Iterable[Any],
    sequence_losses: Callable[[nn.Module, Any], torch.Tensor],
    *,
    projection: str = "exact",
    clamp: float | None = 0.5,
    strength: float = 1.0,
    advantages: Sequence[torch.Tensor] | None = None,
    projected: Iterable[str] | None = None,
    initial: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The accumulated gradient after PROMA over ``microbatches``, per parameter name (float64).

    Args:
        sequence_losses: ``f(model, microbatch) -> (k,)`` each sequence's loss term; in
            advantages mode, each sequence's unit-advantage term (e.g. minus its log-prob).
        advantages: per microbatch, ``(k,)`` aligned with ``sequence_losses``' output; the
            microbatch gradient is then ``Σ_i adv_i g_i``.
        projected: names of tensors PROMA projects (default: every trainable one); others
            accumulate plainly.
        initial: running gradients before the first microbatch (default: none).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    projected_set = set(names if projected is None else projected)
    acc: dict[str, torch.Tensor | None] = {
        n: None if initial is None or initial.get(n) is None else initial[n].double() for n in names
    }
    for m, mb in enumerate(microbatches):
        losses = sequence_losses(model, mb)
        seq = per_sequence_gradients(losses, params)
        if advantages is None:
            total = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            mcbs = [
                torch.zeros_like(p, dtype=torch.float64) if g is None else g.double()
                for p, g in zip(params, total, strict=True)
            ]
        else:
            adv = advantages[m].double()
            mcbs = [torch.tensordot(adv, s, dims=1) for s in seq]
        for n, s, mcb in zip(names, seq, mcbs, strict=True):
            if n in projected_set:
                acc[n] = accumulate_proma_reference(
                    acc[n], mcb, s, projection=projection, clamp=clamp, strength=strength
                )
            else:
                acc[n] = mcb if acc[n] is None else acc[n] + mcb
    return {n: a for n, a in acc.items() if a is not None}


def assert_grads_close(
    model: nn.Module,
    expected: dict[str, torch.Tensor],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """Assert ``p.grad ≈ expected[name]`` for every named parameter, tensor-wise.

    A tensor matches when ``‖grad − expected‖ ≤ atol + rtol · ‖expected‖``. Every mismatching
    parameter is reported by name with its relative error.
    """
    problems = []
    params = dict(model.named_parameters())
    for name, want in expected.items():
        got = params[name].grad
        if got is None:
            problems.append(f"{name}: grad is None")
            continue
        err = float((got.double() - want).norm())
        scale = float(want.norm())
        if not err <= atol + rtol * scale:
            problems.append(f"{name}: |err|={err:.3e}, |expected|={scale:.3e}")
    for name, p in params.items():
        if name not in expected and p.grad is not None and bool(p.grad.any()):
            problems.append(f"{name}: has a gradient the reference does not")
    if problems:
        raise AssertionError("gradients differ from the reference:\n  " + "\n  ".join(problems))


@contextlib.contextmanager
def record_sequence_gradients(
    acc: ProjectedAccumulator,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the per-sequence gradients the accumulator forms, to compare them with another
    source (one ``autograd.grad`` per sequence, Opacus's per-sample gradients, ...).

    Yields a dict filled during the backwards inside the context: for every projected tensor
    update, ``name → (k, *shape)`` float64 per-sequence gradients (sequences in order of first
    appearance in ``seq_ids``; rows no sequence touches are zero). A tensor updated again
    overwrites its entry. Plain accumulation (the first microbatch of a step, ``strength=0``)
    forms none.

    Example::

        with record_sequence_gradients(acc) as seq_grads:
            with acc.microbatch(seq_ids):
                loss.backward()
        seq_grads["proj.weight"]  # (k, out, in)
    """
    recorded: dict[str, torch.Tensor] = {}
    params = dict(acc.model.named_parameters())

    def observe(name: str, rows: slice | torch.Tensor, s: torch.Tensor) -> None:
        k = s.shape[0] - 1  # the last row holds tokens of no sequence
        full = recorded.get(name)
        if full is None or full.shape[0] != k:
            full = torch.zeros((k, *params[name].shape), dtype=torch.float64, device=s.device)
            recorded[name] = full
        full[:, rows] = s[:k].double()

    previous = acc._observer
    acc._observer = observe
    try:
        yield recorded
    finally:
        acc._observer = previous
