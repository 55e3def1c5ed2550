"""Distributed training: where a parameter's running gradient lives, and the data-parallel world.

Every private attribute of torch's DDP and FSDP2 that proma_accum reads is read in this module
and nowhere else; each is marked ``PRIVATE`` with the public API it stands in for and the torch
versions it was checked on.

Where the running gradient lives, and how a microbatch takes it out and puts it back:

PROMA needs the running gradient ``A`` of a tensor when that tensor's microbatch gradient
arrives, and hands autograd the new running gradient in its place. For an ordinary parameter
``A`` is ``p.grad``. Under FSDP2 (``fully_shard``) the layers compute with an *unsharded* copy
``p_u`` of each sharded ``DTensor`` parameter ``p``, and the running gradient can live in three
places:

* ``p_u.grad`` — gradient accumulated locally, not yet reduce-scattered (microbatches under
  ``set_requires_gradient_sync(False)``);
* FSDP's ``unsharded_accumulated_grad`` — the same in the reduce dtype of a mixed-precision
  policy;
* ``p.grad`` — the sharded ``DTensor`` gradient, already reduce-scattered (averaged over ranks).

:meth:`GradSlot.take` returns their sum as one full tensor, empties every place and remembers
what was there, so a failed microbatch can put every tensor object back (:meth:`Taken.restore`).
Gathering the sharded part is the one collective PROMA adds under FSDP2, and only when the
gradient was reduce-scattered after an earlier microbatch of the step. The new running gradient
goes back into ``p_u.grad`` in the compute dtype; FSDP2 moves it to its reduce-dtype
accumulator after the backward, as it does with any local gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:  # torch built without distributed support has neither
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = FullyShardedDataParallel = DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(p: torch.Tensor) -> bool:
    """Whether ``p`` (or the tensor a ``Parameter`` wraps) is a ``DTensor``."""
    return DTensor is not None and (
        isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor)
    )


def unwrapped_class(cls: type) -> type:
    """``Class`` for the ``FSDP<Class>(FSDPModule, Class)`` that ``fully_shard`` swaps in.

    That class only adds hooks around the forward, so the module computes as ``Class`` does.
    """
    bases = cls.__bases__
    if (
        FSDPModule is not None
        and len(bases) == 2
        and bases[0] is FSDPModule
        and cls.__name__ == f"FSDP{bases[1].__name__}"
    ):
        return bases[1]
    return cls


@dataclass(frozen=True)
class DataParallel:
    """A ``DistributedDataParallel`` wrapper: its world size, and whether it all-reduces after
    the coming backward."""

    ddp: nn.parallel.DistributedDataParallel

    @property
    def world(self) -> int:
        return self.ddp.process_group.size()

    @property
    def syncs(self) -> bool:
        # PRIVATE-ish: ``require_backward_grad_sync`` is the flag ``DistributedDataParallel.
        # no_sync()`` clears (public API: the ``no_sync`` context); checked on torch 2.13.0.
        return bool(self.ddp.require_backward_grad_sync)


def is_fsdp_hook(hook: object) -> bool:
    """Whether ``hook`` is one of the forward hooks ``fully_shard`` registers (they unshard and
    reshard parameters; the values a layer computes are unchanged)."""
    # PRIVATE: FSDP2 registers bound methods of its ``FSDPState``, or, for a group of modules,
    # closures defined in ``torch.distributed.fsdp._fully_shard._fsdp_state`` (no public API
    # lists them); checked on torch 2.13.0.
    module = getattr(getattr(hook, "__func__", hook), "__module__", None) or ""
    return module.startswith("torch.distributed.fsdp.")


def data_parallel(model: nn.Module) -> DataParallel | None:
    """The DDP wrapper, when ``model`` is one."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DataParallel(model)
    return None


@dataclass
class Taken:
    """What one microbatch took out of a parameter's gradient places: ``(object, attr, value)``."""

    places: list[tuple[Any, str, torch.Tensor | None]] = field(default_factory=list)

    def restore(self) -> None:
        for obj, attr, value in self.places:
            setattr(obj, attr, value)


@dataclass
class GradSlot:
    """An ordinary parameter: the running gradient is ``param.grad``."""

    param: nn.Parameter

    @property
    def target(self) -> torch.Tensor:
        """The tensor autograd accumulates into (its gradient hook is PROMA's)."""
        return self.param

    def has_grad(self) -> bool:
        return self.param.grad is not None

    def take(self, gather: bool) -> tuple[torch.Tensor | None, bool, Taken]:
        """``(A, local, taken)``: the running gradient (emptied), whether part of it is local
        (not yet averaged over data-parallel ranks), and how to put it back."""
        acc = self.param.grad
        self.param.grad = None
        return acc, False, Taken([(self.param, "grad", acc)])


@dataclass
class ShardedSlot(GradSlot):
    """A parameter sharded by FSDP2. ``fsdp_param`` and ``group`` are torch's ``FSDPParam`` and
    ``FSDPParamGroup`` (private FSDP2 objects; checked on torch 2.13.0)."""

    fsdp_param: Any = None
    group: Any = None

    @property
    def unsharded(self) -> nn.Parameter | None:
        # PRIVATE: the unsharded parameter the layer computes with between FSDP2's pre-forward
        # unshard and post-backward reshard (no public API exposes it; ``FSDPModule.unshard``
        # only triggers it).
        return getattr(self.fsdp_param, "_unsharded_param", None)

    @property
    def target(self) -> torch.Tensor:
        unsharded = self.unsharded
        if unsharded is None:  # pragma: no cover - hooks are only placed on existing ones
            raise RuntimeError("FSDP2 has not unsharded this parameter yet")
        return unsharded

    @property
    def world(self) -> int:
        """Ranks FSDP2 averages this parameter's gradient over (shard × replicate)."""
        # PRIVATE: the parameter's device mesh (public API: the ``mesh`` passed to
        # ``fully_shard``, which the module does not expose).
        return int(self.fsdp_param.mesh_info.mesh.size())

    @property
    def synced(self) -> bool:
        """Whether FSDP2 reduce-scatters after this backward."""
        # PRIVATE: the state ``FSDPModule.set_requires_gradient_sync`` sets (no public getter).
        return bool(self.group.reduce_grads)

    def check_reduction(self, name: str) -> None:
        # PRIVATE: what ``FSDPModule.set_gradient_divide_factor`` sets (no public getter).
        factor = self.group.gradient_divide_factor
        if factor is not None and float(factor) != float(self.world):
            raise ValueError(
                f"parameter '{name}': FSDP2 divides gradients by {factor} "
                f"(set_gradient_divide_factor) but the data-parallel world is {self.world}; "
                "PROMA's distributed rule needs the average (the default divide factor)"
            )

    def _local(self) -> list[tuple[Any, str]]:
        # PRIVATE: ``unsharded_accumulated_grad`` is where FSDP2 keeps a local gradient in the
        # reduce dtype of a ``MixedPrecisionPolicy`` between microbatches without gradient sync
        # (no public API).
        return [(self.fsdp_param, "unsharded_accumulated_grad"), (self.unsharded, "grad")]

    def has_grad(self) -> bool:
        local = any(getattr(o, a, None) is not None for o, a in self._local() if o is not None)
        return local or self.param.grad is not None

    def take(self, gather: bool) -> tuple[torch.Tensor | None, bool, Taken]:
        """As :meth:`GradSlot.take`. With ``gather``, a sharded running gradient is all-gathered
        (a collective: every rank must call this for the same parameters in the same order)
        and emptied; without, it stays where it is (FSDP2 adds the next reduce-scatter to it in
        place) and a copy of its shard is kept for ``restore``."""
        taken = Taken()
        acc = None
        local = False
        for obj, attr in self._local():
            value = getattr(obj, attr)
            if value is not None:
                taken.places.append((obj, attr, value))
                setattr(obj, attr, None)
                acc = value if acc is None else acc + value
                local = True
        sharded = self.param.grad
        if sharded is not None:
            if gather:
                taken.places.append((self.param, "grad", sharded))
                self.param.grad = None
                full = sharded.full_tensor()
                acc = full if acc is None else acc.to(full.dtype) + full
            else:
                taken.places.append((self.param, "grad", sharded.detach().clone()))
        return acc, local, taken


def sharded_slots(model: nn.Module) -> dict[nn.Module, list[ShardedSlot]]:
    """``{FSDP2 module: slots of the parameters it unshards}`` inside ``model``.

    Each FSDP2 module unshards its parameters in a forward pre-hook; the unsharded copies exist
    from the first forward on and are reused for the rest of training.
    """
    if FSDPModule is None:  # pragma: no cover - torch without distributed
        return {}
    slots: dict[nn.Module, list[ShardedSlot]] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        try:
            # PRIVATE: the module's FSDP2 state and its parameter groups (public API: the
            # module's sharded parameters, which do not lead to the unsharded copies).
            groups = module._get_fsdp_state()._fsdp_param_groups
            slots[module] = [
                ShardedSlot(fsdp_param.sharded_param, fsdp_param, group)
                for group in groups
                for fsdp_param in group.fsdp_params
            ]
        except AttributeError as error:  # pragma: no cover - depends on torch internals
            raise NotImplementedError(
                f"this torch version's FSDP2 internals are not the ones proma_accum supports "
                f"(torch {torch.__version__}): {error}"
            ) from error
    return slots


def refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 (``FullyShardedDataParallel``) flattens parameters: no layer sees its own."""
    if FullyShardedDataParallel is None:  # pragma: no cover
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise NotImplementedError(
            "model contains FullyShardedDataParallel (FSDP1) modules, whose flat parameters "
            "hide the layers' own parameters from per-sequence hooks: shard with FSDP2 "
            "(torch.distributed.fsdp.fully_shard) or use DDP (see docs/distributed.md)"
        )
