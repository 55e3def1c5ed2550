"""``ProjectedAccumulator``: PROMA accumulation into ``p.grad`` for any training loop.

This module is the facade: settings, the hook lifecycle, the microbatch context (its
all-or-nothing rule and the data-parallel world) and the parameter hook where PROMA replaces
plain accumulation. Each other concern has its own module; see the package docstring.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ._capture import capture_forward
from ._consistency import verify_all
from ._coverage import discover
from ._distributed import ShardedSlot, data_parallel
from ._fused import create_graph_error
from ._hooks import HookSet
from ._kernels._base import Rows
from ._layout import SequenceLayout, dense_advantages
from ._microbatch import MicrobatchFailedError, MicrobatchState, fingerprint
from ._optimizer import OptimizerPassThrough
from ._proma import Projection
from ._settings import DEFAULT_CHUNK_BYTES, validate
from ._stats import StatsRecorder, flatten
from ._update import update_tensor
from ._workspace import Workspace

# Called with (parameter name, rows, per-sequence gradients of those rows): see
# ``proma_accum.testing.record_sequence_gradients``.
SequenceGradientObserver = Callable[[str, Rows, torch.Tensor], None]


_METRICS = ("projected_norm_ratio", "clamp_fraction", "num_sequences", "rank", "updates")


class ProjectedAccumulator(OptimizerPassThrough):
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
            submodules (see docs/distributed.md for the multi-process rule).
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
        compile: run each update as ``torch.compile``'d code: for a tensor whose per-sequence
            gradients fit one chunk and need no consistency check (the common case: a
            ``Linear`` weight on the fused path), its passes, ``k × k`` algebra and combination
            are one compiled function (products in float64 on every device, as on a GPU);
            otherwise the algebra alone is. About 24 kernel launches per tensor and microbatch
            instead of ~51. Compiled once per process (dynamic shapes: any ``k``, no
            recompilation per step), which takes seconds; on a CPU it does not pay. Results
            agree with the eager path to rounding. Under a ``TorchDispatchMode`` (which
            ``torch.compile`` does not support) the eager path runs.

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
        compile: bool = False,
    ) -> None:
        settings = validate(
            model, projection, clamp, strength, optimizer, exclude, chunk_bytes, compile
        )
        self.model = model
        self.projection, self.clamp, self.strength, self.exclude, self.chunk_bytes = settings[:5]
        self.compile = settings.compile
        self.optimizer = optimizer
        self._hooks = HookSet()
        self._state: MicrobatchState | None = None
        # Per-sequence gradient buffers: metered, and on CPU the largest kept from one
        # microbatch to the next of the same step. Emptied when a step starts or ends
        # (zero_grad, step) and on detach.
        self._workspace = Workspace()
        # DDP that all-reduces after a microbatch averages the ranks' updates; see microbatch().
        self._ddp = data_parallel(model)
        self._replicated = True
        self._stats = StatsRecorder()
        self._observer: SequenceGradientObserver | None = None
        # Tensors of rows-only layers left plain in a microbatch with per-token seq_ids.
        self._plain_when_packed: dict[str, str] = {}
        self._discover()

    def _discover(self) -> None:
        self._coverage = discover(self.model, self.exclude)
        names = self._coverage.names
        self._device = next(iter(names)).device if names else None
        # The coverage holds every parameter, so the ids in the fingerprint are not reused.
        self._fingerprint = fingerprint(self.model)

    def _refresh_coverage(self) -> None:
        """Discover the coverage again (and re-hook) if the parameters changed since: a tensor
        frozen or unfrozen, parameters replaced (``load_state_dict(..., assign=True)``), a
        model moved to another device or dtype (which also drops the parameters' hooks)."""
        if fingerprint(self.model) == self._fingerprint:
            return
        attached = self._hooks.attached
        self._hooks.detach()
        self._discover()
        if attached:
            self._attach_hooks(stacklevel=5)

    def projected_parameters(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the tensors PROMA projects."""
        return list(self._coverage.projected.values())

    def unprojected_parameters(self) -> dict[str, str]:
        """Trainable tensors accumulated plainly, with the reason for each.

        Tensors whose kernel needs one sequence per row (the Opacus fallback for convolutions
        and group/instance norms) are projected while ``seq_ids`` has shape ``(B,)``; once a
        microbatch with per-token ``seq_ids`` (packed rows) left them plain, they are listed
        here too, with that reason.
        """
        return {**self._coverage.unprojected, **self._plain_when_packed}

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> ProjectedAccumulator:
        """Attach the hooks. Raises if already attached.

        Coverage is discovered again here and at every :meth:`microbatch` when the model's
        parameters changed since it was last discovered (see :meth:`_refresh_coverage`).
        """
        if self._hooks.attached:
            raise RuntimeError("ProjectedAccumulator is already attached; detach() it first")
        if fingerprint(self.model) != self._fingerprint:
            self._discover()
        self._attach_hooks(stacklevel=3)
        return self

    def _attach_hooks(self, stacklevel: int) -> None:
        cov = self._coverage
        if cov.unprojected:
            listed = ", ".join(f"{n} ({r})" for n, r in list(cov.unprojected.items())[:8])
            more = len(cov.unprojected) - 8
            warnings.warn(
                f"{len(cov.unprojected)} trainable tensor(s) are accumulated plainly, without "
                f"projection: {listed}{f', and {more} more' if more > 0 else ''}. "
                "See unprojected_parameters().",
                stacklevel=stacklevel,
            )
        unsharded = {
            module: [
                (s.param, functools.partial(getattr, s, "unsharded"))
                for s in slots
                if s.param.requires_grad
            ]
            for module, slots in cov.fsdp.items()
        }
        plain = [p for p in cov.trainable if not isinstance(cov.slots[p], ShardedSlot)]
        self._hooks.attach(list(cov.layers), plain, self._on_forward, self._on_grad, unsharded)

    def detach(self) -> None:
        """Remove every hook (safe to call twice). Refused inside a microbatch context."""
        if self._state is not None:
            raise RuntimeError(
                "acc.detach() inside acc.microbatch(...) is refused: the microbatch needs its "
                "hooks until the context exits, and restores every p.grad if it fails. Detach "
                "after the context (or leave `with acc:`)."
            )
        self._workspace.clear()
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
        self._refresh_coverage()
        cov = self._coverage
        layout = SequenceLayout.from_seq_ids(seq_ids, self._device)
        adv = dense_advantages(advantages, layout)
        if adv is not None and cov.unprojected:
            raise ValueError(
                "advantages mode needs every trainable tensor covered by a sequence kernel, "
                "since the microbatch gradient is rebuilt from per-sequence gradients; not "
                f"covered: {cov.unprojected}. Freeze them (requires_grad=False) or use loss "
                "mode (no advantages)."
            )
        for p in cov.projected:
            slot = cov.slots[p]
            if isinstance(slot, ShardedSlot):
                slot.check_reduction(cov.names[p])
        plain = self._rows_only_plain(layout, adv is not None)
        new_step = not any(cov.slots[p].has_grad() for p in cov.trainable)
        ddp = self._ddp
        synced = ddp is not None and ddp.syncs
        replicated = self._replicated or new_step
        # Gradients all-reduced (averaged) after this backward, onto a running gradient that
        # is the same on every rank: each rank removes W times its own (clamped) projection,
        # so the average removes the sum of the ranks' projections.
        world = ddp.world if ddp is not None and synced and replicated else 1
        state = MicrobatchState(layout, adv, world=world, plain=plain, thread=threading.get_ident())
        stats = self._stats.checkpoint()
        if new_step:
            self._workspace.clear()
            self._stats.new_step()
        self._stats.new_microbatch()
        self._workspace.reset_meter()
        self._state = state
        try:
            yield self
            if state.error is not None or state.backward_pending:
                what = (
                    f"raised {type(state.error).__name__}: {state.error}"
                    if state.error is not None
                    else "did not complete (an exception was raised inside it)"
                )
                raise MicrobatchFailedError(
                    f"the backward of this microbatch {what} — and the exception was caught "
                    "inside the microbatch context. A microbatch is all-or-nothing: every "
                    "p.grad has been restored to what it was before it. To skip a bad batch, "
                    "catch the exception outside the `with acc.microbatch(...)` block."
                ) from state.error
            verify_all(state.checks)  # the one host synchronisation of the checks
            self._replicated = synced
            if state.forwards and not state.before:
                warnings.warn(
                    "covered layers ran a forward with gradients inside acc.microbatch(...), "
                    "but no backward accumulated into any parameter before the context exited. "
                    "A backward after the context is not part of the microbatch: call "
                    "backward() inside it (torch.autograd.grad does not accumulate).",
                    stacklevel=3,
                )
        except BaseException:
            for taken in state.before.values():
                taken.restore()
            self._stats.restore(stats)
            self._replicated = replicated
            raise
        finally:
            self._state = None
            for captures in state.captures.values():
                for cap in captures:
                    cap.closed = True  # a backward reaching them later raises
            self._stats.peak_seq_grad_bytes = max(
                self._stats.peak_seq_grad_bytes, self._workspace.peak
            )

    def _rows_only_plain(self, layout: SequenceLayout, advantages: bool) -> frozenset[nn.Parameter]:
        """The projected tensors of rows-only layers, when ``seq_ids`` is per token."""
        if layout.seq_ids.dim() == 1:
            return frozenset()
        cov = self._coverage
        layers = [m for m in cov.layers.values() if m.kernel.rows_only]
        params = frozenset(p for layer in layers for p in layer.roles.values())
        if not params:
            return params
        names = sorted(cov.names[p] for p in params)
        if advantages:
            raise ValueError(
                f"seq_ids of shape {tuple(layout.seq_ids.shape)} (per token) with advantages: "
                f"the tensors {names} get per-sequence gradients only with one sequence per "
                "row (layers covered through Opacus's per-sample gradients), and advantages "
                "mode cannot accumulate them plainly. Pass seq_ids of shape (B,), or freeze "
                "those tensors."
            )
        reason = (
            "per-sample gradients (Opacus) need one sequence per row: accumulated plainly in "
            "microbatches with per-token seq_ids (packed rows)"
        )
        new = [n for n in names if n not in self._plain_when_packed]
        if new:
            warnings.warn(
                f"{len(new)} tensor(s) accumulated plainly in this microbatch: {new} ({reason})",
                stacklevel=4,
            )
            self._plain_when_packed.update((n, reason) for n in new)
        return params

    # ------------------------------------------------------------------ hooks
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state = self._state
        if state is None or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        if threading.get_ident() != state.thread:
            raise RuntimeError(
                f"a forward with gradients of layer '{self._coverage.layers[module].name}' ran "
                "in another thread while acc.microbatch(...) is open: its backward would be "
                "taken into that microbatch. A ProjectedAccumulator serves one thread; use one "
                "accumulator (and model) per thread, or run this forward under torch.no_grad()."
            )
        state.forwards += 1
        layer = self._coverage.layers[module]
        if state.plain and layer.kernel.rows_only:
            return None  # accumulated plainly in this microbatch
        # Plain accumulation (nothing to project yet) needs no sequence data.
        need_data = state.advantages is not None or (
            self.strength > 0
            and any(self._coverage.slots[p].has_grad() for p in layer.roles.values())
        )
        capture, returned = capture_forward(
            layer,
            module,
            args,
            kwargs,
            output,
            state.layout,
            self._workspace,
            self.chunk_bytes,
            need_data,
        )
        if capture is not None:
            state.captures.setdefault(module, []).append(capture)
        return returned

    def _on_grad(self, p: nn.Parameter, grad: torch.Tensor) -> torch.Tensor | None:
        state = self._state
        if state is None:
            return None  # a backward outside any microbatch: plain accumulation
        if grad.device.type == "cpu" and threading.get_ident() != state.thread:
            # On CPU the backward runs in the thread that called it (on GPUs in autograd's
            # device threads, where only a forward from another thread is detected). The
            # foreign backward fails; this thread's microbatch is not touched.
            raise RuntimeError(
                f"parameter '{self._coverage.names[p]}' received a gradient from a backward in "
                "another thread while acc.microbatch(...) is open in this one: it would be "
                "mixed into that microbatch. A ProjectedAccumulator serves one thread; use one "
                "accumulator (and model) per thread."
            )
        state.backward_started()
        try:
            return self._accumulate(p, grad, state)
        except BaseException as error:
            if state.error is None:
                state.error = error  # the microbatch fails at exit even if this is caught
            raise

    def _accumulate(
        self, p: nn.Parameter, grad: torch.Tensor, state: MicrobatchState
    ) -> torch.Tensor | None:
        """The new running gradient of ``p`` (see :meth:`_on_grad`)."""
        cov = self._coverage
        name = cov.names[p]
        if torch.is_grad_enabled():
            raise create_graph_error()
        if p in state.before:
            raise RuntimeError(
                f"parameter '{name}' received gradient twice within one microbatch (two "
                "backward calls, or reentrant checkpointing of a block that shares the tensor "
                "with code outside it); use one backward per microbatch context"
            )
        slot = cov.slots[p]
        projected = p in cov.projected and p not in state.plain
        # Gathering a sharded running gradient is a collective: decided the same on all ranks.
        running, local, taken = slot.take(gather=projected and self.strength > 0)
        state.before[p] = taken
        if isinstance(slot, ShardedSlot):
            # Averaged over the ranks after this backward, onto a replicated running gradient
            # (the all-gathered shards): remove W times this rank's projection, as for DDP.
            world = slot.world if slot.synced and not local else 1
        else:
            world = state.world
        no_sequences = state.layout.num_sequences == 0
        if projected and state.advantages is not None and no_sequences:
            new = torch.zeros_like(grad) if running is None else running  # Σ_i adv_i g_i, no i
        elif (
            projected
            and not no_sequences
            and (state.advantages is not None or (self.strength > 0 and running is not None))
        ):
            new = self._project(p, slot.target, name, running, grad, state, world)
        else:
            new = grad if running is None else running + grad
        if projected:
            self._done_with(p, state)
        # The hook returns the whole new running gradient into an emptied p.grad, so the old
        # tensor stays intact and can be restored if the microbatch fails later.
        return new.to(slot.target.dtype)

    def _project(
        self,
        p: nn.Parameter,
        target: torch.Tensor,
        name: str,
        running: torch.Tensor | None,
        grad: torch.Tensor,
        state: MicrobatchState,
        world: int,
    ) -> torch.Tensor:
        observer = self._observer
        new, info = update_tensor(
            self._coverage,
            p,
            target,
            running,
            grad,
            state,
            projection=self.projection,
            clamp=self.clamp,
            strength=self.strength,
            world=world,
            chunk_bytes=self.chunk_bytes,
            workspace=self._workspace,
            observer=None if observer is None else functools.partial(observer, name),
            compile=self.compile,
        )
        if info is not None:
            cov = self._coverage
            self._stats.record(cov.layers[cov.uses[p][0][0]].kernel.kind, info)
        return new

    def _done_with(self, p: nn.Parameter, state: MicrobatchState) -> None:
        """Free a layer's captures once every projected parameter of it has its gradient."""
        cov = self._coverage
        for module, _ in cov.uses[p]:
            done = state.roles_done.get(module, 0) + 1
            state.roles_done[module] = done
            if done == len(cov.layers[module].roles):
                for cap in state.captures.pop(module, ()):
                    for s in cap.formed.values():  # formed but not needed
                        self._workspace.released(s)
                    cap.formed.clear()

    # ------------------------------------------------------------------ diagnostics
    def stats(self, flat: bool = False) -> dict:
        """Diagnostics of the last microbatch and of the current optimizer step.

        Returns::

            {
                "microbatches": int,          # microbatches since the accumulator was made
                "steps": int,                 # optimizer steps seen (a step starts at a
                                              #   microbatch where every gradient is None)
                "peak_seq_grad_bytes": int,   # peak bytes of live per-sequence gradients
                "microbatch": {group: metrics},           # the last microbatch
                "step": {"microbatches": int, group: metrics},  # the current step so far
            }

        ``group`` is a layer kind (``"linear"``, ``"embedding"``, ``"rms_norm"``, ...) or
        ``"all"``; each ``metrics`` dict holds floats:

        * ``projected_norm_ratio``: ``‖removed‖ / ‖t.grad‖`` over the group's tensors (root of
          summed squares), where ``removed`` is the clamped, strength-scaled projection taken
          off the running gradient ``t.grad``. 0 on a step's first microbatch (nothing to
          project yet).
        * ``clamp_fraction``: fraction of tensor updates in which the clamp bound.
        * ``num_sequences``: sequences per microbatch (mean over the updates).
        * ``rank``: mean numerical rank of the sequence gradients of a tensor update (at
          most ``num_sequences``; lower when sequence gradients are dependent).
        * ``updates``: number of projected tensor updates: covered tensors × microbatches
          whose running gradient was non-zero. E.g. ``updates: 9`` in ``"step"`` for 3
          projected tensors after 4 microbatches: the first microbatch has nothing to
          project.

        Args:
            flat: return ``{"proma/<scope>/<group>/<metric>": float}`` for loggers instead.
        """
        summary = self._stats.summary()
        for scope in ("microbatch", "step"):  # "all" always exists, zero without updates
            summary[scope].setdefault("all", dict.fromkeys(_METRICS, 0.0))
        return flatten(summary) if flat else summary

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(
            "ProjectedAccumulator cannot be copied or pickled: it holds hooks on one model. "
            "Construct a new one for a copied or loaded model (the model's own copy carries "
            "inert placeholders of the hooks)."
        )

    def __repr__(self) -> str:
        return (
            f"ProjectedAccumulator(projection={self.projection!r}, clamp={self.clamp}, "
            f"strength={self.strength}, compile={self.compile}, "
            f"projected={len(self._coverage.projected)}, "
            f"unprojected={len(self._coverage.unprojected)}, attached={self.attached})"
        )
