"""CPU-scale evidence for the note's Figure 2: GRPO vs REINFORCE vs PROMA.

A tiny Qwen3 policy learns two-digit addition with a verifiable reward; the methods differ
only in their update rule. Run ``python -m proma_accum.demo`` (or ``proma-accum demo``);
``--quick`` finishes in under a minute. See :func:`main` for the options.
"""

from __future__ import annotations

import argparse
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
        prog="proma-accum demo",
        description="GRPO vs REINFORCE vs PROMA on a small RL task, on CPU, in minutes "
        "(the note's Figure 2 at CPU scale). No downloads.",
    )
    p.add_argument("--quick", action="store_true", help="small run, under a minute")
    p.add_argument("--seeds", type=int, help="seeds per method (default 5; quick: 2)")
    p.add_argument("--steps", type=int, help="RL steps per run (default 100; quick: 20)")
    p.add_argument(
        "--methods",
        help=f"comma-separated, from {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--out", default="proma-demo-out", help="output directory")
    p.add_argument(
        "--workers", type=int, help="worker processes (default: min(2, CPU count); 1 = inline)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``proma-accum demo [options]`` or ``python -m proma_accum.demo [options]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        argv = argv[1:]
    args = _parser().parse_args(argv)
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
        _parser().error(str(err))
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
