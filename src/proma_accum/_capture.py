"""What a covered layer records in a microbatch's forward, and what arrives for it in backward.

:func:`capture_forward` runs in the layer's forward hook. It keeps the layer's input and
registers a tensor hook on the output to receive the output gradient (the checked path) — or,
when the layer's per-sequence gradients fit the byte budget, returns the output through
:class:`~proma_accum._fused.SequenceGradientGEMM`, whose backward forms them once in place of
the weight-gradient GEMM (the fused path). Either way one :class:`Capture` per forward call
holds what the kernel needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._fused import SequenceGradientGEMM
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

    @property
    def fused(self) -> bool:
        return self.x is None

    def has_gradient(self, role: str) -> bool:
        """Whether the backward reached this call (so ``role`` has per-sequence data)."""
        return role in self.formed if self.fused else self.grad_out is not None

    def receive(self, grad: torch.Tensor) -> None:
        self.grad_out = grad if self.grad_out is None else self.grad_out + grad

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
    if layer.fusable and fits_budget(layer, layout.num_sequences, chunk_bytes):
        capture = Capture(layer, module, seg, None, cast, workspace)
        roles = tuple(layer.roles)
        current = kernel.roles(module)  # under FSDP2: the unsharded copies
        params = [current[r] for r in roles]
        return capture, SequenceGradientGEMM.apply(x, *params, (output, capture, roles))
    capture = Capture(layer, module, seg, x, cast, workspace)
    output.register_hook(capture.receive)
    return capture, None
