"""Optimizer pass-through of ``ProjectedAccumulator`` (``optimizer=``), torch.optim-style."""

from __future__ import annotations

from typing import Any

import torch


class OptimizerPassThrough:
    """``zero_grad``, ``step``, ``param_groups``, ``state``, ``state_dict`` and
    ``load_state_dict`` of the wrapped optimizer; a new step also empties the accumulator's
    kept buffers. Mixed into ``ProjectedAccumulator``, whose attributes it reads."""

    optimizer: torch.optim.Optimizer | None
    model: torch.nn.Module
    projection: str
    clamp: float | None
    strength: float
    exclude: tuple[str, ...]
    chunk_bytes: int
    _workspace: Any
    _stats: Any

    def _require_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RuntimeError(
                "no optimizer was given: construct with ProjectedAccumulator(model, optimizer=opt)"
            )
        return self.optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new step: the wrapped optimizer's ``zero_grad`` (or the model's)."""
        self._workspace.clear()
        if self.optimizer is None:
            self.model.zero_grad(set_to_none=set_to_none)
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)
        if not set_to_none:
            self._stats.new_step()

    def step(self, closure: Any = None) -> Any:
        """The wrapped optimizer's ``step``."""
        self._workspace.clear()
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
