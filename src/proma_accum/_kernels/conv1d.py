"""transformers' ``Conv1D`` (GPT-2): ``y_t = a_t W + b`` with ``W: (d_in, d_out)``.

The transpose of ``nn.Linear``: ``g_s(W) = Σ_{t ∈ s} a_t b_tᵀ`` and ``g_s(bias) = Σ_{t ∈ s} b_t``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._layout import segment_sum
from . import register
from ._base import Kernel, LayerUse, Rows, tokens
from .linear import outer_by_sequence


@register("transformers.pytorch_utils.Conv1D")
class Conv1DKernel(Kernel):
    kind = "conv1d"
    fusable = True

    def input_grad(
        self, module: nn.Module, grad_out: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """``∂L/∂a_t = W b_t``: ``(..., d_out) → (..., d_in)``."""
        return grad_out @ weight.to(grad_out.dtype).T

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        b = tokens(use.grad_out, 1, dtype)
        if use.role == "bias":
            return segment_sum(b[:, rows], use.seg)
        return outer_by_sequence(tokens(use.x, 1, dtype)[:, rows], b, use)
