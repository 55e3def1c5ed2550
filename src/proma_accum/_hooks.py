"""The hook lifecycle, in one place: what is attached to the user's model, and its removal.

Two kinds of hooks, every handle kept in one list and removed on ``detach`` (also when removing
one of them fails half-way):

* a forward hook on every covered layer, which keeps the layer's input and registers a tensor
  hook on its output to receive the output gradient during the backward;
* a tensor hook on every trainable parameter, which autograd calls once per backward with the
  parameter's **summed** gradient over all its uses (tied weights included), before that
  gradient is accumulated into ``p.grad``. This is where PROMA replaces plain accumulation,
  and it does not depend on the order in which module hooks and ``p.grad`` writes happen.

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


class HookSet:
    """Forward hooks on ``layers`` and gradient hooks on ``params``; attach once, detach always."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self.attached = False

    def attach(
        self,
        layers: list[nn.Module],
        params: list[nn.Parameter],
        on_forward: ForwardCallback,
        on_grad: GradCallback,
    ) -> None:
        if self.attached:
            raise RuntimeError("ProjectedAccumulator is already attached; detach() it first")
        try:
            for layer in layers:
                self._handles.append(layer.register_forward_hook(on_forward, with_kwargs=True))
            for p in params:
                self._handles.append(p.register_hook(_bind(on_grad, p)))
        except BaseException:
            self.detach()
            raise
        self.attached = True

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        self.attached = False
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)


def _bind(on_grad: GradCallback, p: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def hook(grad: torch.Tensor) -> torch.Tensor | None:
        return on_grad(p, grad)

    return hook
