"""Summary table, verdicts on the note's four claims, ``results.json`` and ``figure.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Two-sided 95% critical values of Student's t, by degrees of freedom (1..30).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip

#: (metric, label) rows of the table, in the order of the note's Figure 2 panels.
TABLE_METRICS = (
    ("val_reward", "(a) validation reward (sampled)"),
    ("val_reward_greedy", "    validation reward (greedy)"),
    ("kl_from_initial", "(b) KL(current ‖ initial)"),
    ("entropy", "(c) entropy per token"),
    ("kl_successive", "(d) KL(current ‖ previous step)"),
)
#: (metric, title, y-axis label) of the figure's panels, as in the note's Figure 2.
PANELS = (
    ("val_reward", "(a) Validation reward (sampled)", "mean reward (fraction correct)"),
    ("kl_from_initial", "(b) KL from the initial policy", "KL (nats per token)"),
    ("entropy", "(c) Policy entropy (per token)", "entropy (nats per token)"),
    ("kl_successive_running", "(d) KL between successive policies", "KL (nats per token)"),
)
COLORS = {"grpo": "tab:blue", "reinforce": "tab:orange", "proma": "tab:green",
          "proma-exact": "tab:purple", "proma-unitadv": "tab:red"}  # fmt: skip
NON_INFERIORITY_MARGIN = 0.05


def _present(xs: list[float | None]) -> list[float]:
    """The values that are numbers (``results.json`` stores NaN as null)."""
    return [x for x in xs if x is not None and not math.isnan(x)]


def _mean(xs: list[float | None]) -> float:
    xs = _present(xs)
    return sum(xs) / len(xs) if xs else math.nan


def _sd(xs: list[float | None]) -> float:
    xs = _present(xs)
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def tail_length(steps: int) -> int:
    """Steps averaged for a "final" value: the last tenth of training (at least one)."""
    return max(1, steps // 10)


def per_seed(results: dict, method: str, metric: str, which: str) -> list[float]:
    """One number per seed: ``final`` (mean over the last ``tail_length`` steps) or ``mean``
    (mean over steps 1..S, i.e. the area under the curve divided by S)."""
    steps = len(results["steps"]) - 1
    start = steps + 1 - tail_length(steps) if which == "final" else 1
    return [_mean(curve[start:]) for curve in results["metrics"][method][metric]]


def summarize(results: dict) -> dict:
    """``{method: {metric: {"final": {"mean", "sd"}, "mean": {"mean", "sd"}}}}`` over seeds."""
    out: dict = {}
    for method in results["methods"]:
        out[method] = {}
        for metric in results["metrics"][method]:
            if metric == "seconds":
                continue
            out[method][metric] = {
                which: {
                    "mean": _mean(vals := per_seed(results, method, metric, which)),
                    "sd": _sd(vals),
                }
                for which in ("final", "mean")
            }
    return out


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Mean of the per-seed differences ``a - b`` and the half-width of its 95% t-interval."""
    d = [x - y for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    n = len(d)
    if n < 2:
        return _mean(d), math.inf, n
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return _mean(d), t * _sd(d) / math.sqrt(n), n


def _three_way(lo: float, hi: float, threshold: float = 0.0) -> str:
    if lo > threshold:
        return "holds"
    if hi < threshold:
        return "does not hold"
    return "inconclusive"


def verdicts(results: dict) -> dict:
    """Verdicts on the note's claims for each projected method present.

    Rule (stated in every verdict): per seed, the same statistic for both methods (same
    seed = same initial policy, prompts and probe noise); the mean paired difference in the
    direction of the claim and its 95% t-interval over seeds. "holds" if the interval lies
    above 0, "does not hold" if it lies below 0, "inconclusive" otherwise. Claim (a) is a
    non-inferiority claim: the interval is compared with ``-NON_INFERIORITY_MARGIN``.
    """
    methods = results["methods"]
    claims = (
        ("a", "validation reward comparable or better than GRPO",
         "val_reward", "final", ("grpo",), +1, -NON_INFERIORITY_MARGIN),
        ("b", "KL from the initial policy below REINFORCE's",
         "kl_from_initial", "final", ("reinforce",), -1, 0.0),
        ("c", "entropy higher for longer than GRPO",
         "entropy", "mean", ("grpo",), +1, 0.0),
        ("d", "lower successive-policy KL than both GRPO and REINFORCE",
         "kl_successive", "mean", ("grpo", "reinforce"), -1, 0.0),
    )  # fmt: skip
    out: dict = {}
    for method in (m for m in methods if m.startswith("proma")):
        out[method] = {}
        for key, text, metric, which, baselines, sign, threshold in claims:
            entry = {"claim": text, "metric": metric, "statistic": which, "comparisons": []}
            missing = [b for b in baselines if b not in methods]
            if missing:
                entry["verdict"] = f"n/a (needs {', '.join(missing)})"
                out[method][key] = entry
                continue
            mine = per_seed(results, method, metric, which)
            single = []
            for base in baselines:
                theirs = per_seed(results, base, metric, which)
                a, b = (mine, theirs) if sign > 0 else (theirs, mine)
                diff, half, n = paired_interval(a, b)
                single.append(_three_way(diff - half, diff + half, threshold))
                entry["comparisons"].append({
                    "baseline": base, "method_value": _mean(mine), "baseline_value": _mean(theirs),
                    "difference": diff, "ci95_half_width": half, "seeds": n,
                })  # fmt: skip
            if all(v == "holds" for v in single):
                entry["verdict"] = "holds"
            elif any(v == "does not hold" for v in single):
                entry["verdict"] = "does not hold"
            else:
                entry["verdict"] = "inconclusive"
            out[method][key] = entry
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _cell(stat: dict, digits: int) -> str:
    sd = stat["sd"]
    return _fmt(stat["mean"], digits) + ("" if math.isnan(sd) else f" ± {_fmt(sd, digits)}")


def format_table(results: dict, summary: dict) -> str:
    """Markdown table: rows = metric x (final, mean over steps), columns = methods."""
    methods = results["methods"]
    steps = len(results["steps"]) - 1
    rows = [
        "| metric | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for metric, label in TABLE_METRICS:
        digits = 4 if metric.startswith("kl") else 3
        for which, name in (("final", f"final (last {tail_length(steps)} steps)"),
                            ("mean", "mean over steps")):  # fmt: skip
            cells = [_cell(summary[m][metric][which], digits) for m in methods]
            rows.append(f"| {label.strip()}, {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_verdicts(results: dict, verdict: dict) -> str:
    """One line per (projected method, claim), with the paired differences behind it."""
    n = len(results["seeds"])
    lines = [
        f"Rule: mean paired difference over {n} seeds in the claimed direction, 95% t-interval;"
        f" holds if above 0 (claim (a): above -{NON_INFERIORITY_MARGIN}),"
        " does not hold if below, inconclusive otherwise."
    ]
    for method, claims in verdict.items():
        for key, entry in claims.items():
            parts = [
                f"{method} {_fmt(c['method_value'], 4)} vs {c['baseline']} "
                f"{_fmt(c['baseline_value'], 4)}: diff {c['difference']:+.4f} "
                f"± {_fmt(c['ci95_half_width'], 4)}"
                for c in entry["comparisons"]
            ]
            stat = f"{entry['statistic']} {entry['metric']}"
            lines.append(
                f"({key}) [{method}] {entry['claim']}: {entry['verdict'].upper()}"
                + (f" — {stat}; " + "; ".join(parts) if parts else "")
            )
    return "\n".join(lines)


def _clean(obj):
    """NaN/inf -> None, tuples -> lists, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(_clean(results), indent=1) + "\n")


def make_figure(results: dict):
    """Four panels laid out like the note's Figure 2: mean over seeds with a ±1 sd band.

    The legend sits below the panels, so it hides no curve or band. Returns a matplotlib
    ``Figure`` (no pyplot: the caller's backend is left alone).
    """
    from matplotlib.figure import Figure

    steps = results["steps"]
    cfg = results["config"]
    fig = Figure(figsize=(17, 4.4), layout="constrained")
    axes = fig.subplots(1, 4)
    for ax, (metric, title, ylabel) in zip(axes, PANELS, strict=True):
        for method in results["methods"]:
            curves = results["metrics"][method][metric]
            mean = [_mean([c[i] for c in curves]) for i in range(len(steps))]
            sd = [_sd([c[i] for c in curves]) for i in range(len(steps))]
            color = COLORS.get(method)
            ax.plot(steps, mean, label=method, color=color, lw=1.6)
            if len(curves) > 1:
                lo = [m - s for m, s in zip(mean, sd, strict=True)]
                hi = [m + s for m, s in zip(mean, sd, strict=True)]
                ax.fill_between(steps, lo, hi, color=color, alpha=0.18, lw=0)
        if metric == "kl_successive_running":
            title += f"\n(running mean over {cfg['kl_window']} steps)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=10)
    fig.suptitle(
        f"Two-digit addition, tiny Qwen3 policy: mean ± 1 sd over {len(results['seeds'])} seeds"
        " (only grpo clips the likelihood ratio)",
        fontsize=11,
    )
    return fig


def plot_figure(results: dict, path: Path) -> None:
    """Write :func:`make_figure` to ``path`` (PNG)."""
    make_figure(results).savefig(path, dpi=120)
