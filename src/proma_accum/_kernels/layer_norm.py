"""``nn.LayerNorm``: ``x̂ = (x − mean) / sqrt(var + eps)`` over the normalised dims."""

from __future__ import annotations

import torch
from torch import nn

from . import register
from ._norm import AffineNormKernel


@register(nn.LayerNorm)
class LayerNormKernel(AffineNormKernel):
    kind = "layer_norm"
    low_precision_accumulation = True

    def feature_dims(self, module: nn.Module) -> int:
        return len(module.normalized_shape)

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(module.normalized_shape), 0))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = xf.mean(dims, keepdim=True)
        var = xf.var(dims, unbiased=False, keepdim=True)
        return (xf - mean) * torch.rsqrt(var + module.eps)
