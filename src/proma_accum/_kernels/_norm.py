"""Shared part of normalisation layers with an elementwise affine ``y = w ⊙ x̂ (+ β)``.

``g_s(w) = Σ_{t ∈ s} b_t ⊙ x̂_t`` and ``g_s(β) = Σ_{t ∈ s} b_t``, with ``x̂_t`` the normalised
input recomputed from the saved input exactly as the layer computes it.
"""

from __future__ import annotations

import torch
from torch import nn

from .._layout import segment_sum
from ._base import Kernel, LayerUse, Rows, tokens


class AffineNormKernel(Kernel):
    def feature_dims(self, module: nn.Module) -> int:
        return 1

    def normalized(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lead_shape(self, module: nn.Module, x: torch.Tensor) -> torch.Size:
        return x.shape[: x.dim() - self.feature_dims(module)]

    def _contributions(self, use: LayerUse, dtype: torch.dtype) -> torch.Tensor:
        """``c_t``: ``b_t ⊙ x̂_t`` (weight) or ``b_t`` (bias), ``(N, features)``."""
        module = use.module
        features = self.feature_dims(module)
        b = tokens(use.grad_out, features, dtype)
        if use.role == "weight":
            b = b * tokens(self.normalized(module, use.x), features, dtype)
        return b

    def contribution_norm_sum(self, use: LayerUse) -> torch.Tensor:
        c = self._contributions(use, torch.float32)
        return torch.linalg.vector_norm(c, dim=1, dtype=torch.float64).sum()

    def contribution_sq_norm_sum(self, use: LayerUse) -> torch.Tensor:
        c = self._contributions(use, torch.float32)
        return torch.linalg.vector_norm(c, dtype=torch.float64).square()

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        module = use.module
        b = self._contributions(use, dtype)
        shape = module.weight.shape if use.role == "weight" else module.bias.shape
        per_seq = segment_sum(b, use.seg).view(-1, *shape)
        return per_seq[:, rows]
