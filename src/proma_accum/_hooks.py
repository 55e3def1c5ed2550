"""The hook lifecycle, in one place: what is attached to the user's model, and its removal.

Two kinds of hooks, every handle kept in one list and removed on ``detach`` (also when removing
one of them fails half-way):

* a forward hook on every covered layer, which keeps the layer's input and registers a tensor
  hook on its output to receive the output gradient during the backward (or returns the output
  through the fused backward, see ``_fused``). It runs before the layer's other forward hooks:
  it sees the layer's own output, and FSDP2's post-forward hook, which reshards the parameters
  and hooks the output for the backward, sees the output that is returned;
* a tensor hook on every trainable parameter, which autograd calls once per backward with the
  parameter's **summed** gradient over all its uses (tied weights included), before that
  gradient is accumulated into ``p.grad``. This is where PROMA replaces plain accumulation,
  and it does not depend on the order in which module hooks and ``p.grad`` writes happen.
  Under FSDP2 the layers use an unsharded copy of each sharded parameter, created by FSDP2 at
  the first forward: a forward pre-hook on every FSDP2 module (running after FSDP2's own, which
  unshards) places the tensor hook on each copy the first time it exists.

Nothing else is patched onto the user's objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

ForwardCallback = Callable[[nn.Module, tuple, dict, Any], None]
GradCallback = Callable[[nn.Parameter, torch.Tensor], torch.Tensor | None]
# FSDP2 module -> (sharded parameter, function returning its unsharded copy or None)
Unsharded = dict[nn.Module, list[tuple[nn.Parameter, Callable[[], torch.Tensor | None]]]]


class HookSet:
    """Forward hooks on ``layers`` and gradient hooks on ``params``; attach once, detach always."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._hooked: set[int] = set()  # ids of hooked unsharded copies
        self.attached = False

    def attach(
        self,
        layers: list[nn.Module],
        params: list[nn.Parameter],
        on_forward: ForwardCallback,
        on_grad: GradCallback,
        unsharded: Unsharded | None = None,
    ) -> None:
        """Hook ``layers`` and ``params``; for FSDP2, the unsharded copies of the parameters
        in ``unsharded`` (each gradient hook is called with the *sharded* parameter)."""
        if self.attached:
            raise RuntimeError("ProjectedAccumulator is already attached; detach() it first")
        try:
            for layer in layers:
                self._handles.append(
                    layer.register_forward_hook(on_forward, with_kwargs=True, prepend=True)
                )
            for p in params:
                self._handles.append(p.register_hook(_bind(on_grad, p)))
            for module, copies in (unsharded or {}).items():
                self._hook_copies(copies, on_grad)  # those that exist already

                def pre_hook(module: nn.Module, args: tuple, copies=copies) -> None:
                    self._hook_copies(copies, on_grad)

                self._handles.append(module.register_forward_pre_hook(pre_hook))
        except BaseException:
            self.detach()
            raise
        self.attached = True

    def _hook_copies(
        self,
        copies: list[tuple[nn.Parameter, Callable[[], torch.Tensor | None]]],
        on_grad: GradCallback,
    ) -> None:
        for p, unsharded in copies:
            copy = unsharded()
            if copy is not None and id(copy) not in self._hooked and copy.requires_grad:
                self._handles.append(copy.register_hook(_bind(on_grad, p)))
                self._hooked.add(id(copy))

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        self._hooked = set()
        self.attached = False
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)


def _bind(on_grad: GradCallback, p: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        return on_grad(p, grad)

    return hook
