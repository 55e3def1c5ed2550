"""``compile=True``: the update as ``torch.compile``'d code.

The compiled functions (dynamic shapes: one graph serves every ``k`` and every tensor size):

* :func:`~proma_accum._proma.update_weights`, the ``k × k`` algebra: ~30 kernels eager, four
  fused kernels around the Cholesky factorisation, two ``cholesky_solve`` and one GEMM
  compiled;
* :func:`dense_update`, the passes of the device precision policy and the algebra together, for
  a tensor whose per-sequence gradients ``S`` are formed whole and need no consistency check.

``torch.compile`` does not run under a ``TorchDispatchMode`` (a FLOP counter, a memory tracker):
:func:`compiler` then returns None and the update runs eagerly.

Two functions are compiled once per process (for each projection, clamp on or off, and input
dtypes); the clamp bound and the removed factor (``world · strength``) are tensor inputs, so a
changed setting runs the same graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._proma import Projection, Weights, update_weights

_CACHE: dict[tuple, Callable[..., Any]] = {}
_NUMBERS: dict[tuple[float, torch.device], torch.Tensor] = {}
# Variants of the one graph function: update_weights or dense_update, projection, clamp on or
# off, the input dtypes. (torch's default of 8 per code object would end in a hard error.)
_RECOMPILE_LIMIT = 64


def compiler(
    projection: Projection,
    relative_bound: float | None,
    removed_factor: float,
    device: torch.device,
) -> Callable[[Callable[..., Any]], Callable[..., Any]] | None:
    """``fn -> (*tensors -> fn(*tensors, projection=..., relative_bound=...,
    removed_factor=...))`` compiled (``fullgraph=True``, dynamic shapes), or None under a
    ``TorchDispatchMode``.

    The projection and whether there is a clamp are constants of the graph; the two numbers are
    passed as 0-d float64 tensors on ``device`` (made once per value), so changing the clamp
    or the strength does not compile again, and no host value is read on a call.
    """
    if _get_current_dispatch_mode() is not None:
        return None
    numbers = [removed_factor] if relative_bound is None else [relative_bound, removed_factor]
    scalars = [_number(v, device) for v in numbers]

    def use(fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled = _compiled(fn, projection, relative_bound is not None)
        return lambda *tensors: compiled(*tensors, *scalars)

    return use


def _number(value: float, device: torch.device) -> torch.Tensor:
    key = (value, device)
    if key not in _NUMBERS:
        if len(_NUMBERS) >= 256:  # e.g. a strength schedule: keep the cache small
            _NUMBERS.clear()
        # A fill kernel, not a host-to-device copy (which synchronises on CUDA).
        _NUMBERS[key] = torch.full((), value, dtype=torch.float64, device=device)
    return _NUMBERS[key]


def _compiled(fn: Callable[..., Any], projection: Projection, clamped: bool) -> Callable[..., Any]:
    key = (fn, projection, clamped)
    if key not in _CACHE:

        def graph(*args: torch.Tensor) -> Any:
            if clamped:
                *tensors, relative_bound, removed_factor = args
            else:
                (*tensors, removed_factor), relative_bound = args, None
            return fn(
                *tensors,
                projection=projection,
                relative_bound=relative_bound,
                removed_factor=removed_factor,
            )

        compiled = torch.compile(graph, fullgraph=True, dynamic=True)

        def call(*args: torch.Tensor) -> Any:
            with torch._dynamo.config.patch(
                recompile_limit=_RECOMPILE_LIMIT, specialize_float=True
            ):
                return compiled(*args)

        _CACHE[key] = call
    return _CACHE[key]


def dense_update(
    s: torch.Tensor,
    running: torch.Tensor,
    mcb_grad: torch.Tensor,
    *,
    projection: Projection,
    relative_bound: float | None,
    removed_factor: float,
) -> tuple[torch.Tensor, Weights, torch.Tensor]:
    """The whole update from ``S: (k + 1, n)`` (row ``k``: the tokens of no sequence) and the
    flat ``running`` and ``mcb_grad`` (``(n,)``): ``(new running gradient, solved, ‖running‖²)``.

    The passes of the device precision policy (products in float64) and
    :func:`update_weights` in one function, for ``torch.compile`` to fuse: the float64 copy,
    the Gram GEMM, the inner products and norms, the ``k × k`` algebra, and the combination
    ``running + mcb_grad + Σ_i w_i g_i`` in one pass.
    """
    k = s.shape[0] - 1
    seqs = s[:k].to(torch.float64)
    running64 = running.to(torch.float64)
    gram, inner = seqs @ seqs.T, seqs @ running64
    mcb_norm = torch.linalg.vector_norm(mcb_grad, dtype=torch.float64)
    solved = update_weights(
        gram,
        inner,
        mcb_norm,
        projection=projection,
        relative_bound=relative_bound,
        removed_factor=removed_factor,
    )
    base = running.to(s.dtype) + mcb_grad.to(s.dtype)
    new = (base + solved.weights @ seqs).to(s.dtype)
    return new, solved, running64 @ running64
