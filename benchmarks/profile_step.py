"""Profile one optimizer step of one variant with pyinstrument (sampling profiler).

Usage (from the repository root; ``pip install pyinstrument`` first, it is not a dependency
of the project)::

    python -m benchmarks.profile_step                          # proma-exact, default workload
    python -m benchmarks.profile_step --variant proma-gs2 --workload T64 --html profile.html

The model is built and the variant attached, one small warm-up step runs, then one full step
of the workload is profiled. Printed: pyinstrument's call tree, then the functions of
``proma_accum`` ranked by inclusive time (time spent in the function and everything it
calls; nested calls of the same function counted once) with their self time.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/profile_step.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.variants import VARIANTS, make_variant
from benchmarks.workloads import standard_workloads, tokens_in_loss

PACKAGE_MARKER = "proma_accum"


def library_hot_spots(root, marker: str = PACKAGE_MARKER) -> list[dict]:
    """Functions whose file path contains ``marker``, by inclusive and self time."""
    totals: dict[tuple[str, str, int], dict] = {}

    def visit(frame, active: frozenset) -> None:
        path = frame.file_path or ""
        key = (frame.function, path, frame.line_no or 0)
        inside = marker in path
        if inside:
            entry = totals.setdefault(key, {"inclusive_s": 0.0, "self_s": 0.0, "calls": 0})
            entry["self_s"] += frame.total_self_time
            if key not in active:
                entry["inclusive_s"] += frame.time
                entry["calls"] += 1
            active = active | {key}
        for child in frame.children:
            visit(child, active)

    visit(root, frozenset())
    rows = []
    for (function, path, line), entry in totals.items():
        short = path[path.index(marker) :] if marker in path else path
        rows.append({"function": function, "where": f"{short}:{line}", **entry})
    rows.sort(key=lambda r: r["inclusive_s"], reverse=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workload", default="default", choices=list(standard_workloads()))
    p.add_argument("--variant", default="proma-exact", choices=VARIANTS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--interval", type=float, default=0.002, help="sampling interval (s)")
    p.add_argument("--top", type=int, default=15, help="rows of the hot-spot table")
    p.add_argument("--html", type=Path, help="also write pyinstrument's HTML report here")
    args = p.parse_args(argv)
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("pyinstrument is needed: pip install pyinstrument", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    wl = standard_workloads()[args.workload]
    model = wl.model.build(seed=0)
    variant = make_variant(args.variant)
    variant.setup(model, wl)
    warm = wl.with_(seq_len=min(wl.seq_len, 32), microbatches=2).make_batches(seed=2)
    variant.step(warm, tokens_in_loss(warm))
    batches = wl.make_batches(seed=1)
    n_tokens = tokens_in_loss(batches)
    gc.collect()

    profiler = Profiler(interval=args.interval)
    start = time.perf_counter()
    profiler.start()
    variant.step(batches, n_tokens)
    profiler.stop()
    wall = time.perf_counter() - start
    print(profiler.output_text(unicode=False, color=False))
    if args.html:
        args.html.write_text(profiler.output_html())
    print(
        f"{args.variant} on {args.workload} ({wl.description}), {args.threads} thread(s): "
        f"{wall:.2f} s for the step\n"
    )
    print(f"| {PACKAGE_MARKER} function | where | inclusive s | share | self s |")
    print("|---|---|---:|---:|---:|")
    for row in library_hot_spots(profiler.last_session.root_frame())[: args.top]:
        print(
            f"| {row['function']} | {row['where']} | {row['inclusive_s']:.2f} "
            f"| {row['inclusive_s'] / wall:.0%} | {row['self_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
