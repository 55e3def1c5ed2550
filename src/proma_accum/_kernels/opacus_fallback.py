"""Layer kinds without a native kernel: per-sample gradients from Opacus's grad samplers.

Opacus (``opacus.grad_sample``) registers a grad sampler ``f(layer, activations, backprops) ->
{parameter: (B, *parameter.shape)}`` per layer type; with ``backprops`` the gradient of the
layer's output under a *sum* loss, ``f`` returns each batch row's gradient. When each row is
one sequence (``seq_ids`` of shape ``(B,)``), the per-sequence gradients are those rows summed
by sequence id. With per-token ids (packed rows) a row is no sequence, and these tensors are
accumulated plainly in that microbatch (see ``ProjectedAccumulator.unprojected_parameters``).

Only kinds whose sampler needs nothing but the module's first input, with the batch dim first,
are taken (:data:`SOUND_KINDS`): convolutions, group and instance norms. Opacus's other
samplers are left out for a reason each: ``EmbeddingBag`` needs its offsets (a second input),
``DPMultiheadAttention``'s ``SequenceBias`` has the batch in dim 1, ``RNNLinear`` is called
per time step inside Opacus's own RNNs. Linear, Embedding, LayerNorm and RMSNorm have native
kernels, which also handle packed rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._layout import segment_sum
from ._base import Kernel, LayerUse, Rows

SOUND_KINDS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)

_CACHE: dict[type, Kernel | None] = {}


class OpacusKernel(Kernel):
    """Per-sequence gradients from an Opacus grad sampler, one sequence per row."""

    kind = "opacus"
    rows_only = True

    def __init__(self, sampler: Callable) -> None:
        self.sampler = sampler

    def lead_shape(self, module: nn.Module, x: torch.Tensor) -> torch.Size:
        return x.shape[:1]  # one sample per row; the rest is the layer's own dims

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        param = getattr(use.module, use.role)
        x, b = use.x.to(dtype), use.grad_out.to(dtype)
        per_sample = self.sampler(use.module, [x], b)[param]  # (B, *shape)
        flat = per_sample.to(dtype).reshape(per_sample.shape[0], -1)
        per_seq = segment_sum(flat, use.seg).view(-1, *param.shape)
        return per_seq[:, rows]


def fallback_for(cls: type) -> Kernel | None:
    """An :class:`OpacusKernel` for ``cls`` if it is one of :data:`SOUND_KINDS` and Opacus has
    a grad sampler for it (exact type, as Opacus looks samplers up)."""
    if cls in _CACHE:
        return _CACHE[cls]
    kernel = None
    if cls in SOUND_KINDS:
        from opacus.grad_sample import GradSampleModule  # imported once a model needs it

        sampler = GradSampleModule.GRAD_SAMPLERS.get(cls)
        kernel = None if sampler is None else OpacusKernel(sampler)
    _CACHE[cls] = kernel
    return kernel
