"""Run the PROMA accumulation benchmarks and print a table; write the results as JSON.

Usage (from the repository root)::

    python -m benchmarks.run                      # full suite
    python -m benchmarks.run --quick              # tiny smoke run (seconds)
    python -m benchmarks.run --workloads default packed --rounds 2
    python -m benchmarks.run --save docs/benchmarks-cpu.json

What is measured
----------------
For every workload (see :mod:`benchmarks.workloads`) and every variant (see
:mod:`benchmarks.variants`), one optimizer step: the forward and backward passes of all
microbatches of the step, including every hook, projection and copy a variant performs, and
excluding the optimizer update (identical for all variants).

*Time.* The variants of a workload are measured in paired rounds; each round runs every
variant once, in alternating order (reversed every other round). Each variant-round runs in
a fresh process (forked from a parent that has imported the libraries but run no tensor
operation), so allocator state never carries over from one measurement to another. In that
process the model is built, the variant is attached, a warm-up step runs, ``gc.collect()``
runs, then the timed step. The reported ratio is the median over rounds of (variant time /
plain time of the same round); seconds are medians over rounds. Wall-clock time is the
primary figure; process CPU time (all threads) is recorded too, since it is less sensitive
to other load on the machine. The load average is recorded before and after each workload.

*Memory.* In the first round the warm-up step is a memory-tracked step: the first
``min(microbatches, 3)`` microbatches of the step (by the third microbatch every variant
holds all of its state: running sums, per-sequence data of the current microbatch, and
buffers kept from the previous microbatch through this one's forward) run
under :class:`benchmarks.memory.LiveTensorBytes`, which records the peak of live bytes of
tensor storages created during the step. "Extra" is that peak minus plain's. The target for
the extra is ``1.5 * k * (largest projected tensor) * 4 bytes`` (fp32), with ``k`` the
number of sequences per microbatch. In later rounds the warm-up step is small (2
microbatches of at most 32 tokens per sequence). The peak resident set size (RSS) of each
process is also recorded (coarse: it includes the interpreter, the libraries and allocator
caches, and the memory-tracked step in the first round).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import LiveTensorBytes, peak_rss_bytes
from benchmarks.variants import SUITE_VARIANTS, VARIANTS, make_variant
from benchmarks.workloads import (
    Workload,
    quick_workloads,
    standard_workloads,
    tokens_in_loss,
)

SCHEMA = "proma-accum-benchmarks/1"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
MiB = 2**20
MEMORY_MICROBATCHES = 3
#: a measurement waits (up to --quiet-wait seconds) until other processes use less than this
#: fraction of the machine's CPUs, or leave the benchmark's threads a CPU each
QUIET_THRESHOLD = 0.25


def quiet_threshold(threads: int) -> float:
    """Largest share of the CPUs other processes may use before a measurement starts."""
    ncpu = os.cpu_count() or 1
    return max(QUIET_THRESHOLD, 1.0 - threads / ncpu + 0.1) if threads < ncpu else QUIET_THRESHOLD


# --------------------------------------------------------------------------- machine load


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total


def _busy_fraction(before, after) -> float | None:
    """Fraction of all CPUs' time that was busy between two ``_cpu_jiffies`` samples."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _wait_for_quiet(max_wait: float, threshold: float) -> dict:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` of the CPUs.

    Returns the waited seconds and the last measured busy fraction (measured over 1 s).
    """
    waited, busy = 0.0, None
    while True:
        before = _cpu_jiffies()
        time.sleep(1.0)
        busy = _busy_fraction(before, _cpu_jiffies())
        waited += 1.0
        if busy is None or busy < threshold or waited >= max_wait:
            return {"waited_s": waited, "busy_before": busy}


# --------------------------------------------------------------------------- child process


def _grad_norm(model) -> float:
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            total += float(p.grad.double().pow(2).sum())
    return math.sqrt(total)


def _measure(job: dict) -> dict:
    """Build, attach, warm up (memory-tracked or small) and time one step of one variant."""
    import torch

    torch.set_num_threads(job["threads"])
    wl: Workload = job["workload"]
    model = wl.model.build(seed=0)
    variant = make_variant(job["variant"])
    variant.setup(model, wl)
    out: dict = {
        "largest_param_numel": max(p.numel() for p in model.parameters()),
        "param_count": sum(p.numel() for p in model.parameters()),
    }
    acc = getattr(variant, "acc", None)
    if acc is not None:
        sizes = dict(model.named_parameters(remove_duplicate=False))
        out["largest_projected_numel"] = max(
            (sizes[n].numel() for n in acc.projected_parameters() if n in sizes), default=0
        )
    batches = wl.make_batches(seed=1)
    n_tokens = tokens_in_loss(batches)

    if job["track_memory"]:
        gc.collect()
        with LiveTensorBytes() as mem:
            variant.step(batches[:MEMORY_MICROBATCHES], n_tokens)
        out["peak_tensor_bytes"] = mem.peak
    else:
        warm = wl.with_(seq_len=min(wl.seq_len, 32), microbatches=2).make_batches(seed=2)
        variant.step(warm, tokens_in_loss(warm))
    gc.collect()

    jiffies0 = _cpu_jiffies()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    variant.step(batches, n_tokens)
    out["time_s"] = time.perf_counter() - wall0
    out["cpu_s"] = time.process_time() - cpu0
    busy = _busy_fraction(jiffies0, _cpu_jiffies())
    ncpu = os.cpu_count() or 1
    # Share of the machine used by other processes while the step ran.
    out["other_load"] = (
        None if busy is None else max(0.0, busy - out["cpu_s"] / (out["time_s"] * ncpu))
    )
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["grad_norm"] = _grad_norm(model)
    variant.teardown()
    return out


def _child_main(conn, job: dict) -> None:
    try:
        conn.send({"ok": True, **_measure(job)})
    except BaseException as exc:  # report everything, MemoryError included
        conn.send(
            {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        )
    finally:
        conn.close()


def _run_job(ctx, job: dict, timeout: float) -> dict:
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, job))
    proc.start()
    child.close()
    result = None
    timed_out = not parent.poll(timeout)
    if not timed_out:
        try:
            result = parent.recv()
        except EOFError:  # the process died without reporting
            result = None
    proc.join(5 if result is not None else 0.1)
    if proc.is_alive():
        proc.terminate()
        proc.join()
    if result is None:
        error = (
            f"timed out after {timeout:.0f} s"
            if timed_out
            else f"process exited with code {proc.exitcode}"
        )
        result = {"ok": False, "error": error}
    parent.close()
    return result


# --------------------------------------------------------------------------- parent


def _preload(variants: list[str]) -> None:
    """Import the heavy libraries once so that forked processes start fast (no tensor ops)."""
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401

    if "opacus-materialised" in variants:
        import opacus.grad_sample  # noqa: F401
    if any(v.startswith("proma-") for v in variants):
        with contextlib.suppress(ImportError):  # reported per variant by the child
            import proma_accum  # noqa: F401


def _versions() -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("opacus", "proma_accum"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # missing, or no __version__
            info[name] = None
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _command(argv: list[str]) -> str:
    """The command line, without the output options (they do not change what is measured)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--save"):
            skip = True
        elif not arg.startswith(("--out=", "--save=")):
            kept.append(arg)
    return " ".join(["python -m benchmarks.run", *kept])


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_workload(
    wl: Workload,
    variants: list[str],
    rounds: int,
    *,
    track_memory: bool,
    threads: int,
    timeout: float,
    quiet_wait: float,
    ctx,
    log,
) -> dict:
    """Measure ``variants`` on ``wl`` in paired rounds; returns the workload's JSON record."""
    record = {**wl.as_dict(), "rounds": rounds, "loadavg_start": _loadavg()}
    per_variant: dict[str, dict] = {}
    for name in variants:
        reason = make_variant(name).unsupported(wl)
        per_variant[name] = {
            "name": name,
            "status": "unsupported" if reason else "ok",
            "reason": reason,
            "times_s": [],
            "cpu_s": [],
            "ratios": [],
            "cpu_ratios": [],
            "peak_rss_bytes": [],
            "other_load": [],
            "waited_s": [],
            "errors": [],
        }
    runnable = [v for v in variants if per_variant[v]["status"] == "ok"]
    for r in range(rounds):
        order = runnable if r % 2 == 0 else runnable[::-1]
        results: dict[str, dict] = {}
        for name in order:
            rec = per_variant[name]
            if rec["status"] == "error":
                continue
            job = {
                "workload": wl,
                "variant": name,
                "threads": threads,
                "track_memory": track_memory and r == 0,
            }
            quiet = _wait_for_quiet(quiet_wait, quiet_threshold(threads)) if quiet_wait else {}
            res = _run_job(ctx, job, timeout)
            if not res["ok"]:
                rec["status"] = "error"
                rec["errors"].append(res["error"])
                log(f"  [{wl.name}] round {r + 1}/{rounds} {name}: ERROR {res['error']}")
                if "traceback" in res:
                    log(res["traceback"])
                continue
            results[name] = res
            rec["times_s"].append(res["time_s"])
            rec["cpu_s"].append(res["cpu_s"])
            rec["peak_rss_bytes"].append(res["peak_rss_bytes"])
            rec["other_load"].append(res["other_load"])
            rec["waited_s"].append(quiet.get("waited_s", 0.0))
            rec["grad_norm"] = res["grad_norm"]
            for key in (
                "peak_tensor_bytes",
                "largest_param_numel",
                "largest_projected_numel",
                "param_count",
            ):
                if key in res:
                    rec[key] = res[key]
            other = res["other_load"]
            log(
                f"  [{wl.name}] round {r + 1}/{rounds} {name}: {res['time_s']:.2f} s "
                f"(cpu {res['cpu_s']:.2f} s"
                + ("" if other is None else f", other load {other:.0%}")
                + ")"
            )
        plain = results.get("plain")
        if plain:
            for name, res in results.items():
                per_variant[name]["ratios"].append(res["time_s"] / plain["time_s"])
                per_variant[name]["cpu_ratios"].append(res["cpu_s"] / plain["cpu_s"])

    # Target: 1.5 x k x largest projected tensor (fp32).
    largest = max(
        (rec.get("largest_projected_numel", 0) for rec in per_variant.values()), default=0
    ) or max((rec.get("largest_param_numel", 0) for rec in per_variant.values()), default=0)
    target = int(1.5 * wl.seqs * largest * 4)
    record["largest_projected_numel"] = largest
    record["target_extra_bytes"] = target
    plain_peak = per_variant.get("plain", {}).get("peak_tensor_bytes")
    for rec in per_variant.values():
        rec["median_s"] = _median(rec["times_s"])
        rec["median_cpu_s"] = _median(rec["cpu_s"])
        rec["ratio_vs_plain"] = _median(rec["ratios"])
        plain_times = per_variant.get("plain", {}).get("times_s")
        rec["best_ratio_vs_plain"] = (
            min(rec["times_s"]) / min(plain_times) if rec["times_s"] and plain_times else None
        )
        loads = [x for x in rec["other_load"] if x is not None]
        rec["max_other_load"] = max(loads) if loads else None
        rec["cpu_ratio_vs_plain"] = _median(rec["cpu_ratios"])
        peak = rec.get("peak_tensor_bytes")
        if peak is not None and plain_peak is not None:
            rec["extra_tensor_bytes"] = peak - plain_peak
            rec["extra_vs_target"] = (peak - plain_peak) / target if target else None
        else:
            rec["extra_tensor_bytes"] = None
            rec["extra_vs_target"] = None
        rss = _median(rec["peak_rss_bytes"])
        rec["median_peak_rss_bytes"] = None if rss is None else int(rss)
    record["variants"] = [per_variant[v] for v in variants]
    record["loadavg_end"] = _loadavg()
    return record


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x / scale, spec)


def _ratio_range(ratios: list[float]) -> str:
    """``min–max`` of the per-round ratios ("" for fewer than two rounds)."""
    return f"{min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else ""


def format_table(results: dict) -> str:
    """Markdown table of a results dictionary (as written to JSON)."""
    lines = [
        f"{results['threads']} thread(s). Time: median over R paired rounds of variant/plain "
        "step time (in brackets: best variant time / best plain time; range: the smallest and "
        "largest per-round ratio when R > 1); each variant-round in "
        "a fresh process after a warm-up step. Other load: the largest share of the CPUs "
        "used by other processes during a timed step. Memory: peak live bytes of tensors "
        "created during a step (TorchDispatchMode tracking, first "
        f"{MEMORY_MICROBATCHES} microbatches); extra = "
        "variant - plain; target = 1.5 x k x largest projected tensor (fp32). RSS: peak "
        "resident set size of the process (coarse).",
        "",
        "| workload | variant | time vs plain | range | s/step | other load | peak tensor MiB "
        "| extra MiB | target MiB | extra/target | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for wl in results["workloads"]:
        label = (
            f"{wl['name']} (k={wl['seqs_per_microbatch']}, T={wl['seq_len']}"
            + (f", {wl['seqs_per_row']}/row" if wl["packed"] else "")
            + f", {wl['microbatches']} mb, R={wl['rounds']})"
        )
        for v in wl["variants"]:
            if v["status"] != "ok":
                why = v["reason"] if v["status"] == "unsupported" else "; ".join(v["errors"])
                lines.append(f"| {label} | {v['name']} | {v['status']} | | | | | | | | |")
                notes.append(f"{wl['name']} / {v['name']}: {why}")
                continue
            lines.append(
                f"| {label} | {v['name']} | {_fmt(v['ratio_vs_plain'], '.2f')} "
                f"({_fmt(v['best_ratio_vs_plain'], '.2f')}) "
                f"| {_ratio_range(v.get('ratios', []))} "
                f"| {_fmt(v['median_s'], '.2f')} "
                f"| {_fmt(v['max_other_load'], '.0%')} "
                f"| {_fmt(v.get('peak_tensor_bytes'), '.0f', MiB)} "
                f"| {_fmt(v['extra_tensor_bytes'], '.0f', MiB)} "
                f"| {_fmt(wl['target_extra_bytes'], '.0f', MiB)} "
                f"| {_fmt(v['extra_vs_target'], '.2f')} "
                f"| {_fmt(v['median_peak_rss_bytes'], '.0f', MiB)} |"
            )
        if wl.get("skipped_variants"):
            notes.append(
                f"{wl['name']}: not run by default: {', '.join(wl['skipped_variants'])} "
                "(time budget; add them with --variants)"
            )
        loads = [v["max_other_load"] for v in wl["variants"] if v.get("max_other_load")]
        if loads and max(loads) > quiet_threshold(results["threads"]):
            notes.append(
                f"{wl['name']}: other processes used up to {max(loads):.0%} of the CPUs during "
                "a timed step: timings are noisy"
            )
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model and shapes, one round, one thread (seconds; for smoke tests)",
    )
    p.add_argument(
        "--workloads", nargs="+", metavar="NAME", help="workloads to run (default: all; --list)"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        choices=VARIANTS,
        help=f"variants to run on every workload (choices: {', '.join(VARIANTS)}; default: "
        "each workload's own set, see --list); plain is always added as the reference",
    )
    p.add_argument(
        "--rounds", type=int, help="paired rounds per workload (default: per workload, --list)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory-tracked step")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 2; 1 with --quick)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="before each measurement, wait up to this many seconds for other processes to "
        f"use less than {100 * QUIET_THRESHOLD:.0f}%% of the CPUs, or to leave each of the "
        "benchmark's threads a CPU (default 5; 0 with --quick)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds allowed per variant-round process (default 1800)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON output (default: benchmarks/results/latest.json)",
    )
    p.add_argument("--save", type=Path, help="also write the JSON here (e.g. a committed copy)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    catalogue = quick_workloads() if args.quick else standard_workloads()
    if args.list:
        for wl in catalogue.values():
            vs = ", ".join(wl.variants or SUITE_VARIANTS)
            print(f"{wl.name:8s} {wl.description}; {wl.rounds} round(s); variants: {vs}")
        return 0
    names = args.workloads or list(catalogue)
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        print(f"unknown workload(s) {unknown}; choose from {list(catalogue)}", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.quick else 2)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0 if args.quick else 5)

    def variants_for(wl: Workload) -> list[str]:
        chosen = args.variants or wl.variants or SUITE_VARIANTS
        return list(dict.fromkeys(["plain", *chosen]))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    _preload(sorted({v for n in names for v in variants_for(catalogue[n])}))
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    started = time.perf_counter()
    results = {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "command": _command(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "threads": threads,
        "quiet_wait_s": quiet_wait,
        "start_method": ctx.get_start_method(),
        "environment": _versions(),
        "method": {
            "time": "median over paired rounds of variant/plain step time (wall clock; CPU "
            "time of all threads also recorded); each variant-round in a fresh process, "
            "warm-up step + gc.collect() before the timed step; variant order reversed every "
            "other round",
            "memory": "peak live bytes of tensor storages created during the first "
            f"min(microbatches, {MEMORY_MICROBATCHES}) microbatches of a step "
            "(TorchDispatchMode), in a fresh process; extra = variant peak - plain peak",
            "target": "1.5 * seqs_per_microbatch * largest projected tensor numel * 4 bytes",
            "rss": "getrusage peak resident set size of each variant-round process",
        },
        "workloads": [],
    }
    for name in names:
        wl = catalogue[name]
        rounds = args.rounds or wl.rounds
        variants = variants_for(wl)
        log(f"[{wl.name}] {wl.description}; {rounds} round(s); {', '.join(variants)}")
        record = run_workload(
            wl,
            variants,
            rounds,
            track_memory=not args.no_memory,
            threads=threads,
            timeout=args.timeout,
            quiet_wait=quiet_wait,
            ctx=ctx,
            log=log,
        )
        record["skipped_variants"] = [v for v in VARIANTS if v not in variants]
        results["workloads"].append(record)
    results["wall_s"] = round(time.perf_counter() - started, 1)

    text = json.dumps(results, indent=2)
    for path in [args.out] + ([args.save] if args.save else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"wrote {path}")
    print(format_table(results))
    print(f"\nwall time {results['wall_s']:.0f} s")
    failed = [v for w in results["workloads"] for v in w["variants"] if v["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
