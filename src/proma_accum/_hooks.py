"""The hook lifecycle, in one place: what is attached to the user's model, and its removal.

Two kinds of hooks, every handle kept in one list and removed on ``detach`` (also when removing
one of them fails half-way):

* a forward hook on every covered layer, which keeps the layer's input and registers a tensor
  hook on its output to receive the output gradient during the backward (or returns the output
  through the fused backward, see ``_fused``). It runs before the layer's other forward hooks:
  it sees the layer's own output, and FSDP2's post-forward hook, which reshards the parameters
  and hooks the output for the backward, sees the output that is returned;
* a pre-hook on the ``AccumulateGrad`` node of every trainable parameter, which autograd calls
  once per backward that accumulates into ``p.grad``, with the parameter's **summed** gradient
  over all its uses (tied weights included), after the parameter's own tensor hooks and before
  that gradient is accumulated. This is where PROMA replaces plain accumulation, and it does not
  depend on the order in which module hooks and ``p.grad`` writes happen. ``autograd.grad``
  never runs it (see ``_autograd``). The nodes are held here: a parameter holds its node weakly,
  and one made anew would have lost the hook.
  Under FSDP2 the layers use an unsharded copy of each sharded parameter, created by FSDP2 at
  the first forward: a forward pre-hook on every FSDP2 module (running after FSDP2's own, which
  unshards) places the node pre-hook on each copy the first time it exists.

Nothing else is patched onto the user's objects. The hooks placed on modules are
:class:`ModuleHook` objects: pickled or deep-copied with the model (``torch.save(model)``,
``copy.deepcopy(model)``) they become :class:`InertHook` no-ops, so a copy carries no accumulator.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._autograd import accumulate_node

ForwardCallback = Callable[[nn.Module, tuple, dict, Any], None]
GradCallback = Callable[[nn.Parameter, torch.Tensor], torch.Tensor | None]
# FSDP2 module -> (sharded parameter, function returning its unsharded copy or None)
Unsharded = dict[nn.Module, list[tuple[nn.Parameter, Callable[[], torch.Tensor | None]]]]


class InertHook:
    """What a :class:`ModuleHook` becomes in a pickled or copied model: does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class ModuleHook:
    """A hook on a user's module calling ``fn``; pickled or deep-copied: an :class:`InertHook`."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[type, tuple]:
        return (InertHook, ())

    def __deepcopy__(self, memo: dict) -> InertHook:
        return InertHook()


class HookSet:
    """Forward hooks on ``layers`` and gradient hooks on ``params``; attach once, detach always."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._hooked: set[int] = set()  # ids of hooked unsharded copies
        self._nodes: list[Any] = []  # the AccumulateGrad nodes hooked (kept alive)
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
            forward = ModuleHook(on_forward)
            for layer in layers:
                self._handles.append(
                    layer.register_forward_hook(forward, with_kwargs=True, prepend=True)
                )
            for p in params:
                self._hook_grad(p, p, on_grad)
            for module, copies in (unsharded or {}).items():
                self._hook_copies(copies, on_grad)  # those that exist already
                pre_hook = functools.partial(self._copies_pre_hook, copies, on_grad)
                self._handles.append(module.register_forward_pre_hook(ModuleHook(pre_hook)))
        except BaseException:
            self.detach()
            raise
        self.attached = True

    def _hook_grad(self, tensor: torch.Tensor, p: nn.Parameter, on_grad: GradCallback) -> None:
        node = accumulate_node(tensor)
        self._nodes.append(node)
        self._handles.append(node.register_prehook(_bind(on_grad, p)))

    def _copies_pre_hook(
        self,
        copies: list[tuple[nn.Parameter, Callable[[], torch.Tensor | None]]],
        on_grad: GradCallback,
        module: nn.Module,
        args: tuple,
    ) -> None:
        self._hook_copies(copies, on_grad)

    def _hook_copies(
        self,
        copies: list[tuple[nn.Parameter, Callable[[], torch.Tensor | None]]],
        on_grad: GradCallback,
    ) -> None:
        for p, unsharded in copies:
            copy = unsharded()
            if copy is not None and id(copy) not in self._hooked and copy.requires_grad:
                self._hook_grad(copy, p, on_grad)
                self._hooked.add(id(copy))

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        self._hooked = set()
        self._nodes = []
        self.attached = False
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)


def _bind(on_grad: GradCallback, p: nn.Parameter) -> Callable[[tuple], tuple | None]:
    def hook(grads: tuple) -> tuple | None:
        if grads[0] is None:
            return None
        new = on_grad(p, grads[0])
        return None if new is None else (new,)

    return hook
