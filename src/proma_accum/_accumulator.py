"""``ProjectedAccumulator``: PROMA accumulation into ``p.grad`` for any training loop."""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._deepspeed import refuse_unsupported_deepspeed
from ._fused import SequenceGradientGEMM
from ._grad_slots import GradSlot, ShardedSlot, Taken, refuse_fsdp1, sharded_slots
from ._hooks import HookSet
from ._kernels import Kernel, kernel_for
from ._layout import SequenceLayout, ShapeMismatchError, TokenSegments
from ._memory import BufferPool
from ._proma import SPAN_COEFFICIENTS, Projection, accumulate_proma
from ._seq_grads import ByteMeter, TensorSequenceGradients, Use
from ._stats import StatsRecorder, flatten

# Per-sequence gradients of one tensor, (k + 1) x its size, are formed whole (and, for Linear and
# Conv1D, in place of the weight-gradient GEMM) up to this size; larger ones go chunk by chunk.
DEFAULT_CHUNK_BYTES = 2**30
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class _Capture:
    """One forward of a covered layer inside a microbatch; what arrives in backward is either
    the output gradient ``grad_out`` or, on the fused path, the per-sequence gradients."""

    x: torch.Tensor | None
    seg: TokenSegments
    cast: torch.dtype | None
    meter: ByteMeter
    pool: BufferPool
    grad_out: torch.Tensor | None = None
    precomputed: dict[str, torch.Tensor] | None = None
    returned: dict[str, torch.Tensor] | None = None  # the weight gradients handed to autograd

    def receive(self, grad: torch.Tensor) -> None:
        self.grad_out = grad if self.grad_out is None else self.grad_out + grad

    def receive_sequence_grads(
        self, per_sequence: dict[str, torch.Tensor], returned: dict[str, torch.Tensor]
    ) -> None:
        self.precomputed = per_sequence
        self.returned = returned


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"


def _raise(error: BaseException, grad: torch.Tensor) -> None:
    raise error


@dataclass
class _Microbatch:
    layout: SequenceLayout
    advantages: torch.Tensor | None  # (k,) float64, in dense sequence order
    world: int = 1
    captures: dict[nn.Module, list[_Capture]] = field(default_factory=dict)
    roles_done: dict[nn.Module, int] = field(default_factory=dict)
    before: dict[nn.Parameter, Taken] = field(default_factory=dict)
    meter: ByteMeter = field(default_factory=ByteMeter)


@dataclass
class _Layer:
    name: str
    kernel: Kernel
    roles: dict[str, nn.Parameter]
    fusable: bool = False


class ProjectedAccumulator:
    r"""Accumulate gradients over microbatches with PROMA, inside ``p.grad``, during backward.

    For every covered parameter tensor ``t`` and microbatch ``m`` with sequences ``1..k``::

        t.grad ← t.grad − strength · clamp(P_span(g_{m,1..k})(t.grad)) + g_m

    where ``g_{m,i}`` is the gradient of ``t`` contributed by sequence ``i`` (computed by hooks on
    the layers that use ``t``), ``g_m`` the microbatch gradient, ``P_span`` the orthogonal
    projection onto the span of the ``g_{m,i}`` (``projection="exact"``) or the note's two-pass
    Gram–Schmidt (``"gs2"``), and ``clamp`` scales the projected-away part down to norm
    ``clamp · ‖g_m‖`` when it is longer. Other trainable tensors accumulate plainly.

    Args:
        model: the module whose layers are hooked: a plain module, a
            ``DistributedDataParallel`` wrapper, or a module with FSDP2 (``fully_shard``)
            submodules (see the README's "Distributed training" for the multi-process rule).
        projection: ``"exact"`` or ``"gs2"``.
        clamp: bound on the removed part relative to ``‖g_m‖``; ``None`` turns the clamp off.
            The note's experiment used 0.5.
        strength: fraction in ``[0, 1]`` of the (clamped) projection removed; 0 is plain
            accumulation.
        optimizer: optional optimizer to wrap: ``zero_grad``, ``step``, ``param_groups``,
            ``state_dict`` and ``load_state_dict`` then pass through.
        exclude: ``fnmatch`` patterns of parameter names to accumulate plainly.
        chunk_bytes: byte budget of one chunk of a tensor's per-sequence gradients
            (``(k + 1) × rows × row size``); larger tensors are processed chunk by chunk.

    Memory: on CPU, the buffer of the largest per-sequence gradients (at least 32 MiB, e.g. a
    tied LM head's ``(k + 1) ×`` weight) is kept from one microbatch to the next of a step,
    since mapping it anew costs page faults on every write. It is held through the next
    microbatch's forward, so the step's peak can rise by up to that buffer. It is freed when
    the next step's first microbatch starts, by :meth:`zero_grad` and :meth:`step`, and by
    :meth:`detach`.

    Example::

        acc = ProjectedAccumulator(model, projection="exact", clamp=0.5)
        with acc:
            opt.zero_grad()
            for mb in microbatches:
                with acc.microbatch(mb["seq_ids"]):
                    loss_fn(model(mb["input_ids"]), mb).backward()
            opt.step()

    Reference: N. Abrahamsen, *Projected Microbatch Accumulation yields reference-free proximal
    policy updates for reinforcement learning* (2025).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        projection: Projection = "exact",
        clamp: float | None = 0.5,
        strength: float = 1.0,
        optimizer: torch.optim.Optimizer | None = None,
        exclude: Iterable[str] = (),
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if projection not in SPAN_COEFFICIENTS:
            raise ValueError(
                f"projection must be one of {sorted(SPAN_COEFFICIENTS)}, got {projection!r}"
            )
        if clamp is not None and (
            isinstance(clamp, bool)
            or not isinstance(clamp, (int, float))
            or not math.isfinite(clamp)
            or clamp <= 0
        ):
            raise ValueError(f"clamp must be a finite number > 0 or None, got {clamp!r}")
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not 0.0 <= strength <= 1.0
        ):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        if isinstance(exclude, str):
            exclude = [exclude]
        self.model = model
        self.projection: Projection = projection
        self.clamp = None if clamp is None else float(clamp)
        self.strength = float(strength)
        self.optimizer = optimizer
        self.exclude = tuple(exclude)
        self.chunk_bytes = chunk_bytes
        self._hooks = HookSet()
        self._state: _Microbatch | None = None
        # The largest per-sequence gradient buffers, kept from one microbatch to the next of
        # the same step (a fresh buffer of that size is mapped anew: page faults on every
        # write). Emptied when a step starts or ends (zero_grad, step) and on detach.
        self._pool = BufferPool()
        # DDP that all-reduces after a microbatch averages the ranks' updates; see microbatch().
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self._ddp = ddp
        self._world = ddp.process_group.size() if ddp is not None else 1
        self._replicated = True
        self._stats = StatsRecorder()
        self._discover()

    # ------------------------------------------------------------------ coverage
    def _discover(self) -> None:
        names: dict[nn.Parameter, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(p, name)
        aliases: dict[nn.Parameter, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            aliases.setdefault(p, []).append(name)
        self._names = names
        self._trainable = [p for p in names if p.requires_grad]
        # FSDP2: the layers compute with unsharded copies; see _grad_slots.
        refuse_fsdp1(self.model)
        refuse_unsupported_deepspeed(self.model)  # DeepSpeed ZeRO-2/3: see _deepspeed
        self._fsdp = sharded_slots(self.model)
        self._slots: dict[nn.Parameter, GradSlot] = {p: GradSlot(p) for p in names}
        for slots in self._fsdp.values():
            self._slots.update((s.param, s) for s in slots if s.param in names)
        other = [n for p, n in names.items() if _is_dtensor(p) and type(self._slots[p]) is GradSlot]
        if other:
            raise NotImplementedError(
                f"parameter '{other[0]}' is a DTensor not managed by FSDP2 (fully_shard), e.g. "
                "tensor parallel: a sequence's gradient is split across ranks, which PROMA's "
                "per-rank projection does not support. Use FSDP2 or DDP (see the README's "
                "'Distributed training')."
            )
        self._layers: dict[nn.Module, _Layer] = {}
        self._uses: dict[nn.Parameter, list[tuple[nn.Module, str]]] = {}
        blocked: dict[nn.Parameter, str] = {}
        for mod_name, module in self.model.named_modules(remove_duplicate=False):
            kernel = kernel_for(module)
            if kernel is None or module in self._layers:
                continue
            roles = {r: p for r, p in kernel.roles(module).items() if p.requires_grad}
            if not roles:
                continue
            reason = kernel.unsupported(module)
            if reason is not None:
                for p in roles.values():
                    blocked.setdefault(p, f"{reason} (layer '{mod_name}')")
                continue
            self._layers[module] = _Layer(mod_name or type(module).__name__, kernel, roles)
            for role, p in roles.items():
                self._uses.setdefault(p, []).append((module, role))
        self._unprojected: dict[str, str] = {}
        for p in self._trainable:
            pattern = next(
                (pat for pat in self.exclude for a in aliases[p] if fnmatch.fnmatchcase(a, pat)),
                None,
            )
            if pattern is not None:
                self._unprojected[names[p]] = f"excluded by pattern {pattern!r}"
            elif p in blocked:
                self._unprojected[names[p]] = blocked[p]
            elif p not in self._uses:
                self._unprojected[names[p]] = "not a parameter of a layer with a sequence kernel"
        self._covered = {p: names[p] for p in self._trainable if names[p] not in self._unprojected}
        # Only covered parameters are hooked per layer; a layer with none needs no forward hook.
        for layer in self._layers.values():
            every_role_covered = all(p in self._covered for p in layer.roles.values())
            layer.fusable = layer.kernel.fusable and every_role_covered and "weight" in layer.roles
            layer.roles = {r: p for r, p in layer.roles.items() if p in self._covered}
        self._layers = {m: layer for m, layer in self._layers.items() if layer.roles}
        self._uses = {
            p: [(m, r) for m, r in uses if m in self._layers]
            for p, uses in self._uses.items()
            if p in self._covered
        }
        try:
            self._device = next(iter(names)).device if names else None
        except StopIteration:  # pragma: no cover
            self._device = None

    def projected_parameters(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the tensors PROMA projects."""
        return list(self._covered.values())

    def unprojected_parameters(self) -> dict[str, str]:
        """Trainable tensors accumulated plainly, with the reason for each."""
        return dict(self._unprojected)

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> ProjectedAccumulator:
        """Attach the hooks. Raises if already attached."""
        if self._hooks.attached:
            raise RuntimeError("ProjectedAccumulator is already attached; detach() it first")
        if self._unprojected:
            listed = ", ".join(f"{n} ({r})" for n, r in list(self._unprojected.items())[:8])
            more = len(self._unprojected) - 8
            warnings.warn(
                f"{len(self._unprojected)} trainable tensor(s) are accumulated plainly, without "
                f"projection: {listed}{f', and {more} more' if more > 0 else ''}. "
                "See unprojected_parameters().",
                stacklevel=2,
            )
        unsharded = {
            module: [
                (s.param, functools.partial(getattr, s, "unsharded"))
                for s in slots
                if s.param.requires_grad
            ]
            for module, slots in self._fsdp.items()
        }
        plain = [p for p in self._trainable if not isinstance(self._slots[p], ShardedSlot)]
        self._hooks.attach(list(self._layers), plain, self._on_forward, self._on_grad, unsharded)
        return self

    def detach(self) -> None:
        """Remove every hook (safe to call twice)."""
        self._state = None
        self._pool.clear()
        self._hooks.detach()

    @property
    def attached(self) -> bool:
        return self._hooks.attached

    def __enter__(self) -> ProjectedAccumulator:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ microbatches
    @contextlib.contextmanager
    def microbatch(
        self, seq_ids: torch.Tensor, advantages: torch.Tensor | None = None
    ) -> Iterator[ProjectedAccumulator]:
        """Context for one microbatch's forward and backward.

        Args:
            seq_ids: integer tensor, ``(B,)`` (sequence id of each row) or ``(B, T)`` (of each
                token: packed rows); ``-1`` marks tokens of no sequence. Every hooked layer's
                input must have these leading dims.
            advantages: optional 1-D float tensor indexed by sequence id. If given, the
                backward inside the context must be of the per-sequence log-probability terms
                with unit advantages; the microbatch gradient becomes ``Σ_i adv[id_i] g_i``.

        If anything raises inside the context, every ``p.grad`` is restored to what it was
        before the microbatch.
        """
        if not self._hooks.attached:
            raise RuntimeError(
                "microbatch() needs attached hooks: use `with acc:` or call acc.attach() first"
            )
        if self._state is not None:
            raise RuntimeError("microbatch contexts cannot be nested")
        layout = SequenceLayout.from_seq_ids(seq_ids, self._device)
        adv = self._check_advantages(advantages, layout)
        for p in self._covered:
            slot = self._slots[p]
            if isinstance(slot, ShardedSlot):
                slot.check_reduction(self._names[p])
        new_step = not any(self._slots[p].has_grad() for p in self._trainable)
        synced = self._ddp is not None and bool(self._ddp.require_backward_grad_sync)
        replicated = self._replicated or new_step
        # Gradients all-reduced (averaged) after this backward, onto a running gradient that
        # is the same on every rank: each rank removes W times its own (clamped) projection,
        # so the average removes the sum of the ranks' projections.
        world = self._world if synced and replicated else 1
        state = _Microbatch(layout, adv, world=world)
        stats = self._stats.checkpoint()
        if new_step:
            self._pool.clear()
            self._stats.new_step()
        self._stats.new_microbatch()
        self._state = state
        try:
            yield self
            self._replicated = synced
        except BaseException:
            for taken in state.before.values():
                taken.restore()
            self._stats.restore(stats)
            self._replicated = replicated
            raise
        finally:
            self._state = None
            self._stats.peak_seq_grad_bytes = max(self._stats.peak_seq_grad_bytes, state.meter.peak)

    def _check_advantages(
        self, advantages: torch.Tensor | None, layout: SequenceLayout
    ) -> torch.Tensor | None:
        if advantages is None:
            return None
        if not isinstance(advantages, torch.Tensor):
            raise TypeError(
                f"advantages must be a 1-D float torch.Tensor, got {type(advantages).__name__}"
            )
        if not advantages.is_floating_point() or advantages.dim() != 1:
            raise TypeError(
                f"advantages must be a 1-D float tensor, got dtype {advantages.dtype} and "
                f"shape {tuple(advantages.shape)}"
            )
        max_id = int(layout.ids.max()) if layout.num_sequences else -1
        if advantages.numel() <= max_id:
            raise ValueError(
                f"advantages has length {advantages.numel()} but is indexed by sequence id and "
                f"seq_ids contains id {max_id}: need length > {max_id}"
            )
        if not bool(torch.isfinite(advantages).all()):
            raise ValueError("advantages must be finite (found nan or inf)")
        if advantages.device != layout.ids.device:
            raise ValueError(
                f"advantages is on {advantages.device} but seq_ids is on {layout.ids.device}"
            )
        if self._unprojected:
            raise ValueError(
                "advantages mode needs every trainable tensor covered by a sequence kernel, "
                "since the microbatch gradient is rebuilt from per-sequence gradients; not "
                f"covered: {self._unprojected}. Freeze them (requires_grad=False) or use loss "
                "mode (no advantages)."
            )
        return advantages.double()[layout.ids]

    # ------------------------------------------------------------------ hooks
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self._state
        if state is None or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        layer = self._layers[module]
        x = layer.kernel.saved_input(args, kwargs)
        try:
            seg = state.layout.token_segments(layer.kernel.lead_shape(module, x), layer.name)
        except ShapeMismatchError as error:
            # Raised only if this output gets a gradient (then inside the backward, so the
            # microbatch still fails and restores p.grad): a call whose result never reaches
            # the loss, like PEFT's DoRA norm on an identity matrix, needs no sequence split.
            output.register_hook(functools.partial(_raise, error))
            return None
        if state.advantages is None and (
            self.strength == 0 or not any(self._slots[p].has_grad() for p in layer.roles.values())
        ):
            return None  # plain accumulation (nothing to project yet) needs no sequence data
        cast = None
        device_type = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(device_type):
            # The layer multiplied the autocast-dtype copy of x: use the same values.
            cast = torch.get_autocast_dtype(device_type)
        if layer.fusable and self._fits_budget(layer, state.layout.num_sequences):
            capture = _Capture(None, seg, cast, state.meter, self._pool)
            state.captures.setdefault(module, []).append(capture)
            roles = tuple(layer.roles)
            current = layer.kernel.roles(module)  # under FSDP2: the unsharded copies
            params = [current[r] for r in roles]
            ctx_data = (output, module, layer.kernel, roles, capture)
            return SequenceGradientGEMM.apply(x, *params, ctx_data)
        capture = _Capture(x, seg, cast, state.meter, self._pool)
        state.captures.setdefault(module, []).append(capture)
        output.register_hook(capture.receive)
        return None

    def _fits_budget(self, layer: _Layer, k: int) -> bool:
        size = sum(
            p.numel() * torch.promote_types(p.dtype, torch.float32).itemsize
            for p in layer.roles.values()
        )
        return (k + 1) * size <= self.chunk_bytes

    def _on_grad(self, p: nn.Parameter, grad: torch.Tensor) -> torch.Tensor | None:
        state = self._state
        if state is None:
            return None  # a backward outside any microbatch: plain accumulation
        name = self._names[p]
        if p in state.before:
            raise RuntimeError(
                f"parameter '{name}' received gradient twice within one microbatch (two "
                "backward calls, or reentrant checkpointing of a block that shares the tensor "
                "with code outside it); use one backward per microbatch context"
            )
        slot = self._slots[p]
        # Gathering a sharded running gradient is a collective: decided the same on all ranks.
        acc, local, taken = slot.take(gather=p in self._covered and self.strength > 0)
        state.before[p] = taken
        if isinstance(slot, ShardedSlot):
            # Averaged over the ranks after this backward, onto a replicated running gradient
            # (the all-gathered shards): remove W times this rank's projection, as for DDP.
            world = slot.world if slot.synced and not local else 1
        else:
            world = state.world
        no_sequences = state.layout.num_sequences == 0
        if p in self._covered and state.advantages is not None and no_sequences:
            new = torch.zeros_like(grad) if acc is None else acc  # Σ_i adv_i g_i over no i
        elif (
            p in self._covered
            and not no_sequences
            and (state.advantages is not None or (self.strength > 0 and acc is not None))
        ):
            new = self._project(p, slot.target, name, acc, grad, state, world)
        else:
            new = grad if acc is None else acc + grad
        if p in self._covered:
            self._done_with(p, state)
        # The hook returns the whole new running gradient into an emptied p.grad, so the old
        # tensor stays intact and can be restored if the microbatch fails later.
        return new.to(slot.target.dtype)

    def _project(
        self,
        p: nn.Parameter,
        target: torch.Tensor,
        name: str,
        acc: torch.Tensor | None,
        grad: torch.Tensor,
        state: _Microbatch,
        world: int,
    ) -> torch.Tensor:
        uses: list[Use] = []
        layers = self._uses[p]
        # Autograd's gradient *is* the sum our fused backward returned when that was the
        # tensor's only use: nothing to check then.
        verified = False
        for module, role in layers:
            layer = self._layers[module]
            for cap in state.captures.get(module, ()):
                if cap.returned is not None and cap.returned.get(role) is grad:
                    verified = True
                if cap.precomputed is not None:
                    s = cap.precomputed.pop(role)
                    returned = None if cap.returned is None else cap.returned.get(role)
                    uses.append(
                        Use(layer.kernel, module, role, cap.seg, precomputed=s, returned=returned)
                    )
                elif cap.grad_out is not None and cap.x is not None:
                    x = cap.x if cap.cast is None else cap.x.to(cap.cast)
                    uses.append(Use(layer.kernel, module, role, cap.seg, x, cap.grad_out))
        if not uses:
            raise RuntimeError(
                f"parameter '{name}' received a gradient in this microbatch but none of its "
                f"layers ({', '.join(self._layers[m].name for m, _ in layers)}) ran a forward "
                "with grad inside the microbatch context: the weight was used outside its "
                "module (e.g. a fused LM head). Call the module itself, or exclude the "
                "parameter with exclude=[...]."
            )
        low_precision = target.dtype in _HALF or any(
            c.cast is not None or (c.x is not None and c.x.dtype in _HALF)
            for m, _ in layers
            for c in state.captures.get(m, ())
        )
        # Reduced-precision GEMMs (bf16, TF32) differ from ours by up to ~1e-2 relative; a
        # missing use of the weight differs by O(1).
        loose = low_precision or torch.get_float32_matmul_precision() != "highest"
        check_rtol = 2e-2 if loose else 1e-3
        seq_grads = TensorSequenceGradients(
            name,
            target,
            uses,
            state.layout.num_sequences,
            grad,
            self.chunk_bytes,
            state.meter,
            None if verified and len(uses) == 1 else check_rtol,
            self._pool,
        )
        try:
            new, info = accumulate_proma(
                acc,
                grad,
                seq_grads,
                projection=self.projection,
                clamp=self.clamp,
                strength=self.strength,
                advantages=state.advantages,
                world=world,
            )
        finally:
            seq_grads.release()
        if info is not None:
            self._stats.record(self._layers[layers[0][0]].kernel.kind, info)
        return new

    def _done_with(self, p: nn.Parameter, state: _Microbatch) -> None:
        """Free a layer's captures once every covered parameter of it has its gradient."""
        for module, _ in self._uses[p]:
            done = state.roles_done.get(module, 0) + 1
            state.roles_done[module] = done
            if done == len(self._layers[module].roles):
                for cap in state.captures.pop(module, ()):
                    for s in (cap.precomputed or {}).values():  # formed but not needed
                        state.meter.add(-s.numel() * s.element_size())

    # ------------------------------------------------------------------ diagnostics
    def stats(self, flat: bool = False) -> dict:
        """Diagnostics of the last microbatch and the current step (see ``_stats``).

        With ``flat=True``: ``{"proma/<scope>/<group>/<metric>": float}`` for loggers.
        """
        summary = self._stats.summary()
        return flatten(summary) if flat else summary

    # ------------------------------------------------------------------ optimizer pass-through
    def _require_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RuntimeError(
                "no optimizer was given: construct with ProjectedAccumulator(model, optimizer=opt)"
            )
        return self.optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new step: the wrapped optimizer's ``zero_grad`` (or the model's)."""
        self._pool.clear()
        if self.optimizer is None:
            self.model.zero_grad(set_to_none=set_to_none)
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        if not set_to_none:
            self._stats.new_step()

    def step(self, closure: Any = None) -> Any:
        """The wrapped optimizer's ``step``."""
        self._pool.clear()
        return self._require_optimizer().step(closure)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._require_optimizer().param_groups

    @property
    def state(self) -> Any:
        return self._require_optimizer().state

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": <optimizer state>, "proma_accum": <settings and counters>}``."""
        return {
            "optimizer": self._require_optimizer().state_dict(),
            "proma_accum": {
                "projection": self.projection,
                "clamp": self.clamp,
                "strength": self.strength,
                "exclude": list(self.exclude),
                "chunk_bytes": self.chunk_bytes,
                "microbatches": self._stats.microbatches,
                "steps": self._stats.steps,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (optimizer state and counters)."""
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict:
            raise ValueError(
                "state_dict must be what ProjectedAccumulator.state_dict() returned "
                "(a dict with keys 'optimizer' and 'proma_accum')"
            )
        self._require_optimizer().load_state_dict(state_dict["optimizer"])
        own = state_dict.get("proma_accum", {})
        self._stats.microbatches = int(own.get("microbatches", 0))
        self._stats.steps = int(own.get("steps", 0))

    def __repr__(self) -> str:
        return (
            f"ProjectedAccumulator(projection={self.projection!r}, clamp={self.clamp}, "
            f"strength={self.strength}, projected={len(self._covered)}, "
            f"unprojected={len(self._unprojected)}, attached={self.attached})"
        )
