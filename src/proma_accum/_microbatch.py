"""The state of one open microbatch context, and the error of a microbatch that failed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._capture import Capture
from ._consistency import Consistency
from ._distributed import Taken
from ._layout import SequenceLayout


class MicrobatchFailedError(RuntimeError):
    """The backward inside a microbatch context raised, and the exception was caught inside
    the context; every ``p.grad`` has been restored (the original is ``__cause__``)."""


@dataclass
class MicrobatchState:
    layout: SequenceLayout
    advantages: torch.Tensor | None  # (k,) float64, in dense sequence order
    world: int = 1
    captures: dict[nn.Module, list[Capture]] = field(default_factory=dict)
    roles_done: dict[nn.Module, int] = field(default_factory=dict)
    before: dict[nn.Parameter, Taken] = field(default_factory=dict)
    # Projected tensors accumulated plainly in this microbatch: those of layers whose kernel
    # needs one sequence per row (the Opacus fallback), under per-token seq_ids.
    plain: frozenset[nn.Parameter] = frozenset()
    thread: int = 0  # the thread that opened the context
    forwards: int = 0  # forwards with grad of covered layers inside the context
    # The consistency checks of the projected tensors, verified together at the context exit.
    checks: list[Consistency] = field(default_factory=list)
    # The first exception raised inside a gradient hook (the backward failed), even if the
    # body caught it: the microbatch then fails at the context exit.
    error: BaseException | None = None
    # True from the first gradient hook of a backward until that backward completes: still
    # True at the exit means the backward raised (anywhere) and the body caught it.
    backward_pending: bool = False

    def backward_started(self) -> None:
        if not self.backward_pending:
            self.backward_pending = True
            # PRIVATE: autograd's engine runs queued callbacks when the running backward
            # completes, and not when it raises (DDP and FSDP use the same hook; there is no
            # public API for it). Checked on torch 2.13.0.
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_completed)

    def _backward_completed(self) -> None:
        self.backward_pending = False


def fingerprint(model: nn.Module) -> list[tuple]:
    """What coverage depends on, per parameter: identity, ``requires_grad``, dtype, device."""
    return [(id(p), p.requires_grad, p.dtype, p.device) for p in model.parameters()]
