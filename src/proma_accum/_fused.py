"""Weight gradients *as* the sum of per-sequence gradients, for GEMM layers (Linear, Conv1D).

Plain autograd forms a Linear layer's weight gradient ``Σ_t b_t a_tᵀ`` with one GEMM; the
per-sequence gradients ``g_s = Σ_{t ∈ s} b_t a_tᵀ`` cost one more GEMM of the same size. When a
layer's per-sequence gradients fit the byte budget, its forward hook instead returns the layer's
output through :class:`SequenceGradientGEMM`, whose backward computes the input gradient, forms
the per-sequence gradients once, hands them to the capture, and returns their sum as the weight
gradient. The layer's own weight-gradient GEMM is never run (its graph node is dropped with the
original output). Inputs are saved with ``ctx.save_for_backward``, so activation checkpointing
treats them like any other saved tensor.
"""

from __future__ import annotations

from typing import Any

import torch


class SequenceGradientGEMM(torch.autograd.Function):
    """Identity on the layer output; backward = input gradient + per-sequence weight gradients.

    ``forward(x, *params, (output, capture, roles))`` returns ``output`` (already computed by the
    layer). ``params`` follow ``roles``; ``capture`` (a ``_capture.Capture``) receives the
    per-sequence gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        *params, (output, capture, roles) = args
        ctx.capture, ctx.roles = capture, roles
        ctx.save_for_backward(x, *params)
        return output.detach()  # a new tensor object; the layer's own graph is dropped

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        capture = ctx.capture
        kernel, module = capture.layer.kernel, capture.module
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = kernel.input_grad(module, grad_out, params[ctx.roles.index("weight")])
            grad_x = grad_x.to(x.dtype)
        capture.receive(grad_out)
        grads = []
        for role, p in zip(ctx.roles, params, strict=True):
            dtype = torch.promote_types(p.dtype, torch.float32)
            s = kernel.seq_grads(capture.use(role, x), slice(None), dtype)
            capture.workspace.formed(s)
            capture.formed[role] = s
            capture.returned[role] = s.sum(0).to(p.dtype)
            grads.append(capture.returned[role])
        capture.grad_out = None  # not needed any more: the per-sequence gradients are formed
        return (grad_x, *grads, None)
