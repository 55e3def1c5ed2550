"""Tests of ``proma-accum sweep``: the grid, the cache keys, the matched comparisons, the
mechanism probe against hand-checkable cases, and the quick run end to end (resumed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from proma_accum.demo import DemoConfig, main
from proma_accum.demo._experiment import _MechanismProbe
from proma_accum.demo._policy import build_policy, sample_responses
from proma_accum.demo._sweep import SweepSpec, plan, run_key, warm_key
from proma_accum.demo._sweep_report import _cross, _verdict, matched
from proma_accum.demo._task import AdditionTask


def test_run_key_follows_the_configuration_not_the_workers():
    a = DemoConfig(lr=1e-3, workers=1)
    assert run_key(a, "proma", 0) == run_key(DemoConfig(lr=1e-3, workers=2), "proma", 0)
    assert run_key(a, "proma", 0) != run_key(a, "proma", 1)
    assert run_key(a, "proma", 0) != run_key(a, "reinforce", 0)
    assert run_key(a, "proma", 0) != run_key(DemoConfig(lr=1e-3, clamp=None), "proma", 0)
    assert run_key(a, "proma", 0) != run_key(DemoConfig(lr=1e-3, strength=0.5), "proma", 0)
    # the warm start does not depend on the RL settings, only on the model and the task
    assert warm_key(a, 0) == warm_key(DemoConfig(lr=3e-3, clamp=2.0), 0)
    assert warm_key(a, 0) != warm_key(DemoConfig(hidden_size=32), 0)


def test_full_grid_shares_the_middle_cell_between_axes():
    spec = SweepSpec()
    # lr axis: 4 lrs x 3 methods; accumulation: 4 x 2 minus the shared 8-microbatch pair;
    # clamp 4 new, strength 1 new, variants 2 new; all x 5 seeds
    assert len(plan(spec)) == (12 + 6 + 4 + 1 + 2) * 5
    # learning-rate runs come first, seed by seed
    first = list(plan(spec).values())[:12]
    assert {m for _, m, _ in first} == set(spec.lr_methods)
    assert {s for _, _, s in first} == {0}


def test_cross_reads_the_first_crossing_in_learning_rate_order():
    xs, ys = [0.0, 1.0, 3.0, 2.0], [10.0, 20.0, 40.0, 99.0]
    assert _cross(xs, ys, 0.5) == pytest.approx(15.0)
    assert _cross(xs, ys, 2.0) == pytest.approx(30.0)  # first crossing, not the last point
    assert math.isnan(_cross(xs, ys, 5.0))
    assert math.isnan(_cross([math.nan, 1.0], [1.0, 2.0], 0.5))


def test_matched_comparison_pairs_seeds():
    def run(x, y):
        return {"reward_gain": x, "kl_initial": y}

    # method a reaches each reward gain with half the KL of method b, on every seed
    cells = {
        lr: {
            "a": [run(lr * (1 + s / 10), lr / 2) for s in range(3)],
            "b": [run(lr * (1 + s / 10), lr) for s in range(3)],
        }
        for lr in (1.0, 2.0, 4.0)
    }
    [(_level, (diff, half, n))] = matched(
        cells, "a", "b", "reward_gain", "kl_initial", [3.0], log=False
    )
    assert n == 3 and diff < 0 and half < abs(diff)
    assert _verdict(-diff, half) == "holds"
    # in log x: the level is crossed at the same place for a straight line in log x
    [(_, (d_log, _, n_log))] = matched(cells, "a", "b", "reward_gain", "kl_initial", [2.0])
    assert n_log == 3 and d_log < 0
    assert _verdict(0.1, 0.2) == "inconclusive"
    assert _verdict(-0.3, 0.2) == "does not hold"


def test_mechanism_probe_predicts_the_kl_of_a_small_step():
    torch.manual_seed(0)
    task = AdditionTask(probe_size=8)
    policy = build_policy(task.vocab_size, seed=0, hidden_size=32, layers=1)
    shadow = build_policy(task.vocab_size, seed=1, hidden_size=32, layers=1)
    # ½ mean_i (dθ·g_i)² estimates ½ dθᵀ F dθ with the Fisher F sampled at the policy: many
    # samples of few prompts keep the estimate's noise small
    prompts = task.encode_prompts(task.probe_pairs[:2].repeat(64, 1))
    responses, mask = sample_responses(
        policy, prompts, max_len=4, eos_id=task.eos_id, pad_id=task.pad_id,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    probe = _MechanismProbe(policy, shadow, prompts, responses, mask)
    with torch.no_grad():
        for p in policy.parameters():
            p -= 1e-3 * p.grad
    out = probe.after(policy)
    # second order in a small step: predicted and measured KL agree up to sampling noise
    assert out["mech_kl_measured"] > 0
    assert out["mech_kl_predicted"] == pytest.approx(out["mech_kl_measured"], rel=0.25)
    assert 0 < out["mech_overlap"] <= 1
    # a gradient orthogonal to every sequence gradient has no overlap
    g = probe.seq_grads
    q, _ = torch.linalg.qr(g.T)
    v = torch.randn(g.shape[1], dtype=g.dtype)
    probe.grad = v - q @ (q.T @ v)
    with torch.no_grad():
        for p in policy.parameters():
            p += 1e-3 * p.grad  # back to the start: no update, no KL
    zero = probe.after(policy)
    assert zero["mech_overlap"] < 1e-12
    assert zero["mech_kl_measured"] == pytest.approx(0.0, abs=1e-6)


def test_quick_sweep_runs_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    # one worker: no process start-up, the fastest on a busy 2-core machine
    assert main(["sweep", "--quick", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    spec = SweepSpec.quick()
    assert data["finished"] == data["planned"] == len(plan(spec)) == len(data["runs"])
    assert data["command"] == f"proma-accum sweep --quick --out {out} --workers 1"
    run = data["runs"][0]
    assert len(run["metrics"]["val_reward"]) == spec.base["steps"] + 1
    assert set(run["summary"]) >= {"reward_gain", "kl_initial", "kl_successive", "mech_overlap"}
    proma = [r for r in data["runs"] if r["method"] == "proma"]
    assert all(r["summary"]["clamp_fraction"] is not None for r in proma)
    assert any(r["summary"]["mech_kl_measured"] is not None for r in data["runs"])
    report = (out / "report.md").read_text()
    for section in ("Learning-rate axis", "Matched comparisons", "PROMA's settings", "mechanism"):
        assert section in report
    for fig in ("tradeoff.png", "settings.png", "mechanism.png"):
        assert (out / fig).stat().st_size > 10_000
    timing = json.loads((out / "timing.json").read_text())
    assert len(timing) == 1 and timing[0]["ran"] == len(plan(spec))
    # resumed: everything is cached, nothing runs, the timing history is unchanged
    capsys.readouterr()
    assert main(["sweep", "--quick", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert f"{len(plan(spec))} of {len(plan(spec))} runs" in capsys.readouterr().out
    assert len(json.loads((out / "timing.json").read_text())) == 1


def test_evidence_quotes_the_committed_sweep_report():
    """Every table the evidence page marks as copied from the sweep's report is in it, and the
    report and ``sweep.json`` describe the same finished runs."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    evidence = (root / "docs" / "evidence.md").read_text()
    report = (root / "docs" / "sweep" / "report.md").read_text()
    data = json.loads((root / "docs" / "sweep" / "sweep.json").read_text())
    marker = "<!-- from sweep/report.md -->\n"
    blocks = evidence.split(marker)[1:]
    assert len(blocks) >= 4
    for block in blocks:
        rows = []
        for line in block.splitlines():
            if not line.startswith("|"):
                break
            rows.append(line)
        assert rows and "\n".join(rows) in report
    assert f"{data['finished']} of {data['planned']} runs finished" in report
    assert len(data["runs"]) == data["finished"]
    assert {"tradeoff.png", "settings.png", "mechanism.png"} <= {
        p.name for p in (root / "docs" / "sweep").iterdir()
    }
