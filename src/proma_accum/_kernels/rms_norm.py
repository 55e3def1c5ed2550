"""RMS normalisation, ``x̂ = x / sqrt(mean(x²) + eps)``: ``nn.RMSNorm`` and the HF classes.

The HF classes (Qwen3, Qwen2, Llama, Mistral) compute ``x̂`` in float32 and cast it back to the
input dtype before scaling by the weight; the kernel does the same so bf16 results match.
Gemma-style ``(1 + w)`` variants are *not* registered: their math differs.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register
from ._norm import AffineNormKernel


@register(nn.RMSNorm)
class RMSNormKernel(AffineNormKernel):
    kind = "rms_norm"
    per_token_rounding = True  # w ⊙ x̂ in the layer's dtype, token by token

    def feature_dims(self, module: nn.Module) -> int:
        return len(module.normalized_shape)

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(module.normalized_shape), 0))
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


@register(
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
)
class HFRMSNormKernel(AffineNormKernel):
    kind = "rms_norm"
    per_token_rounding = True  # w ⊙ x̂ after casting x̂ back to the input dtype

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return xf.to(x.dtype)
