"""PROMA accumulation for VeRL's FSDP2 training engine (verl 0.9; install the ``verl`` extra).

Current VeRL trains the actor through an engine: ``FSDPEngine.forward_backward_batch`` splits
the batch into microbatches and, for each, enters ``_gradient_sync_context`` (FSDP2
``set_requires_gradient_sync(False)`` on all but the last), calls ``forward_step`` and
``loss.backward()``. :class:`PromaFSDPEngineWithLMHead` is VeRL's ``FSDPEngineWithLMHead`` with
each training microbatch wrapped in ``acc.microbatch(seq_ids)`` of a
:class:`~proma_accum.ProjectedAccumulator` on the FSDP2 model; the sequence ids come from the
jagged ``input_ids`` (:func:`sequence_ids`). Forward-only passes (log-probabilities for the
rollout, the reference model) run without hooks.

A VeRL config turns it on by choosing :class:`PromaFSDPEngineConfig` as the actor's engine
config (the ``proma`` mapping holds :class:`~proma_accum.ProjectedAccumulator`'s settings)::

    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.actor.fsdp_config._target_=proma_accum.integrations.verl.PromaFSDPEngineConfig
    +actor_rollout_ref.actor.fsdp_config.proma.clamp=0.5

Importing this module (Hydra does, to build that config) puts
:class:`PromaFSDPEngineWithLMHead` in VeRL's engine registry in place of
``FSDPEngineWithLMHead`` for the ``fsdp`` and ``fsdp2`` backends; with any other engine config
(the reference model's, or without PROMA) it behaves exactly like ``FSDPEngineWithLMHead``.

Not supported, and refused with an error rather than run without projection: FSDP1
(``strategy=fsdp``), Ulysses sequence parallelism (a sequence's gradient is split across
ranks), fused kernels (``use_fused_kernels``: the LM head's forward does not run as a module).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

try:
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "proma_accum.integrations.verl needs VeRL 0.9 (the engine-based actor): "
        "pip install 'proma-accum[verl]'"
    ) from exc

from .. import ProjectedAccumulator
from ..sequence_ids import from_attention_mask, from_cu_seqlens

__all__ = ["PromaFSDPEngineConfig", "PromaFSDPEngineWithLMHead", "sequence_ids"]

# ProjectedAccumulator's keyword arguments that a VeRL config may set (not model / optimizer).
_SETTINGS = ("projection", "clamp", "strength", "exclude", "chunk_bytes", "compile")

if not hasattr(FSDPEngineWithLMHead, "_gradient_sync_context"):  # pragma: no cover
    raise ImportError(
        "this VeRL version's FSDPEngine has no _gradient_sync_context (verl 0.9 has): "
        "proma_accum.integrations.verl cannot wrap its microbatches"
    )


@dataclasses.dataclass
class PromaFSDPEngineConfig(FSDPEngineConfig):
    """VeRL's ``FSDPEngineConfig`` plus ``proma``: keyword arguments of
    :class:`~proma_accum.ProjectedAccumulator` (``projection``, ``clamp``, ``strength``,
    ``exclude``, ``chunk_bytes``, ``compile``); an empty mapping means its defaults (clamp 0.5,
    exact projection)."""

    proma: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.proma, Mapping):
            raise TypeError(
                f"fsdp_config.proma must be a mapping of ProjectedAccumulator settings, got "
                f"{type(self.proma).__name__}"
            )
        unknown = sorted(set(self.proma) - set(_SETTINGS))
        if unknown:
            raise ValueError(
                f"fsdp_config.proma has unknown key(s) {unknown}; allowed: {list(_SETTINGS)}"
            )

    def proma_settings(self) -> dict[str, Any]:
        """The ``proma`` mapping as ``ProjectedAccumulator`` keyword arguments."""
        settings = dict(self.proma)
        if "exclude" in settings and not isinstance(settings["exclude"], str):
            settings["exclude"] = tuple(settings["exclude"])  # a Hydra ListConfig or list
        return settings


def sequence_ids(
    micro_batch: Any, *, use_remove_padding: bool = True, pad_size: int = 0
) -> torch.Tensor:
    """Sequence ids of the tokens the model sees for one VeRL engine microbatch.

    ``micro_batch["input_ids"]`` is a jagged ``torch.nested`` tensor of ``B`` sequences whose
    ``offsets()`` are the cumulative sequence lengths.

    Args:
        micro_batch: the engine's microbatch (a ``TensorDict``, or any mapping with
            ``input_ids``).
        use_remove_padding: VeRL's ``use_remove_padding``: the model sees the tokens packed
            into one ``(1, nnz + pad_size)`` row; otherwise ``(B, max_len)`` right-padded rows.
        pad_size: padding VeRL appends to the packed row (``pad_to_length``).

    Returns:
        ``(1, nnz + pad_size)`` or ``(B, max_len)`` int64 ids: sequence ``i`` gets ``i``,
        padding ``-1``.
    """
    input_ids = micro_batch["input_ids"]
    if not (isinstance(input_ids, torch.Tensor) and input_ids.is_nested):
        raise TypeError(
            "micro_batch['input_ids'] must be a jagged torch.nested tensor (VeRL's no-padding "
            f"layout), got {type(input_ids).__name__}"
        )
    offsets = input_ids.offsets()
    if use_remove_padding:
        return from_cu_seqlens(offsets, total_len=int(offsets[-1]) + pad_size)
    if pad_size:
        raise ValueError("pad_size applies only with use_remove_padding=True")
    lengths = offsets.diff()
    width = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    return from_attention_mask(mask)


class PromaFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """VeRL's FSDP engine for language models with PROMA accumulation across microbatches.

    Active when ``engine_config`` is a :class:`PromaFSDPEngineConfig`; the accumulator is
    ``self.proma`` (after ``initialize()``), attached only during training batches
    (``forward_backward_batch`` with ``forward_only=False``). Otherwise this is
    ``FSDPEngineWithLMHead`` unchanged.
    """

    def __init__(self, model_config: Any, engine_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(model_config, engine_config, *args, **kwargs)
        self.proma: ProjectedAccumulator | None = None
        self._proma_settings: dict[str, Any] | None = None
        self._proma_open: contextlib.ExitStack | None = None
        if isinstance(engine_config, PromaFSDPEngineConfig):
            if engine_config.strategy != "fsdp2":
                raise ValueError(
                    "PROMA in VeRL needs actor.strategy=fsdp2 (FSDP1's flat parameters hide the "
                    f"layers' own parameters), got strategy={engine_config.strategy!r}"
                )
            if self.ulysses_sequence_parallel_size > 1:
                raise NotImplementedError(
                    "PROMA does not support Ulysses sequence parallelism "
                    f"(ulysses_sequence_parallel_size={self.ulysses_sequence_parallel_size}): "
                    "each sequence's gradient would be split across ranks"
                )
            self._proma_settings = engine_config.proma_settings()

    def initialize(self) -> None:
        super().initialize()
        if self._proma_settings is not None:
            self.proma = ProjectedAccumulator(self.module, **self._proma_settings)

    def forward_backward_batch(
        self, data: Any, loss_function: Any, forward_only: bool = False
    ) -> Any:
        if forward_only or self.proma is None:
            return super().forward_backward_batch(data, loss_function, forward_only=forward_only)
        with self.proma:  # hooks only for the training batch; removed even if it fails
            return super().forward_backward_batch(data, loss_function, forward_only=False)

    @contextlib.contextmanager
    def _gradient_sync_context(self, *, is_last_micro_batch: bool) -> Iterator[None]:
        # Entered around each training microbatch's forward_step and backward: forward_step
        # opens the PROMA microbatch (it knows the sequence ids) on this stack, which closes
        # after the backward.
        with super()._gradient_sync_context(is_last_micro_batch=is_last_micro_batch):
            if self.proma is None or not self.proma.attached:
                yield
                return
            with contextlib.ExitStack() as stack:
                self._proma_open = stack
                try:
                    yield
                finally:
                    self._proma_open = None

    def forward_step(self, micro_batch: Any, loss_function: Any, forward_only: bool) -> Any:
        if self.proma is not None and self.proma.attached and not forward_only:
            stack = self._proma_open
            if stack is None:
                raise RuntimeError(
                    "forward_step ran for training outside _gradient_sync_context (or twice in "
                    "one): this VeRL version's microbatch loop is not the one "
                    "proma_accum.integrations.verl supports"
                )
            self._proma_open = None
            stack.enter_context(self.proma.microbatch(self._proma_sequence_ids(micro_batch)))
        return super().forward_step(micro_batch, loss_function, forward_only)

    def _proma_sequence_ids(self, micro_batch: Any) -> torch.Tensor:
        if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
            raise NotImplementedError(
                "PROMA needs use_fused_kernels=False: the fused kernels compute the log-probs "
                "without running the LM head as a module, so its per-sequence gradients are "
                "not seen"
            )
        remove_padding = tu.get_non_tensor_data(
            data=micro_batch, key="use_remove_padding", default=True
        )
        pad = 0
        if remove_padding:
            pad = self._get_packed_pad_size(int(micro_batch["input_ids"].offsets()[-1]))
        return sequence_ids(micro_batch, use_remove_padding=remove_padding, pad_size=pad)


def _register() -> None:
    """Put the PROMA engine in VeRL's registry wherever ``FSDPEngineWithLMHead`` is (the
    registry's public ``register`` refuses to replace an entry)."""
    backends = EngineRegistry._engines.get("language_model", {})
    for backend in ("fsdp", "fsdp2"):
        entries = backends.get(backend, {})
        for key, engine_cls in list(entries.items()):
            if engine_cls is FSDPEngineWithLMHead:
                entries[key] = PromaFSDPEngineWithLMHead


_register()
