"""What a covered layer records in a microbatch's forward, and what arrives for it in backward.

:func:`capture_forward` runs in the layer's forward hook. It keeps the layer's input and
registers a tensor hook on the output to receive the output gradient (the checked path) — or,
when the layer's per-sequence gradients fit the byte budget, returns the output through
:class:`~proma_accum._fused.SequenceGradientGEMM`, whose backward forms them once in place of
the weight-gradient GEMM (the fused path). Either way one :class:`Capture` per forward call
holds what the kernel needs.

The fused path drops nothing only when the output the hook sees is what the layer's class
computes from the input it saw: no instance ``forward`` patch, no global module hooks, no
forward hook running before ours, no forward pre-hook but FSDP2's and ours, no module backward
hooks (:func:`fused_blocker`). Otherwise the layer takes the checked path, whose per-sequence
gradients are always compared with autograd's. Output gradients are kept per graph task
(``_autograd``), so those of an ``autograd.grad`` call inside the microbatch are not counted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._autograd import (
    accumulate_node,
    global_module_hooks,
    graph_task_id,
    module_hooks,
    will_accumulate,
)
from ._distributed import is_fsdp_hook
from ._fused import SequenceGradientGEMM
from ._hooks import ModuleHook
from ._kernels import Kernel, LayerUse
from ._layout import SequenceLayout, ShapeMismatchError, TokenSegments
from ._workspace import Workspace


@dataclass
class Layer:
    """A covered layer: its name, kernel and covered parameters by role.

    ``fusable``: its weight gradient may be formed as the sum of per-sequence gradients by the
    fused backward (a GEMM kernel, every parameter of the layer projected).
    """

    name: str
    kernel: Kernel
    roles: dict[str, nn.Parameter]
    fusable: bool = False


@dataclass
class Capture:
    """One forward of a covered layer inside a microbatch.

    What arrives in backward is either the output gradient ``grad_out`` (checked path), or, on
    the fused path, the per-sequence gradients by role (``formed``) and the weight gradients
    handed to autograd (``returned``, their sums).
    """

    layer: Layer
    module: nn.Module
    seg: TokenSegments
    x: torch.Tensor | None  # None on the fused path: the autograd Function saved it
    cast: torch.dtype | None  # the autocast dtype the layer multiplied x in, if any
    workspace: Workspace
    grad_out: torch.Tensor | None = None
    formed: dict[str, torch.Tensor] = field(default_factory=dict)
    returned: dict[str, torch.Tensor] = field(default_factory=dict)
    task: int = -1  # the graph task grad_out / formed come from
    # Why the fused path was not taken although the layer is fusable (for error messages).
    checked_because: str | None = None
    closed: bool = False  # its microbatch context has exited

    @property
    def fused(self) -> bool:
        return self.x is None

    def has_gradient(self, role: str, task: int) -> bool:
        """Whether backward ``task`` reached this call (so ``role`` has per-sequence data)."""
        if self.task != task:
            return False
        return role in self.formed if self.fused else self.grad_out is not None

    def receive(self, grad: torch.Tensor) -> None:
        task = graph_task_id()
        if self.closed and task != self.task:
            params = self.layer.kernel.roles(self.module).values()
            if any(will_accumulate(accumulate_node(p)) for p in params if p.requires_grad):
                raise self.closed_error()
            return  # autograd.grad after the context: nothing of the microbatch's
        if task != self.task:  # another backward or autograd.grad call: start afresh
            self.task, self.grad_out = task, None
        self.grad_out = grad if self.grad_out is None else self.grad_out + grad

    def closed_error(self) -> RuntimeError:
        return RuntimeError(
            f"a backward reached layer '{self.layer.name}' through a forward that ran inside "
            "acc.microbatch(...), after its acc.microbatch(...) context exited: that microbatch "
            "can no longer be projected (and would be accumulated plainly). Call backward() "
            "inside the context."
        )

    def use(self, role: str, x: torch.Tensor | None = None) -> LayerUse:
        """The kernel's argument for ``role`` (``x``: the input, when the fused backward has it)."""
        x = self.x if x is None else x
        assert x is not None and self.grad_out is not None
        x = x if self.cast is None else x.to(self.cast)
        return LayerUse(self.module, role, x, self.grad_out, self.seg, self.workspace)

    def input_dtypes(self) -> list[torch.dtype | None]:
        """The dtypes the layer multiplied in (for the consistency check's tolerance)."""
        return [self.cast, None if self.x is None else self.x.dtype]


def fits_budget(layer: Layer, num_sequences: int, chunk_bytes: int) -> bool:
    """Whether ``(k + 1) ×`` the layer's covered parameters fit one chunk (the fused path)."""
    size = sum(
        p.numel() * torch.promote_types(p.dtype, torch.float32).itemsize
        for p in layer.roles.values()
    )
    return (num_sequences + 1) * size <= chunk_bytes


def _raise(error: BaseException, grad: torch.Tensor) -> None:
    raise error


def fused_blocker(module: nn.Module) -> str | None:
    """Why the output our forward hook sees may not be what the layer's class computes from the
    input it saw (so the fused path, which replaces the output's graph, is not safe), or None."""
    if "forward" in module.__dict__:
        return "a patched instance forward"
    blockers = global_module_hooks()
    if blockers:
        return blockers[0]
    forward, pre, backward = module_hooks(module)
    if forward and not isinstance(forward[0], ModuleHook):
        return "a forward hook that runs before PROMA's (prepend=True)"
    if any(not isinstance(h, ModuleHook) and not is_fsdp_hook(h) for h in pre):
        return "a forward pre-hook"
    if backward:
        return "a module backward hook"
    return None


def capture_forward(
    layer: Layer,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    output: torch.Tensor,
    layout: SequenceLayout,
    workspace: Workspace,
    chunk_bytes: int,
    need_data: bool,
) -> tuple[Capture | None, Any]:
    """Record one forward of ``layer``; returns ``(capture, output to hand on)``.

    ``capture`` is None when the input cannot be split by sequence; the error is then raised
    only if this output gets a gradient (inside the backward, so the microbatch still fails and
    restores ``p.grad``): a call whose result never reaches the loss, like PEFT's DoRA norm on an
    identity matrix, needs no sequence split. ``capture`` is also None without ``need_data``
    (plain accumulation). The output to hand on is None (unchanged) except on the fused path.
    """
    kernel = layer.kernel
    x = kernel.saved_input(args, kwargs)
    try:
        seg = layout.token_segments(kernel.lead_shape(module, x), layer.name)
    except ShapeMismatchError as error:
        output.register_hook(functools.partial(_raise, error))
        return None, None
    if not need_data:
        return None, None
    cast = None
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        # The layer multiplied the autocast-dtype copy of x: use the same values.
        cast = torch.get_autocast_dtype(device_type)
    blocker = None
    if layer.fusable and fits_budget(layer, layout.num_sequences, chunk_bytes):
        blocker = fused_blocker(module)
        if blocker is None:
            capture = Capture(layer, module, seg, None, cast, workspace)
            roles = tuple(layer.roles)
            current = kernel.roles(module)  # under FSDP2: the unsharded copies
            params = [current[r] for r in roles]
            return capture, SequenceGradientGEMM.apply(x, *params, output, (capture, roles))
    capture = Capture(layer, module, seg, x, cast, workspace, checked_because=blocker)
    output.register_hook(capture.receive)
    return capture, None
