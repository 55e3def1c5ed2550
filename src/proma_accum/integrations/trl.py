"""PROMA accumulation for TRL's ``GRPOTrainer`` (install the ``trl`` extra).

:class:`PromaGRPOTrainer` is ``GRPOTrainer`` with :class:`PromaTrainerMixin`: every microbatch
(one ``training_step``) is a PROMA microbatch whose sequences are the rows of the prepared
batch (prompt left-padded, completion right-padded: one sequence per row).

TRL computes the completion log-probabilities with a *fused* LM head: the ``lm_head`` module's
forward never runs, so its weight gets a gradient that no layer hook saw. When that weight is
trainable and projected, the trainer replaces the fused path with one that calls the model's
own forward on the completion positions (the full-vocabulary logits of those positions are
materialised) and computes the same log-probabilities and entropies from them; the reason is
logged. Pass ``proma_unfuse_lm_head=False`` to keep the fused head and accumulate the LM head
(and an embedding tied to it) plainly instead.
"""

from __future__ import annotations

import inspect
import logging
import types
import weakref
from collections.abc import Mapping
from typing import Any

import torch

try:
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "proma_accum.integrations.trl needs TRL: pip install 'proma-accum[trl]'"
    ) from exc

from .. import ProjectedAccumulator
from .hf_trainer import PromaTrainerMixin

__all__ = ["PromaGRPOTrainer", "PromaTrainerMixin", "UnfusedHead", "unfuse_lm_head"]

logger = logging.getLogger(__name__)

# Loss types whose per-token loss, with unit advantages, has the gradient of the plain
# log-probability term on-policy, and whose gradient is linear in the advantages.
_ADVANTAGE_MODE_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo")


class UnfusedHead:
    """The handle :func:`unfuse_lm_head` returns: ``active`` switches the unfused path on and
    off (off: the model's previous forward runs unchanged); :meth:`restore` puts the previous
    forward back, or, when another wrapper has been placed over it since (accelerate wraps the
    forward for mixed precision), leaves the patch switched off for good."""

    def __init__(self, model: Any, previous: Any, had_own: bool) -> None:
        self.active = True
        self._model, self._previous, self._had_own = model, previous, had_own
        self.patched: Any = None

    def restore(self) -> None:
        self.active = False
        model = self._model
        if self.patched is None or vars(model).get("forward") is not self.patched:
            return
        if self._had_own:
            model.forward = self._previous
        else:
            del model.forward
        self.patched = None


def unfuse_lm_head(model: Any, temperature: float = 1.0, entropy_grad: Any = True) -> UnfusedHead:
    """Replace the fused LM head TRL added to ``model`` by one that calls ``lm_head`` itself.

    ``model(..., labels=labels, fused_lm_head=True)`` then still returns TRL's
    ``FusedCausalLMOutput`` (``loss``, ``log_probs``, ``entropy``, ``label_mask``,
    ``aux_loss``), computed from the model's own logits at the scored positions, so that every
    use of the LM head weight goes through the ``lm_head`` module (and its hooks). Other calls
    are unchanged.

    Args:
        model: the causal LM that ``trl.trainer.utils.add_fused_lm_head`` patched (the base
            model under PEFT).
        temperature: the temperature the logits are divided by (``GRPOConfig.temperature``).
        entropy_grad: bool, or a callable returning one: whether the entropy keeps its graph
            (needed only for an entropy bonus in the loss).

    Returns:
        An :class:`UnfusedHead`: switch it off with ``active = False``, undo it with
        ``restore()``.
    """
    fused_forward = model.forward
    handle = UnfusedHead(model, vars(model).get("forward"), "forward" in vars(model))
    takes_logits_to_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters

    def _unfused_forward(
        self: Any,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head or not handle.active:
            if fused_lm_head:
                kwargs["fused_lm_head"] = True
            return fused_forward(
                *args,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        text_config = self.config.get_text_config()
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        shifted = shift_labels is None
        target = labels[:, 1:] if shifted else shift_labels
        mask = target != -100
        width = target.shape[1]
        scored = mask.any(0).nonzero()
        first = int(scored[0]) if scored.numel() else max(width - 1, 0)
        if takes_logits_to_keep:
            # logits of the positions first .. L-1 (L the input length); the last is dropped
            # below when the labels are shifted.
            kwargs["logits_to_keep"] = width - first + (1 if shifted else 0)
            out = fused_forward(*args, **kwargs)
            logits = out.logits
        else:
            out = fused_forward(*args, **kwargs)
            logits = out.logits[:, first:]
        if shifted:
            logits = logits[:, :-1]
        tgt = target[:, first:].to(logits.device)
        keep = mask[:, first:].to(logits.device)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        tok_logp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        tok_logp = tok_logp.masked_fill(~keep, 0.0)
        want_grad = entropy_grad() if callable(entropy_grad) else bool(entropy_grad)
        with torch.set_grad_enabled(torch.is_grad_enabled() and want_grad):
            entropy = -(logp.exp() * logp).sum(-1).masked_fill(~keep, 0.0)
        pad = tok_logp.new_zeros(tok_logp.shape[0], first)
        log_probs = torch.cat([pad, tok_logp], dim=1)
        entropy = torch.cat([pad, entropy], dim=1)
        mask = mask.to(logits.device)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denom
        aux_loss = getattr(out, "aux_loss", None) if kwargs.get("output_router_logits") else None
        if aux_loss is not None:
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask, aux_loss=aux_loss
        )

    handle.patched = types.MethodType(_unfused_forward, model)
    model.forward = handle.patched
    return handle


class PromaGRPOTrainer(PromaTrainerMixin, GRPOTrainer):
    """TRL ``GRPOTrainer`` with PROMA accumulation across its gradient-accumulation steps.

    Takes every ``GRPOTrainer`` argument, plus the ``proma_*`` keywords of
    :class:`~proma_accum.integrations.hf_trainer.PromaTrainerMixin` and:

    Args:
        proma_unfuse_lm_head: if the LM head weight is trainable and projected, compute the
            completion log-probabilities through the ``lm_head`` module (default). With
            ``False`` TRL's fused head is kept and the LM head weight (with an embedding tied
            to it) is accumulated plainly.
        proma_advantages: if True, use the note's formulation: the loss is computed with unit
            advantages (the per-sequence log-probability gradients), the advantages are passed
            to the accumulator, which forms ``Σ_i A_i g_i`` itself; zero-advantage sequences
            are then projected out too. Needs ``beta=0``, no entropy bonus, no off-policy mask,
            ``num_iterations=1`` and a loss type among grpo, bnpo, dr_grpo, dapo, luspo, cispo;
            the logged ``loss`` is then the unit-advantage loss.

    Sequence ids: ``arange(B)`` over the rows of each prepared microbatch.
    """

    def __init__(
        self,
        *args: Any,
        proma_unfuse_lm_head: bool = True,
        proma_advantages: bool = False,
        **kwargs: Any,
    ) -> None:
        self._proma_unfuse_lm_head = proma_unfuse_lm_head
        self._proma_use_advantages = proma_advantages
        super().__init__(*args, **kwargs)
        if proma_advantages:
            self._proma_check_advantage_mode()

    # ------------------------------------------------------------------ set-up
    def _proma_prepare_model(self) -> None:
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._proma_unfused: UnfusedHead | None = None
        lm_head = base.get_output_embeddings()
        if lm_head is None:
            return
        # Which of the head's tensors the accumulator would project: the coverage rules
        # (exclusion patterns, kernels) decide, as for any tensor.
        probe = ProjectedAccumulator(self.model, exclude=self._proma_exclude)
        head = {p for p in lm_head.parameters() if p.requires_grad}
        names = {p: n for n, p in self.model.named_parameters() if p in head}
        projected = [names[p] for p in head if names[p] in probe.projected_parameters()]
        if not projected:
            return  # frozen or excluded head: the fused path needs no sequence data
        if self._proma_unfuse_lm_head:
            logger.warning(
                "PROMA: TRL's fused LM head is turned off during train(): the LM head weight "
                "is projected, which needs the lm_head module's own forward (per-sequence "
                "data). The logits of the completion positions are materialised instead. Pass "
                "proma_unfuse_lm_head=False to keep the fused head and accumulate the LM head "
                "(and an embedding tied to it) plainly."
            )
            ref = weakref.ref(self)

            def entropy_grad() -> bool:
                trainer = ref()
                return bool(getattr(trainer, "_entropy_bonus_enabled", True))

            # In place from now on (accelerate wraps the forward it finds when train() starts),
            # but switched on only while train() runs.
            self._proma_unfused = unfuse_lm_head(
                base, temperature=self.temperature, entropy_grad=entropy_grad
            )
            self._proma_unfused.active = False
        else:
            self._proma_exclude.extend(_glob_escape(n) for n in projected)
            logger.warning(
                "PROMA: TRL's fused LM head is kept (proma_unfuse_lm_head=False): %s "
                "accumulated plainly.",
                ", ".join(projected),
            )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``GRPOTrainer.train``, with the LM head unfused while it runs (see the class
        docstring); switched off again when it returns or raises, so that outside ``train()``
        the model's forward behaves as TRL's."""
        unfused = self._proma_unfused
        if unfused is not None:
            unfused.active = True
        try:
            return super().train(*args, **kwargs)
        finally:
            if unfused is not None:
                unfused.active = False

    def _proma_check_advantage_mode(self) -> None:
        problems = []
        if self.beta != 0.0:
            problems.append(f"beta={self.beta} (need 0: the KL term is no log-probability)")
        if getattr(self, "_entropy_bonus_enabled", False):
            problems.append("an entropy bonus is enabled")
        if self.off_policy_mask_threshold is not None:
            problems.append("off_policy_mask_threshold is set (it reads the advantages' sign)")
        if self.num_iterations != 1:
            problems.append(f"num_iterations={self.num_iterations} (need 1: on-policy)")
        if self.loss_type not in _ADVANTAGE_MODE_LOSSES:
            problems.append(f"loss_type={self.loss_type!r} (need one of {_ADVANTAGE_MODE_LOSSES})")
        if self.proma.unprojected_parameters():
            problems.append(
                "some trainable tensors are not projected: "
                f"{sorted(self.proma.unprojected_parameters())}"
            )
        if problems:
            raise ValueError("proma_advantages=True needs: " + "; ".join(problems))

    # ------------------------------------------------------------------ microbatches
    def proma_sequence_ids(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        completion_ids = inputs["completion_ids"]
        return torch.arange(completion_ids.shape[0], device=completion_ids.device)

    def proma_microbatch_args(
        self, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, Mapping[str, Any]]:
        seq_ids = self.proma_sequence_ids(inputs)
        if not self._proma_use_advantages:
            return seq_ids, None, inputs
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(
                "proma_advantages=True needs one advantage per sequence, shape (B,); got "
                f"{tuple(advantages.shape)}"
            )
        unit = {**inputs, "advantages": torch.ones_like(advantages)}
        return seq_ids, advantages.float(), unit


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
