"""Weight gradients *as* the sum of per-sequence gradients, for GEMM layers (Linear, Conv1D).

Plain autograd forms a Linear layer's weight gradient ``Σ_t b_t a_tᵀ`` with one GEMM; the
per-sequence gradients ``g_s = Σ_{t ∈ s} b_t a_tᵀ`` cost one more GEMM of the same size. When a
layer's per-sequence gradients fit the byte budget, its forward hook instead returns the layer's
output through :class:`SequenceGradientGEMM`, whose backward computes the input gradient, forms
the per-sequence gradients once, hands them to the capture, and returns their sum as the weight
gradient. The layer's own weight-gradient GEMM is not run: the layer's output is an input of the
Function that gets no gradient, so its node runs with none and computes nothing.

Only a backward that accumulates into the weight's ``.grad`` takes that route. In any other
graph task (``torch.autograd.grad``, a ``backward(inputs=...)`` that does not reach the weight)
the output gradient is handed to the layer's own graph instead, so the result is bitwise what
it is without the accumulator, and differentiable under ``create_graph=True``.

Inputs are saved with ``ctx.save_for_backward``, so activation checkpointing treats them like
any other saved tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from ._autograd import accumulate_node, graph_task_id, will_accumulate


def create_graph_error() -> RuntimeError:
    return RuntimeError(
        "backward(create_graph=True) inside acc.microbatch(...) is not supported: PROMA's "
        "update of p.grad is not differentiable. Differentiate gradients with "
        "torch.autograd.grad(..., create_graph=True), which leaves p.grad alone, and call a "
        "plain backward() for the microbatch."
    )


class SequenceGradientGEMM(torch.autograd.Function):
    """Identity on the layer output; backward = input gradient + per-sequence weight gradients.

    ``forward(x, *params, output, (capture, roles))`` returns ``output`` (already computed by
    the layer). ``params`` follow ``roles``; ``capture`` (a ``_capture.Capture``) receives the
    per-sequence gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        *params, output, (capture, roles) = args
        ctx.capture, ctx.roles = capture, roles
        ctx.weight = params[roles.index("weight")]  # the leaf whose accumulation is asked about
        ctx.save_for_backward(x, *params)
        return output.detach()  # a new tensor object, sharing the output's memory

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        capture = ctx.capture
        weight = params[ctx.roles.index("weight")]
        if not will_accumulate(accumulate_node(ctx.weight)):
            # autograd.grad & co.: the layer's own backward, exactly as without the accumulator
            return (None, *(None for _ in params), grad_out, None)
        if capture.closed:
            raise capture.closed_error()
        if torch.is_grad_enabled():
            raise create_graph_error()
        capture.task = graph_task_id()
        kernel, module = capture.layer.kernel, capture.module
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = kernel.input_grad(module, grad_out, weight)
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
        return (grad_x, *grads, None, None)
