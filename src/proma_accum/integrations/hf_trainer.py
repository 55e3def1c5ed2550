"""PROMA accumulation for any ``transformers.Trainer`` subclass.

``Trainer.training_step`` runs one microbatch: it prepares the inputs, calls ``compute_loss``
(the forward) and then ``accelerator.backward`` (inside ``accelerator.no_sync`` except on the
last microbatch of an optimizer step). :class:`PromaTrainerMixin` opens
``ProjectedAccumulator.microbatch(seq_ids)`` in ``compute_loss``, once the inputs are prepared,
and closes it when ``training_step`` returns, after the backward. Forwards outside it
(generation, evaluation, no-grad scoring) are ignored by the accumulator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .. import ProjectedAccumulator
from ..sequence_ids import from_position_ids

__all__ = ["PromaTrainerMixin"]

logger = logging.getLogger(__name__)


class PromaTrainerMixin:
    """Mixin for a ``transformers.Trainer`` subclass: PROMA across gradient-accumulation steps.

    Put it first among the bases: ``class MyTrainer(PromaTrainerMixin, Trainer): ...``. The
    keyword arguments below are taken out before the trainer's own ``__init__`` runs; the
    accumulator is built on ``self.model`` afterwards (so after any PEFT wrapping the trainer
    does) and attached at once. It is available as ``self.proma``.

    Each call of ``training_step`` is one PROMA microbatch; one optimizer step spans
    ``gradient_accumulation_steps`` of them. ``acc.stats(flat=True)`` is added to every
    training log (keys ``proma/...``).

    Sequence ids come from :meth:`proma_sequence_ids`, which by default gives one sequence
    per row, or, for packed rows (``position_ids`` and no ``attention_mask``, as made by
    ``DataCollatorWithFlattening``), one sequence wherever the position restarts at 0.
    Override it for other layouts.

    Args:
        proma_projection: ``"exact"`` or ``"gs2"`` (see ``ProjectedAccumulator``).
        proma_clamp: bound of the removed part relative to the microbatch gradient's norm,
            or ``None``.
        proma_strength: fraction of the (clamped) projection removed, in ``[0, 1]``; 0 gives
            plain accumulation.
        proma_exclude: ``fnmatch`` patterns of parameter names accumulated plainly.
        proma_chunk_bytes: byte budget of one chunk of per-sequence gradients (None: the
            accumulator's default).
        proma_compile: ``ProjectedAccumulator(compile=...)``: each update as
            ``torch.compile``'d code (fewer kernel launches on a GPU).
    """

    proma: ProjectedAccumulator

    def __init__(
        self,
        *args: Any,
        proma_projection: str = "exact",
        proma_clamp: float | None = 0.5,
        proma_strength: float = 1.0,
        proma_exclude: Iterable[str] = (),
        proma_chunk_bytes: int | None = None,
        proma_compile: bool = False,
        **kwargs: Any,
    ) -> None:
        self._proma_stack: contextlib.ExitStack | None = None
        self._proma_exclude = (
            [proma_exclude] if isinstance(proma_exclude, str) else list(proma_exclude)
        )
        super().__init__(*args, **kwargs)
        self._proma_prepare_model()
        self.proma = ProjectedAccumulator(
            self.model,
            projection=proma_projection,  # type: ignore[arg-type]
            clamp=proma_clamp,
            strength=proma_strength,
            exclude=self._proma_exclude,
            **({} if proma_chunk_bytes is None else {"chunk_bytes": proma_chunk_bytes}),
            compile=proma_compile,
        )
        self.proma.attach()

    # ------------------------------------------------------------------ extension points
    def _proma_prepare_model(self) -> None:
        """Adjust ``self.model`` (or ``self._proma_exclude``) before the accumulator is built."""

    def proma_sequence_ids(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Sequence ids of the prepared microbatch ``inputs`` (what ``compute_loss`` receives).

        Returns ``(B,)`` (one sequence per row) or ``(B, T)`` per-token ids, ``-1`` for
        padding; see :mod:`proma_accum.sequence_ids`.
        """
        position_ids = inputs.get("position_ids")
        if (
            isinstance(position_ids, torch.Tensor)
            and position_ids.dim() == 2
            and inputs.get("attention_mask") is None
        ):
            return from_position_ids(position_ids)
        ref = inputs.get("input_ids")
        if not isinstance(ref, torch.Tensor):
            ref = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        if ref is None or ref.dim() == 0:
            raise ValueError(
                "cannot infer sequence ids: the inputs hold no batched tensor; override "
                "proma_sequence_ids(inputs)"
            )
        return torch.arange(ref.shape[0], device=ref.device)

    def proma_microbatch_args(
        self, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, Mapping[str, Any]]:
        """``(seq_ids, advantages, inputs)`` for this microbatch.

        ``advantages`` is ``None`` (loss mode) unless a subclass rebuilds the policy gradient
        from per-sequence log-probability gradients; ``inputs`` may be replaced (for example
        with unit advantages).
        """
        return self.proma_sequence_ids(inputs), None, inputs

    # ------------------------------------------------------------------ Trainer overrides
    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with contextlib.ExitStack() as stack:
            self._proma_stack = stack
            try:
                return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
            finally:
                self._proma_stack = None

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        stack = self._proma_stack
        if stack is not None and torch.is_grad_enabled():
            self._proma_stack = None  # one microbatch context per training step
            seq_ids, advantages, inputs = self.proma_microbatch_args(inputs)
            stack.enter_context(self.proma.microbatch(seq_ids, advantages=advantages))
        return super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        proma = getattr(self, "proma", None)
        if proma is not None and "loss" in logs:
            logs = {**logs, **proma.stats(flat=True)}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]
