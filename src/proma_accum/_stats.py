"""Diagnostics of the last microbatch and of the current optimizer step, per tensor group.

Per group (the layer kind: ``linear``, ``embedding``, ... or ``all``):

* ``projected_norm_ratio``: ``‖removed‖ / ‖running‖`` over the group's tensors (root of summed
  squares), where ``removed`` is the clamped, strength-scaled projection taken off the running
  gradient ``running``;
* ``clamp_fraction``: fraction of tensor updates in which the clamp bound;
* ``num_sequences``: sequences in the microbatch (mean over microbatches in a step);
* ``rank``: mean numerical rank of the sequence gradients, per tensor;
* ``updates``: number of projected tensor updates.

Values are kept as device tensors during the backward and turned into floats on request.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ._proma import UpdateInfo, rank_of

_FIELDS = ("running_sq", "removed_sq", "clamped", "rank", "sequences", "updates")


class StatsRecorder:
    def __init__(self) -> None:
        self.microbatches = 0
        self.steps = 0
        self._step: dict[str, dict[str, torch.Tensor | float]] = {}
        self._last: dict[str, dict[str, torch.Tensor | float]] = {}
        # This microbatch's updates, summed into the tables in one go (a handful of tensor
        # ops per group instead of a dozen per tensor update).
        self._pending: list[tuple[str, UpdateInfo]] = []
        self._step_microbatches = 0
        self.peak_seq_grad_bytes = 0

    def new_step(self) -> None:
        self._flush()
        self.steps += 1
        self._step = {}
        self._step_microbatches = 0

    def new_microbatch(self) -> None:
        self._flush()
        self.microbatches += 1
        self._step_microbatches += 1
        self._last = {}

    def checkpoint(self) -> tuple:
        """Everything but the byte peak, to :meth:`restore` after a failed microbatch."""
        self._flush()
        tables = tuple(
            {g: defaultdict(float, row) for g, row in t.items()} for t in (self._step, self._last)
        )
        return (self.microbatches, self.steps, self._step_microbatches, *tables)

    def restore(self, checkpoint: tuple) -> None:
        (self.microbatches, self.steps, self._step_microbatches, self._step, self._last) = (
            checkpoint
        )
        self._pending = []

    def record(self, group: str, info: UpdateInfo) -> None:
        self._pending.append((group, info))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        groups: dict[str, list[UpdateInfo]] = defaultdict(list)
        for group, info in pending:
            groups[group].append(info)
            groups["all"].append(info)
        for key, infos in groups.items():
            sums = _sums(infos)
            for table in (self._last, self._step):
                row = table.setdefault(key, defaultdict(float))
                for name, value in sums.items():
                    row[name] = row[name] + value

    def summary(self) -> dict:
        self._flush()
        return {
            "microbatches": self.microbatches,
            "steps": self.steps,
            "peak_seq_grad_bytes": self.peak_seq_grad_bytes,
            "microbatch": _summarise(self._last),
            "step": {"microbatches": self._step_microbatches, **_summarise(self._step)},
        }


def _sums(infos: list[UpdateInfo]) -> dict[str, torch.Tensor | float]:
    """The group's sums, formed for all its updates at once (a few ops per group)."""
    device = infos[0].running_sq.device
    finite = torch.stack([i.finite for i in infos])
    proj = torch.stack([i.proj_norm for i in infos])
    removed = torch.where(
        finite,
        proj
        * _stack([i.scale for i in infos], device)
        * _stack([i.removed_factor for i in infos], device),
        0.0,
    )
    clamped = (proj > _stack([i.bound for i in infos], device)) & finite
    by_k: dict[int, list[int]] = defaultdict(list)  # one k per microbatch: one group
    for j, info in enumerate(infos):
        by_k[info.pivots.shape[0]].append(j)
    ranks = [
        torch.where(
            finite if len(idx) == len(infos) else finite[idx],
            rank_of(torch.stack([infos[j].pivots for j in idx])),
            0,
        ).sum()
        for idx in by_k.values()
    ]
    return {
        "running_sq": torch.stack([i.running_sq for i in infos]).sum(),
        "removed_sq": removed.square().sum(),
        "clamped": clamped.double().sum(),
        "rank": sum(ranks[1:], ranks[0]).double(),
        "sequences": sum(i.num_sequences for i in infos),
        "updates": len(infos),
    }


def _stack(values: list[torch.Tensor | float], device: torch.device) -> torch.Tensor | float:
    """``(n,)`` float64 from 0-d tensors or floats, or the one float they all are. Floats go to
    the device as fill kernels' arguments, never by a host-to-device copy (which synchronises
    on CUDA)."""
    if all(isinstance(v, float | int) for v in values) and len(set(values)) == 1:
        return float(values[0])
    return torch.stack(
        [
            v
            if isinstance(v, torch.Tensor)
            else torch.full((), v, dtype=torch.float64, device=device)
            for v in values
        ]
    )


def _summarise(table: dict[str, dict[str, torch.Tensor | float]]) -> dict[str, dict[str, float]]:
    out = {}
    for group, row in sorted(table.items()):
        vals = {k: float(row[k]) for k in _FIELDS}
        n = max(vals["updates"], 1.0)
        out[group] = {
            "projected_norm_ratio": (vals["removed_sq"] / vals["running_sq"]) ** 0.5
            if vals["running_sq"] > 0
            else 0.0,
            "clamp_fraction": vals["clamped"] / n,
            "num_sequences": vals["sequences"] / n,
            "rank": vals["rank"] / n,
            "updates": vals["updates"],
        }
    return out


def flatten(summary: dict, prefix: str = "proma") -> dict[str, float]:
    """``{"proma/<scope>/<group>/<metric>": value}`` for loggers that take flat dicts."""
    flat: dict[str, float] = {}
    for scope in ("microbatch", "step"):
        for group, metrics in summary[scope].items():
            if not isinstance(metrics, dict):
                continue
            for metric, value in metrics.items():
                flat[f"{prefix}/{scope}/{group}/{metric}"] = float(value)
    flat[f"{prefix}/microbatches"] = float(summary["microbatches"])
    flat[f"{prefix}/steps"] = float(summary["steps"])
    return flat
