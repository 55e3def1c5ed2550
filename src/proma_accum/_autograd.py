"""What the autograd engine and the module hook registries tell PROMA's hooks.

PROMA replaces plain accumulation only in a backward that accumulates into ``p.grad``: not in
``torch.autograd.grad`` (which returns gradients and leaves ``p.grad`` alone), and not in the
part of a graph that a ``backward(inputs=...)`` does not reach. The parameter hook is therefore
a pre-hook of the parameter's ``AccumulateGrad`` node, which the engine runs only when it
accumulates; tensor hooks on the parameter (the user's) run before it, on the microbatch
gradient, as in plain PyTorch. Output gradients that reach a covered layer are kept per graph
task (one ``backward`` or ``autograd.grad`` call), so those of an ``autograd.grad`` call are not
mistaken for the microbatch's.

Every private attribute of torch read outside distributed training is read here, marked
``PRIVATE`` with the public API it stands in for and the torch version it was checked on
(``_distributed`` holds those of DDP and FSDP2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module


def accumulate_node(p: torch.Tensor) -> Any:
    """The ``AccumulateGrad`` node of leaf ``p``: hold a reference to it, since a parameter
    keeps only a weak one and a node dropped and made anew loses its hooks."""
    return torch.autograd.graph.get_gradient_edge(p).node


def graph_task_id() -> int:
    """An id of the running backward or ``autograd.grad`` call (-1 outside any)."""
    # PRIVATE: no public API names the running graph task; checked on torch 2.13.0.
    return int(torch._C._current_graph_task_id())


def will_accumulate(node: Any) -> bool:
    """Whether the running graph task will execute ``node`` (a leaf's ``AccumulateGrad``),
    i.e. accumulate into that leaf's ``.grad``."""
    # PRIVATE: ``torch._C._will_engine_execute_node`` (used by torch's own
    # ``register_multi_grad_hook``); checked on torch 2.13.0. It raises for a leaf whose
    # gradient ``autograd.grad`` captures instead of accumulating.
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        return False


def tensor_hooks(p: torch.Tensor) -> list[Callable]:
    """The hooks registered on ``p`` with ``p.register_hook`` (public API: none lists them)."""
    # PRIVATE: ``Tensor._backward_hooks``, the dict ``register_hook`` fills; torch 2.13.0.
    hooks = getattr(p, "_backward_hooks", None)
    return list(hooks.values()) if hooks else []


def hook_name(hook: object) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


def global_module_hooks() -> list[str]:
    """Kinds of global module hooks registered (``register_module_forward_hook`` & co.)."""
    # PRIVATE: the registries behind ``torch.nn.modules.module.register_module_*_hook`` (no
    # public getter); checked on torch 2.13.0.
    kinds = {
        "a global module forward hook": _module._global_forward_hooks,
        "a global module forward pre-hook": _module._global_forward_pre_hooks,
        "a global module backward hook": _module._global_backward_hooks,
        "a global module backward pre-hook": _module._global_backward_pre_hooks,
    }
    return [kind for kind, hooks in kinds.items() if hooks]


def module_hooks(module: nn.Module) -> tuple[list[Any], list[Any], bool]:
    """``(forward hooks, forward pre-hooks, has backward hooks)`` of ``module``, in call order."""
    # PRIVATE: the dicts ``register_forward_hook`` & co. fill (no public getter); torch 2.13.0.
    backward = bool(module._backward_hooks or module._backward_pre_hooks)
    return list(module._forward_hooks.values()), list(module._forward_pre_hooks.values()), backward
