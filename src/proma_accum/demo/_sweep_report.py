"""Analysis of a sweep: ``sweep.json`` (every run), ``report.md`` (tables) and three figures.

Per run, one number per metric: ``reward_gain`` (mean sampled validation reward over the last
``TAIL`` steps minus the initial policy's), ``kl_initial`` (KL from the initial policy, last
``TAIL`` steps), ``kl_successive`` (step-to-step KL, mean over steps), ``entropy_final`` (last
``TAIL`` steps), ``entropy_mean`` (mean over steps), PROMA's ``projected_norm_ratio`` and
``clamp_fraction`` (mean over steps) and the mechanism probe (mean over probed steps).

Comparisons are paired by seed (same seed = same initial policy, prompts and probe noise): the
mean per-seed difference and its 95% t-interval; "holds" if the interval lies on the claimed
side of the threshold, "does not hold" if on the other side, "inconclusive" otherwise.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

from ._report import NON_INFERIORITY_MARGIN, _mean, _sd, paired_interval
from ._sweep import SweepSpec, _config, environment, load_runs, now, plan, run_key

TAIL = 10
METHOD_COLORS = {"grpo": "tab:blue", "reinforce": "tab:orange", "proma": "tab:green",
                 "proma-exact": "tab:purple", "proma-unitadv": "tab:red"}  # fmt: skip
SUMMARY_METRICS = (
    "reward_gain", "greedy_gain", "kl_initial", "kl_successive", "entropy_final",
    "entropy_mean", "clip_fraction", "projected_norm_ratio", "clamp_fraction",
    "mech_overlap", "mech_kl_predicted", "mech_kl_measured",
)  # fmt: skip


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def run_summary(record: dict) -> dict[str, float]:
    m = record["metrics"]
    steps = len(m["val_reward"]) - 1
    t = min(TAIL, steps)

    def tail(k):
        return _mean(m[k][-t:])

    def over(k):
        return _mean(m[k][1:])

    return {
        "reward_gain": tail("val_reward") - _nan(m["val_reward"][0]),
        "greedy_gain": tail("val_reward_greedy") - _nan(m["val_reward_greedy"][0]),
        "kl_initial": tail("kl_from_initial"),
        "kl_successive": over("kl_successive"),
        "entropy_final": tail("entropy"),
        "entropy_mean": over("entropy"),
        "clip_fraction": over("clip_fraction"),
        "projected_norm_ratio": over("proma_projected_norm_ratio"),
        "clamp_fraction": over("proma_clamp_fraction"),
        "mech_overlap": over("mech_overlap"),
        "mech_kl_predicted": over("mech_kl_predicted"),
        "mech_kl_measured": over("mech_kl_measured"),
    }


def _cells(spec: SweepSpec, summaries: dict[str, dict]) -> dict:
    """``{axis: {value: {method: [summary or None per seed]}}}``."""
    out: dict = {}
    for cell in spec.cells():
        cfg = _config(spec, cell["overrides"])
        seeds = [summaries.get(run_key(cfg, cell["method"], s)) for s in range(spec.seeds)]
        out.setdefault(cell["axis"], {}).setdefault(cell["value"], {})[cell["method"]] = seeds
    return out


def _vals(seeds: list, metric: str) -> list[float]:
    return [math.nan if s is None else _nan(s[metric]) for s in seeds]


def _pair(a: list, b: list, metric: str) -> tuple[float, float, int]:
    return paired_interval(_vals(a, metric), _vals(b, metric))


def _verdict(mean: float, half: float, threshold: float = 0.0) -> str:
    if math.isnan(mean) or math.isinf(half):
        return "n/a"
    if mean - half > threshold:
        return "holds"
    if mean + half < threshold:
        return "does not hold"
    return "inconclusive"


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "–"
    if x != 0 and abs(x) < 10 ** (-digits + 1):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _ms(xs: list[float], digits: int = 3) -> str:
    n = len([x for x in xs if not math.isnan(x)])
    if not n:
        return "–"
    return f"{_fmt(_mean(xs), digits)} ± {_fmt(_sd(xs), digits)}" + ("" if n > 1 else " (1)")


def _ci(p: tuple[float, float, int], digits: int = 3) -> str:
    mean, half, n = p
    if math.isnan(mean):
        return "–"
    if max(abs(mean), half if math.isfinite(half) else 0) < 10 ** (1 - digits):
        return f"{mean:+.1e} ± {half:.1e} (n={n})"  # too small for fixed digits
    return f"{mean:+.{digits}f} ± {half:.{digits}f} (n={n})"


def _cross(xs: list[float], ys: list[float], level: float) -> float:
    """y where x first reaches ``level`` walking along the points in learning-rate order
    (linear between neighbours); NaN if x never reaches it."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if not (math.isnan(x) or math.isnan(y))]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if (x0 - level) * (x1 - level) <= 0 and x0 != x1:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    if pts and pts[0][0] == level:
        return pts[0][1]
    return math.nan


def _log(v: float) -> float:
    return math.log(v) if v > 0 else math.nan


def matched(
    lr_cells: dict, a: str, b: str, x: str, y: str, levels: list[float], *, log: bool = True
) -> list:
    """Paired ``y_a - y_b`` at matched ``x`` (per seed, each method's lr curve crossed at
    ``level``, linearly in ``log x`` when ``log``); one ``(level, (mean, half, n))`` per
    level."""
    f = _log if log else float
    lrs = sorted(lr_cells)
    seeds = len(next(iter(lr_cells.values()))[a])
    out = []
    for level in levels:
        da, db = [], []
        for s in range(seeds):
            for method, dst in ((a, da), (b, db)):
                runs = [lr_cells[lr][method][s] for lr in lrs]
                if any(r is None for r in runs):
                    dst.append(math.nan)
                    continue
                dst.append(_cross([f(r[x]) for r in runs], [r[y] for r in runs], f(level)))
        out.append((level, paired_interval(da, db)))
    return out


def _levels(lr_cells: dict, methods: list[str], x: str) -> list[float]:
    """Three levels of ``x`` inside the range every method's median curve covers, evenly
    spaced in ``log x``."""
    lrs = sorted(lr_cells)
    lo, hi = -math.inf, math.inf
    for m in methods:
        med = [_median(_vals(lr_cells[lr][m], x)) for lr in lrs]
        med = [v for v in med if not math.isnan(v) and v > 0]
        if not med:
            return []
        lo, hi = max(lo, min(med)), min(hi, max(med))
    if not lo < hi:
        return []
    return [lo * (hi / lo) ** f for f in (0.25, 0.5, 0.75)]


def _median(xs: list[float]) -> float:
    xs = sorted(v for v in xs if not math.isnan(v))
    if not xs:
        return math.nan
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def analyse(spec: SweepSpec, summaries: dict[str, dict]) -> dict:
    """Every table of the report as data (used by ``report.md`` and ``sweep.json``)."""
    cells = _cells(spec, summaries)
    res: dict = {"lr": [], "claims": [], "matched": [], "axes": [], "mechanism": []}
    lr_cells = cells.get("lr", {})
    for lr in sorted(lr_cells):
        row = lr_cells[lr]
        for m, seeds in row.items():
            res["lr"].append(
                {"lr": lr, "method": m, **{k: _vals(seeds, k) for k in SUMMARY_METRICS}}
            )
        if "proma" not in row:
            continue
        p = row["proma"]
        claims = []
        if "grpo" in row:
            d = _pair(p, row["grpo"], "reward_gain")
            claims.append(("a", "reward gain not worse than GRPO's by 0.05", d,
                           _verdict(*d[:2], -NON_INFERIORITY_MARGIN)))  # fmt: skip
        if "reinforce" in row:
            d = _pair(p, row["reinforce"], "reward_gain")
            claims.append(("a'", "reward gain above REINFORCE's", d, _verdict(*d[:2])))
            d = _pair(row["reinforce"], p, "kl_initial")
            claims.append(("b", "KL from initial below REINFORCE's", d, _verdict(*d[:2])))
        if "grpo" in row:
            d = _pair(p, row["grpo"], "entropy_mean")
            claims.append(("c", "entropy (mean over steps) above GRPO's", d, _verdict(*d[:2])))
        for base in ("grpo", "reinforce"):
            if base in row:
                d = _pair(row[base], p, "kl_successive")
                claims.append(("d", f"step-to-step KL below {base.upper()}'s", d, _verdict(*d[:2])))
        res["claims"].append({"lr": lr, "claims": claims})
    if lr_cells and all(m in next(iter(lr_cells.values())) for m in spec.lr_methods):
        for base in [m for m in spec.lr_methods if m != "proma"]:
            for x, ys in (
                ("kl_successive", (("reward_gain", +1, "reward gain"),
                                   ("kl_initial", -1, "KL from initial"),
                                   ("entropy_final", +1, "final entropy"))),
                ("kl_initial", (("reward_gain", +1, "reward gain"),
                                ("entropy_final", +1, "final entropy"))),
            ):  # fmt: skip
                levels = _levels(lr_cells, ["proma", base], x)
                for y, sign, label in ys:
                    for level, d in matched(lr_cells, "proma", base, x, y, levels):
                        res["matched"].append(
                            {"base": base, "at": x, "level": level, "metric": label,
                             "diff": d, "verdict": _verdict(sign * d[0], d[1])}
                        )  # fmt: skip
    ref = cells.get("variant", {}).get("reinforce", {}).get("reinforce")
    for axis in ("accumulation", "clamp", "strength", "variant"):
        for value, row in cells.get(axis, {}).items():
            method = value if axis == "variant" else "proma"
            if method not in row or method == "reinforce":
                continue
            base = row.get("reinforce", ref) if axis == "accumulation" else ref
            if base is None:
                continue
            p = row[method]
            res["axes"].append(
                {
                    "axis": axis, "value": value, "method": method,
                    "d_reward_gain": _pair(p, base, "reward_gain"),
                    "d_kl_initial": _pair(p, base, "kl_initial"),
                    "d_kl_successive": _pair(p, base, "kl_successive"),
                    "d_entropy_mean": _pair(p, base, "entropy_mean"),
                    "d_mech_overlap": _pair(p, base, "mech_overlap"),
                    "projected_norm_ratio": _vals(p, "projected_norm_ratio"),
                    "clamp_fraction": _vals(p, "clamp_fraction"),
                    "base_kl_successive": _vals(base, "kl_successive"),
                }
            )  # fmt: skip
    for lr in sorted(lr_cells):
        row = lr_cells[lr]
        for m, seeds in row.items():
            pred, meas = _vals(seeds, "mech_kl_predicted"), _vals(seeds, "mech_kl_measured")
            res["mechanism"].append(
                {"lr": lr, "method": m, "overlap": _vals(seeds, "mech_overlap"),
                 "kl_predicted": pred, "kl_measured": meas,
                 "ratio": [a / b if b and not math.isnan(b) else math.nan
                           for a, b in zip(pred, meas, strict=True)],
                 "d_overlap_vs_reinforce": _pair(seeds, row["reinforce"], "mech_overlap")
                 if "reinforce" in row and m != "reinforce" else None}
            )  # fmt: skip
    return res


def _probe_pairs(records: dict[str, dict], keys: set[str]) -> list[tuple[str, float, float]]:
    """(method, predicted, measured) of every mechanism probe of the given runs."""
    out = []
    for k in keys:
        r = records.get(k)
        if r is None:
            continue
        m = r["metrics"]
        for p, q in zip(m["mech_kl_predicted"], m["mech_kl_measured"], strict=True):
            if p is not None and q is not None and not (math.isnan(p) or math.isnan(q)):
                out.append((r["method"], p, q))
    return out


def _log_corr(pairs: list[tuple[str, float, float]]) -> float:
    pts = [(math.log(p), math.log(q)) for _, p, q in pairs if p > 0 and q > 0]
    if len(pts) < 3:
        return math.nan
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    syy = sum((y - my) ** 2 for _, y in pts)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _lr_keys(spec: SweepSpec) -> set[str]:
    keys = set()
    for cell in spec.cells():
        if cell["axis"] == "lr":
            cfg = _config(spec, cell["overrides"])
            keys |= {run_key(cfg, cell["method"], s) for s in range(spec.seeds)}
    return keys


def format_report(spec: SweepSpec, res: dict, meta: dict) -> str:
    L = [
        "# PROMA sweep: trade-off curves",
        "",
        f"Produced by `{meta['command']}` on {meta['created'][:10]}; "
        f"{meta['finished']} of {meta['planned']} runs finished; "
        f"wall time {meta['wall_s'] / 60:.1f} min over {meta['invocations']} invocation(s) "
        f"({meta['environment']['cpus']} CPUs, shared with other work). Every run: "
        f"{spec.base.get('steps')} RL steps; final = mean over the last {TAIL} steps; "
        "cells are mean ± sd over seeds; differences are paired by seed, mean ± 95% "
        "t-interval half-width (n = seeds).",
        "",
        "## Learning-rate axis",
        "",
        "| lr | method | reward gain | KL from initial (final) | step-to-step KL (mean) "
        "| entropy (final) | clip fraction | removed ratio | clamp fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["lr"]:
        L.append(
            f"| {r['lr']:g} | {r['method']} | {_ms(r['reward_gain'])} | "
            f"{_ms(r['kl_initial'], 4)} | {_ms(r['kl_successive'], 4)} | "
            f"{_ms(r['entropy_final'])} | {_ms(r['clip_fraction'])} | "
            f"{_ms(r['projected_norm_ratio'])} | {_ms(r['clamp_fraction'])} |"
        )
    L += [
        "",
        "## The note's claims at each learning rate (PROMA vs the baseline)",
        "",
        "| lr | claim | paired difference (claimed direction) | verdict |",
        "|---|---|---|---|",
    ]
    for c in res["claims"]:
        for tag, text, d, v in c["claims"]:
            digits = 4 if "KL" in text else 3
            L.append(f"| {c['lr']:g} | ({tag}) {text} | {_ci(d, digits)} | {v} |")
    L += ["", "## Matched comparisons (along each method's learning-rate curve)", "",
          "Per seed, each method's metrics are read off its learning-rate curve where the "
          "matched KL first reaches the level (linear in log KL between neighbouring learning "
          "rates); seeds whose curve does not reach the level are left out (n). Levels: "
          "evenly spaced in log KL inside the range both methods' median curves cover. "
          "(Reward gain is not used as the matched quantity: it is not monotone in the "
          "learning rate.)", "",
          "| PROMA vs | matched at | level | metric | PROMA − baseline | verdict (PROMA better) |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["matched"]:
        at = "step-to-step KL" if r["at"] == "kl_successive" else "KL from initial"
        L.append(
            f"| {r['base']} | {at} | {_fmt(r['level'], 4)} | {r['metric']} | "
            f"{_ci(r['diff'], 4)} | {r['verdict']} |"
        )
    L += ["", f"## PROMA's settings at lr {spec.mid_lr:g} (paired against REINFORCE)", "",
          "Accumulation rows are paired with REINFORCE at the same accumulation; the others "
          "with REINFORCE at 8 microbatches per step.", "",
          "| axis | value | Δ reward gain | Δ KL from initial | Δ step-to-step KL | Δ entropy "
          "(mean) | Δ overlap | removed ratio | clamp fraction |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["axes"]:
        value = "none" if r["value"] is None else r["value"]
        L.append(
            f"| {r['axis']} | {value} | {_ci(r['d_reward_gain'])} | "
            f"{_ci(r['d_kl_initial'], 4)} | {_ci(r['d_kl_successive'], 4)} | "
            f"{_ci(r['d_entropy_mean'])} | {_ci(r['d_mech_overlap'], 4)} | "
            f"{_ms(r['projected_norm_ratio'])} | {_ms(r['clamp_fraction'])} |"
        )
    L += ["", "## The mechanism", "",
          "On the sequences of each probed step's last optimizer minibatch: the squared "
          "overlaps of the accumulated gradient with the sequences' log-probability gradients "
          "(scale-free), the KL the update predicts to second order, ½ mean (Δθ·g_i)², and the "
          "exact sequence-level KL the update caused on the same sequences.", "",
          f"Correlation of log predicted with log measured KL over all probes of the "
          f"learning-rate axis: {_fmt(meta.get('log_corr', math.nan))} "
          f"({meta.get('n_probes', 0)} probes).", "",
          "| lr | method | overlap | Δ overlap vs REINFORCE | predicted KL | measured KL "
          "| predicted / measured |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["mechanism"]:
        d = r["d_overlap_vs_reinforce"]
        L.append(
            f"| {r['lr']:g} | {r['method']} | {_ms(r['overlap'], 4)} | "
            f"{_ci(d, 4) if d else '–'} | {_ms(r['kl_predicted'], 4)} | "
            f"{_ms(r['kl_measured'], 4)} | {_ms(r['ratio'], 2)} |"
        )
    return "\n".join(L) + "\n"


def plot(spec: SweepSpec, res: dict, records: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # 1. trade-off curves
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (x, label) in zip(
        axes,
        (("kl_initial", "KL from the initial policy (final)"),
         ("kl_successive", "step-to-step KL (mean over steps)"),
         ("entropy_final", "entropy per token (final)")),
        strict=True,
    ):  # fmt: skip
        for m in spec.lr_methods:
            rows = [r for r in res["lr"] if r["method"] == m]
            if not rows:
                continue
            xs = [_mean(r[x]) for r in rows]
            ys = [_mean(r["reward_gain"]) for r in rows]
            ax.errorbar(
                xs, ys, xerr=[_sd(r[x]) for r in rows], yerr=[_sd(r["reward_gain"]) for r in rows],
                marker="o", capsize=3, label=m, color=METHOD_COLORS.get(m),
            )  # fmt: skip
            for r, xv, yv in zip(rows, xs, ys, strict=True):
                ax.annotate(f"{r['lr']:g}", (xv, yv), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=METHOD_COLORS.get(m))  # fmt: skip
        ax.set_xlabel(label)
        if x != "entropy_final":
            ax.set_xscale("log")
        ax.set_ylabel("validation reward gain (final − initial)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"Learning-rate sweep ({', '.join(f'{lr:g}' for lr in spec.lrs)}; labels), mean ± sd "
        f"over {spec.seeds} seeds"
    )
    fig.tight_layout()
    paths.append(out / "tradeoff.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. PROMA's settings, paired against REINFORCE
    fig, axes = plt.subplots(3, 4, figsize=(16, 9), sharey="row")
    for j, axis in enumerate(("accumulation", "clamp", "strength", "variant")):
        rows = [r for r in res["axes"] if r["axis"] == axis]
        labels = ["none" if r["value"] is None else str(r["value"]) for r in rows]
        for i, (key, ylabel) in enumerate(
            (("d_kl_successive", "Δ step-to-step KL\n(PROMA − REINFORCE)"),
             ("d_reward_gain", "Δ reward gain\n(PROMA − REINFORCE)"))
        ):  # fmt: skip
            ax = axes[i, j]
            ax.errorbar(range(len(rows)), [r[key][0] for r in rows],
                        yerr=[r[key][1] if math.isfinite(r[key][1]) else 0 for r in rows],
                        marker="o", capsize=4, ls="none", color="tab:green")  # fmt: skip
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(range(len(rows)), labels)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
        ax = axes[2, j]
        for key, color in (("projected_norm_ratio", "tab:green"), ("clamp_fraction", "tab:gray")):
            ax.errorbar(range(len(rows)), [_mean(r[key]) for r in rows],
                        yerr=[_sd(r[key]) for r in rows], marker="s", capsize=3,
                        color=color, label=key)  # fmt: skip
        ax.set_xticks(range(len(rows)), labels)
        ax.set_xlabel({"accumulation": "microbatches per optimizer step", "clamp": "clamp",
                       "strength": "strength", "variant": "method"}[axis])  # fmt: skip
        ax.grid(alpha=0.3)
        axes[0, j].set_title(axis)
    axes[2, 0].set_ylabel("acc.stats(), mean over steps")
    axes[2, 0].legend(fontsize=8)
    fig.suptitle(f"PROMA's settings at lr {spec.mid_lr:g}: paired differences (95% intervals)")
    fig.tight_layout()
    paths.append(out / "settings.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. the mechanism
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    pairs = _probe_pairs(records, _lr_keys(spec))
    ax = axes[0]
    for m in spec.lr_methods:
        pts = [(p, q) for mm, p, q in pairs if mm == m and p > 0 and q > 0]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, alpha=0.5, label=m,
                       color=METHOD_COLORS.get(m))  # fmt: skip
    if pairs:
        lo = min(min(p, q) for _, p, q in pairs if p > 0 and q > 0)
        hi = max(max(p, q) for _, p, q in pairs)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
    if any(p > 0 and q > 0 for _, p, q in pairs):
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("predicted KL of the update, ½ mean (Δθ·g_i)²")
    ax.set_ylabel("measured sequence KL of the update")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for m in spec.lr_methods:
        rows = [r for r in res["mechanism"] if r["method"] == m]
        ax.errorbar([r["lr"] for r in rows], [_mean(r["overlap"]) for r in rows],
                    yerr=[_sd(r["overlap"]) for r in rows], marker="o", capsize=3, label=m,
                    color=METHOD_COLORS.get(m))  # fmt: skip
    ax.set_xscale("log")
    if any(_mean(r["overlap"]) > 0 for r in res["mechanism"]):
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("mean_i (G·g_i)² / (|G|² mean_i |g_i|²)")
    ax.set_title("overlaps of the step gradient with its sequences")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "mechanism.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _clean(obj):
    """JSON-safe: NaN and infinities become null, tuples lists, numbers rounded to 5 digits."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_outputs(spec: SweepSpec, out, *, timing: dict | None = None, argv=None) -> str:
    """Write ``sweep.json``, ``report.md``, ``tradeoff.png``, ``settings.png`` and
    ``mechanism.png`` under ``out`` from the cached runs; return a one-paragraph summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_runs(spec, out)
    summaries = {k: run_summary(r) for k, r in records.items()}
    timing_path = out / "timing.json"  # written by run_sweep, one entry per invocation
    history = json.loads(timing_path.read_text()) if timing_path.exists() else []
    res = analyse(spec, summaries)
    pairs = _probe_pairs(records, _lr_keys(spec))
    # the command that produced the runs: --report-only redraws the same outputs
    skip = ("--no-progress", "--report-only")
    command = "proma-accum " + " ".join(a for a in (argv or ["sweep"]) if a not in skip)
    meta = {
        "command": command.strip(),
        "created": now(),
        "planned": len(plan(spec)),
        "finished": len(records),
        "wall_s": sum(t["wall_s"] for t in history),
        "invocations": len(history),
        "environment": environment(),
        "log_corr": _log_corr(pairs),
        "n_probes": len(pairs),
    }
    (out / "report.md").write_text(format_report(spec, res, meta))
    plot(spec, res, records, out)
    runs = [
        {"key": k, **{f: r[f] for f in ("method", "seed", "config", "warm_start", "seconds")},
         "summary": summaries[k], "metrics": r["metrics"]}
        for k, r in sorted(records.items())
    ]  # fmt: skip
    payload = {
        **meta,
        "grid": spec.to_dict(),
        "cells": spec.cells(),
        "timing": history,
        "analysis": res,
        "runs": runs,
    }
    (out / "sweep.json").write_text(json.dumps(_clean(payload), indent=None))
    return (
        f"{meta['finished']} of {meta['planned']} runs; wall time "
        f"{meta['wall_s'] / 60:.1f} min; wrote {out / 'sweep.json'}, {out / 'report.md'} and "
        "tradeoff.png, settings.png, mechanism.png"
    )
