"""Coverage discovery: which trainable tensors PROMA projects, through which layers, and why
the others are accumulated plainly.

A tensor is *projected* when every layer that uses it has a kernel (``_kernels``), no exclusion
pattern matches any of its names, and no kernel refuses its layer. Every other trainable tensor
is *unprojected*, with its reason.

"Every layer that uses it" is read from ownership: a tensor is a parameter of one or more modules
(tied weights: several), and each of those must be covered, by its own kernel or by the kernel of
an enclosing layer that claims it (a role ``"experts.down_proj"``). A tensor tied between a
covered layer and a module without a kernel (Gemma's scaled embedding before it had one, tied to
the LM head) would otherwise be projected with the per-sequence gradients of one use only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ._capture import Layer
from ._deepspeed import refuse_unsupported_deepspeed
from ._distributed import GradSlot, ShardedSlot, is_dtensor, refuse_fsdp1, sharded_slots
from ._kernels import kernel_for

NO_KERNEL = "not a parameter of a layer with a sequence kernel"
ALSO_UNCOVERED = "also a parameter of '{name}' ({cls}), which has no sequence kernel"


@dataclass
class Coverage:
    """What :func:`discover` found in a model.

    Attributes:
        names: every parameter (shared ones once) → its first name in ``named_parameters``.
        trainable: the parameters with ``requires_grad``.
        slots: every parameter → where its running gradient lives.
        fsdp: FSDP2 module → the slots of the parameters it unshards.
        layers: covered layer → its kernel and the projected parameters it uses, by role.
        uses: projected parameter → ``(layer module, role)`` of each use.
        projected: projected parameter → name.
        unprojected: name → reason, for trainable tensors accumulated plainly.
    """

    names: dict[nn.Parameter, str]
    trainable: list[nn.Parameter]
    slots: dict[nn.Parameter, GradSlot]
    fsdp: dict[nn.Module, list[ShardedSlot]]
    layers: dict[nn.Module, Layer]
    uses: dict[nn.Parameter, list[tuple[nn.Module, str]]]
    projected: dict[nn.Parameter, str]
    unprojected: dict[str, str]


def discover(model: nn.Module, exclude: Iterable[str]) -> Coverage:
    """Find the covered layers and projected tensors of ``model`` (see the module docstring)."""
    aliases: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(p, []).append(name)
    names = {p: a[0] for p, a in aliases.items()}
    trainable = [p for p in names if p.requires_grad]
    refuse_fsdp1(model)
    refuse_unsupported_deepspeed(model)  # DeepSpeed ZeRO-2/3: see _deepspeed
    fsdp = sharded_slots(model)
    slots = _slots(names, fsdp)
    layers, uses, blocked = _layers(model)
    exclude = tuple(exclude)
    unprojected: dict[str, str] = {}
    for p in trainable:
        pattern = next(
            (pat for pat in exclude for a in aliases[p] if fnmatch.fnmatchcase(a, pat)), None
        )
        if pattern is not None:
            unprojected[names[p]] = f"excluded by pattern {pattern!r}"
        elif p in blocked:
            unprojected[names[p]] = blocked[p]
        elif p not in uses:
            unprojected[names[p]] = NO_KERNEL
    projected = {p: names[p] for p in trainable if names[p] not in unprojected}
    # Only projected parameters are hooked per layer; a layer with none needs no forward hook.
    for layer in layers.values():
        every_role_projected = all(p in projected for p in layer.roles.values())
        layer.fusable = layer.kernel.fusable and every_role_projected and "weight" in layer.roles
        layer.roles = {r: p for r, p in layer.roles.items() if p in projected}
    layers = {m: layer for m, layer in layers.items() if layer.roles}
    uses = {
        p: [(m, r) for m, r in module_roles if m in layers]
        for p, module_roles in uses.items()
        if p in projected
    }
    return Coverage(names, trainable, slots, fsdp, layers, uses, projected, unprojected)


def _slots(
    names: dict[nn.Parameter, str], fsdp: dict[nn.Module, list[ShardedSlot]]
) -> dict[nn.Parameter, GradSlot]:
    """Where each parameter's running gradient lives (FSDP2: see ``_distributed``)."""
    slots: dict[nn.Parameter, GradSlot] = {p: GradSlot(p) for p in names}
    for module_slots in fsdp.values():
        slots.update((s.param, s) for s in module_slots if s.param in names)
    other = [n for p, n in names.items() if is_dtensor(p) and type(slots[p]) is GradSlot]
    if other:
        raise NotImplementedError(
            f"parameter '{other[0]}' is a DTensor not managed by FSDP2 (fully_shard), e.g. "
            "tensor parallel: a sequence's gradient is split across ranks, which PROMA's "
            "per-rank projection does not support. Use FSDP2 or DDP (see docs/distributed.md)."
        )
    return slots


def _layers(
    model: nn.Module,
) -> tuple[
    dict[nn.Module, Layer],
    dict[nn.Parameter, list[tuple[nn.Module, str]]],
    dict[nn.Parameter, str],
]:
    """Every module with a kernel and trainable parameters: ``(layers, uses, blocked)``, where
    ``blocked`` maps to the reason the parameters of layers the kernel refuses, and those that
    are also parameters of a module nothing covers."""
    layers: dict[nn.Module, Layer] = {}
    uses: dict[nn.Parameter, list[tuple[nn.Module, str]]] = {}
    blocked: dict[nn.Parameter, str] = {}
    # Submodules whose parameters a covering ancestor's kernel owns (a role on a submodule,
    # e.g. Qwen2-MoE's shared expert): their own kernel is not used. Parents come first.
    owned: set[tuple[nn.Module, str]] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        kernel = kernel_for(module)
        if kernel is None or module in layers:
            continue
        roles = {
            r: p
            for r, p in kernel.roles(module).items()
            if p.requires_grad and (module, r) not in owned
        }
        if not roles:
            continue
        reason = kernel.unsupported(module)
        if reason is not None:
            for p in roles.values():
                blocked.setdefault(p, f"{reason} (layer '{mod_name}')")
            continue
        layers[module] = Layer(mod_name or type(module).__name__, kernel, roles)
        for role, p in roles.items():
            uses.setdefault(p, []).append((module, role))
        owned |= delegated(module, roles)
    for p, reason in uncovered_owners(model, layers, uses).items():
        blocked.setdefault(p, reason)
    return layers, uses, blocked


def delegated(module: nn.Module, roles: dict[str, nn.Parameter]) -> set[tuple[nn.Module, str]]:
    """``(submodule, attribute)`` of the roles a layer's kernel covers on its submodules (e.g.
    ``"shared_expert.down_proj.weight"``): those submodules' own kernels do not cover them."""
    found = set()
    for role in roles:
        owner, _, attr = role.rpartition(".")
        if owner:
            found.add((module.get_submodule(owner), attr))
    return found


def uncovered_owners(
    model: nn.Module,
    layers: dict[nn.Module, Layer],
    uses: dict[nn.Parameter, list[tuple[nn.Module, str]]],
) -> dict[nn.Parameter, str]:
    """Used tensors that are also a parameter of a module no kernel covers, with the reason.

    A kernel's role names the attribute on its layer, or on one of the layer's submodules
    (``"experts.down_proj"``); every other owner of a used tensor leaves part of its gradient
    outside the hooked layers.
    """
    claimed: set[tuple[nn.Module, str]] = set()
    for module, layer in layers.items():
        for role in layer.roles:
            owner, _, attr = role.rpartition(".")
            claimed.add((module.get_submodule(owner) if owner else module, attr))
    found: dict[nn.Parameter, str] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            if p in uses and (module, attr) not in claimed:
                cls = type(module).__name__
                found.setdefault(p, ALSO_UNCOVERED.format(name=mod_name, cls=cls))
    return found
