"""``nn.Linear``: ``y_t = W a_t + b``.

Per-sequence gradients, for sequence ``s`` with tokens ``t ∈ s``:
``g_s(W) = Σ_t b_t a_tᵀ`` (one batched GEMM over the tokens grouped by sequence) and
``g_s(bias) = Σ_t b_t``, with ``a_t`` the input and ``b_t`` the output gradient of token ``t``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._layout import padding_tokens, segment, segment_sum
from . import register
from ._base import Kernel, LayerUse, Rows, tokens


def outer_by_sequence(left: torch.Tensor, right: torch.Tensor, use: LayerUse) -> torch.Tensor:
    """``(k + 1, p, q)``: ``Σ_{t ∈ s} left_t right_tᵀ`` per sequence, padding tokens last.

    ``left: (N, p)``, ``right: (N, q)`` token rows; the result is a buffer of ``use.workspace``.
    """
    seg = use.seg
    k = seg.num_sequences
    out = use.empty(k + 1, left.shape[1], right.shape[1], dtype=left.dtype)
    torch.bmm(segment(left, seg).transpose(1, 2), segment(right, seg), out=out[:k])
    if seg.has_padding:
        torch.mm(padding_tokens(left, seg).T, padding_tokens(right, seg), out=out[k])
    else:
        out[k].zero_()
    return out


@register(nn.Linear)
class LinearKernel(Kernel):
    kind = "linear"
    fusable = True

    def input_grad(
        self, module: nn.Module, grad_out: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """``∂L/∂a_t = Wᵀ b_t``: ``(..., d_out) → (..., d_in)``."""
        return grad_out @ weight.to(grad_out.dtype)

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        b = tokens(use.grad_out, 1, dtype)[:, rows]
        if use.role == "bias":
            return segment_sum(b, use.seg)
        return outer_by_sequence(b, tokens(use.x, 1, dtype), use)
