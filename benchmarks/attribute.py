"""Where a variant's extra time over plain accumulation goes, by ATen operator, inside real steps.

Usage (from the repository root)::

    python -m benchmarks.attribute                          # proma-exact vs plain, T64
    python -m benchmarks.attribute --workload default --variant proma-gs2 --steps 3

Both variants' models are built from the same seed in this process; each runs a warm-up step,
then ``--steps`` steps of each are profiled with ``torch.profiler`` (CPU), alternating. Every
ATen operator's *self* time (its own time, not its callees') is summed per step and grouped
into the categories of :data:`CATEGORIES` (the first matching category counts; GEMMs whose
result has at most ``SMALL_OUTPUT`` rows or columns, the Gram matrices, apart); what is left of
the profiled step time is "outside ATen operators": Python (the hooks, the k × k bookkeeping's
interpreter time), the autograd engine, and the profiler's own per-operator bookkeeping, which
inflates this row and the many-small-operator rows. The table lists each category's time per
step in both variants, the difference, and the difference as a share of plain's profiled step.

This attributes the gap measured by ``python -m benchmarks.run`` (which times unprofiled steps
in fresh processes); it does not replace it. The per-operator rows answer "which kind of work
would a faster kernel have to remove": operators run in place of plain's (the per-sequence
GEMM replaces the weight-gradient GEMM) show up as a positive ``bmm`` row and a negative ``mm``
row.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/attribute.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.variants import VARIANTS, make_variant
from benchmarks.workloads import Workload, quick_workloads, standard_workloads, tokens_in_loss

# (category, ATen operators in it); an operator in no list counts as "other ATen operators".
# GEMMs are split by the size of their result: the Gram matrices (k x k) and other products
# with at most SMALL_OUTPUT rows or columns, and the rest (weight and input gradients).
SMALL_OUTPUT = 64
GEMMS = frozenset({"aten::mm", "aten::addmm"})
SMALL_GEMM = f"GEMM with a result of at most {SMALL_OUTPUT} rows or columns (Gram matrices)"
CATEGORIES: list[tuple[str, frozenset[str]]] = [
    ("batched GEMM (bmm: per-sequence gradients)", frozenset({"aten::bmm", "aten::baddbmm"})),
    ("GEMM (mm/addmm: weight and input gradients)", GEMMS),
    (SMALL_GEMM, GEMMS),
    (
        "matrix-vector (mv/addmv: inner products, combination)",
        frozenset({"aten::mv", "aten::addmv", "aten::addmv_", "aten::dot"}),
    ),
    ("reductions (sum, norms)", frozenset({"aten::sum", "aten::linalg_vector_norm"})),
    (
        "k x k linear algebra (eigh, triangular solves)",
        frozenset({"aten::_linalg_eigh", "aten::linalg_eigvalsh", "aten::linalg_solve_triangular"}),
    ),
    (
        "copies and fills",
        frozenset({"aten::copy_", "aten::fill_", "aten::zero_", "aten::_to_copy", "aten::clone"}),
    ),
]
OTHER_OPS = "other ATen operators"
OUTSIDE = "outside ATen operators (Python, autograd engine, profiler)"


@dataclass
class StepProfile:
    """Per-step self times (s) and call counts by category, and the profiled step time (s)."""

    wall_s: float = 0.0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def category(op: str, shapes: list | None = None) -> str:
    """The category an ATen operator's time is counted in; ``shapes`` are its input shapes
    (for GEMMs: the result is ``shapes[-2][0] x shapes[-1][1]``)."""
    if op in GEMMS and shapes and len(shapes) >= 2 and shapes[-2] and shapes[-1]:
        rows, cols = shapes[-2][0], shapes[-1][-1]
        if min(rows, cols) <= SMALL_OUTPUT:
            return SMALL_GEMM
    for name, ops in CATEGORIES:
        if op in ops:
            return name
    return OTHER_OPS


def summarise(events, wall_s: float, steps: int) -> StepProfile:
    """Group ``(name, input shapes, self_seconds, count)`` of ATen operators into a per-step
    profile.

    Non-ATen events (autograd nodes, ``autograd::engine`` scopes) are not counted: their self
    time is what ``OUTSIDE`` collects, as the profiled time left after every ATen operator.
    """
    prof = StepProfile(wall_s=wall_s / steps)
    for name, shapes, self_s, count in events:
        if not name.startswith("aten::"):
            continue
        cat = category(name, shapes)
        prof.seconds[cat] += self_s / steps
        prof.calls[cat] += count / steps
    prof.seconds[OUTSIDE] = prof.wall_s - sum(prof.seconds.values())
    return prof


def profile_steps(wl: Workload, runs: dict[str, str], steps: int) -> dict[str, StepProfile]:
    """Profile ``steps`` steps of each run (``{label: variant name}``, alternating), after one
    warm-up step each. Two labels may name the same variant (a noise calibration)."""
    from torch.profiler import ProfilerActivity, profile

    variants = {}
    warm = wl.with_(seq_len=min(wl.seq_len, 32), microbatches=2).make_batches(seed=2)
    for label, name in runs.items():
        variant = make_variant(name)
        variant.setup(wl.model.build(seed=0), wl)
        variant.step(warm, tokens_in_loss(warm))
        variants[label] = variant
    batches = wl.make_batches(seed=1)
    n_tokens = tokens_in_loss(batches)
    events: dict[str, list] = {label: [] for label in runs}
    walls = dict.fromkeys(runs, 0.0)
    for _ in range(steps):
        for label, variant in variants.items():
            gc.collect()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                start = time.perf_counter()
                variant.step(batches, n_tokens)
                walls[label] += time.perf_counter() - start
            events[label].extend(
                (e.key, e.input_shapes, e.self_cpu_time_total / 1e6, e.count)
                for e in prof.key_averages(group_by_input_shape=True)
            )
    for variant in variants.values():
        variant.teardown()
    return {label: summarise(events[label], walls[label], steps) for label in runs}


def report(wl: Workload, base: str, other: str, profiles: dict[str, StepProfile]) -> list[str]:
    """A markdown table of per-step time by category: both variants and the difference."""
    a, b = profiles[base], profiles[other]
    rows = [name for name, _ in CATEGORIES] + [OTHER_OPS, OUTSIDE]
    lines = [
        f"{other} vs {base} on {wl.name} ({wl.description}); profiled step: {base} "
        f"{a.wall_s * 1e3:.0f} ms, {other} {b.wall_s * 1e3:.0f} ms "
        f"(ratio {b.wall_s / a.wall_s:.2f}, profiler overhead included)",
        "",
        f"| category | {base} ms/step | {other} ms/step | difference ms | share of {base} "
        f"| calls/step {base} → {other} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        sa, sb = a.seconds.get(row, 0.0), b.seconds.get(row, 0.0)
        calls = (
            "" if row == OUTSIDE else f"{a.calls.get(row, 0.0):.0f} → {b.calls.get(row, 0.0):.0f}"
        )
        lines.append(
            f"| {row} | {sa * 1e3:.1f} | {sb * 1e3:.1f} | {(sb - sa) * 1e3:+.1f} "
            f"| {(sb - sa) / a.wall_s:+.1%} | {calls} |"
        )
    lines.append(
        f"| **step** | {a.wall_s * 1e3:.1f} | {b.wall_s * 1e3:.1f} "
        f"| {(b.wall_s - a.wall_s) * 1e3:+.1f} | {(b.wall_s - a.wall_s) / a.wall_s:+.1%} | |"
    )
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.attribute",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workload", default="T64", help="a workload of benchmarks.run --list")
    p.add_argument("--variant", default="proma-exact", choices=VARIANTS)
    p.add_argument("--base", default="plain", choices=VARIANTS, help="what it is compared with")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per variant")
    p.add_argument("--quick", action="store_true", help="tiny model (seconds; smoke test)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 2; 1 with --quick)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    catalogue = quick_workloads() if args.quick else standard_workloads()
    if args.workload not in catalogue:
        print(f"unknown workload {args.workload!r}; choose from {list(catalogue)}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"--steps must be at least 1, got {args.steps}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    wl = catalogue[args.workload]
    other = args.variant if args.variant != args.base else f"{args.variant} (second model)"
    profiles = profile_steps(wl, {args.base: args.base, other: args.variant}, args.steps)
    print("\n".join(report(wl, args.base, other, profiles)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
