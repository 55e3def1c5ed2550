"""CPU-scale evidence for the note's Figure 2: GRPO vs REINFORCE vs PROMA.

A tiny Qwen3 policy learns two-digit addition with a verifiable reward; the methods differ
only in their update rule. Run ``proma-accum demo`` (or ``python -m proma_accum.demo``);
``--quick`` finishes in about a minute. ``proma-accum plot results.json`` redraws the figure
of a finished run. ``proma-accum sweep`` runs the trade-off grid of ``docs/evidence.md``
(learning rate x method, and PROMA's settings), resumably. See :func:`main` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._experiment import DEFAULT_METHODS, METHODS, DemoConfig
from ._report import format_table, format_verdicts, plot_figure, summarize, verdicts, write_json
from ._runner import run_experiment

__all__ = ["METHODS", "DemoConfig", "main", "run", "run_experiment"]


def run(cfg: DemoConfig, out: str | Path = "proma-demo-out", *, progress: bool = True) -> dict:
    """Run the experiment, write ``results.json`` and ``figure.png`` under ``out``.

    Returns the results dict (configuration, per-step metrics of every method and seed,
    ``summary``, ``verdicts``, ``table`` and ``verdict_text``).
    """
    results = run_experiment(cfg, progress=progress)
    results["summary"] = summarize(results)
    results["verdicts"] = verdicts(results)
    results["table"] = format_table(results, results["summary"])
    results["verdict_text"] = format_verdicts(results, results["verdicts"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    plot_figure(results, out / "figure.png")
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proma-accum",
        description="PROMA (Projected Microbatch Accumulation): the CPU-scale demo of the note's "
        "Figure 2 and its figure. Run `proma-accum demo --quick` for a run of about a minute.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    d = sub.add_parser(
        "demo",
        help="GRPO vs REINFORCE vs PROMA on a small RL task (5 seeds: minutes; --quick: ~1 min)",
        description="GRPO vs REINFORCE vs PROMA on a small RL task, on CPU, in minutes "
        "(the note's Figure 2 at CPU scale). No downloads. Writes results.json and figure.png.",
    )
    d.add_argument("--quick", action="store_true", help="small run, under a minute")
    d.add_argument("--seeds", type=int, help="seeds per method (default 5; quick: 2)")
    d.add_argument("--steps", type=int, help="RL steps per run (default 100; quick: 20)")
    d.add_argument(
        "--methods",
        help=f"comma-separated, from {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    d.add_argument("--out", default="proma-demo-out", help="output directory")
    d.add_argument(
        "--workers", type=int, help="worker processes (default: min(2, CPU count); 1 = inline)"
    )
    d.add_argument(
        "--no-progress", action="store_true", help="no progress bar (one line per finished run)"
    )
    sw = sub.add_parser(
        "sweep",
        help="trade-off curves: learning rate x method, and PROMA's settings (resumable)",
        description="Run the grid of docs/evidence.md (learning rate x GRPO/REINFORCE/PROMA; "
        "accumulation length, clamp, strength, projection and mode at one learning rate). "
        "Finished runs are cached under OUT/cache, so an interrupted sweep resumes. Writes "
        "OUT/sweep.json, OUT/report.md and the figures.",
    )
    sw.add_argument("--quick", action="store_true", help="smoke run of every axis (~30 s)")
    sw.add_argument("--out", default="proma-sweep-out", help="output directory (and cache)")
    sw.add_argument("--seeds", type=int, help="seeds per cell (default 5; quick: 2)")
    sw.add_argument("--steps", type=int, help="RL steps per run (default 40; quick: 2)")
    sw.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    sw.add_argument("--report-only", action="store_true", help="no training: report what is cached")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    pl = sub.add_parser(
        "plot",
        help="redraw the four-panel figure from a demo's results.json (no training)",
        description="Redraw the four-panel figure from the results.json a demo run wrote.",
    )
    pl.add_argument("results", type=Path, help="path of a results.json written by the demo")
    pl.add_argument(
        "--out", type=Path, help="figure to write (default: figure.png next to the results)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``proma-accum``: ``demo [options]``, ``sweep [options]``,
    ``plot RESULTS``, or help.

    ``python -m proma_accum.demo [options]`` is ``proma-accum demo [options]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:  # never start a long run by accident
        parser.print_help()
        return 0
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        parser.error(f"{argv[0]} is an option of a command: e.g. proma-accum demo {' '.join(argv)}")
    args = parser.parse_args(argv)
    if args.command == "plot":
        return _plot(parser, args.results, args.out)
    if args.command == "sweep":
        return _sweep_command(args, argv)
    overrides = {}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.methods:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.workers is not None:
        overrides["workers"] = args.workers
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    try:
        cfg.validate()
    except ValueError as err:
        parser.error(str(err))
    results = run(cfg, args.out, progress=not args.no_progress)
    c = results["config"]
    print(
        f"\n{len(c['methods'])} methods x {c['seeds']} seeds x {c['steps']} steps, "
        f"{c['prompts_per_step']} prompts x {c['group_size']} samples per step, "
        f"{c['minibatches']} minibatches, microbatches of {c['microbatch_size']}, "
        f"lr {c['lr']:g}; {results['runtime_s']:.0f} s\n"
    )
    print(results["table"])
    print()
    print(results["verdict_text"])
    print(f"\nwrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'figure.png'}")
    return 0


def _plot(parser: argparse.ArgumentParser, results: Path, out: Path | None) -> int:
    try:
        data = json.loads(results.read_text())
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"results: cannot read {results}: {err}")
    missing = {"methods", "seeds", "steps", "metrics", "config"} - set(data)
    if missing:
        parser.error(f"results: {results} is not a demo's results.json (no {sorted(missing)})")
    out = out if out is not None else results.with_name("figure.png")
    plot_figure(data, out)
    print(f"wrote {out}")
    return 0


def _sweep_command(args: argparse.Namespace, argv: list[str]) -> int:
    from ._sweep import SweepSpec, run_sweep
    from ._sweep_report import write_outputs

    spec = SweepSpec.quick() if args.quick else SweepSpec()
    if args.seeds is not None:
        spec.seeds = args.seeds
    if args.steps is not None:
        spec.base = {**spec.base, "steps": args.steps}
    timing = None
    if not args.report_only:
        timing = run_sweep(spec, args.out, workers=args.workers, progress=not args.no_progress)
    summary = write_outputs(spec, args.out, timing=timing, argv=argv)
    print(summary)
    return 0
