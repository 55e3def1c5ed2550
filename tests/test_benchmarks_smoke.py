"""Smoke test of the benchmark runner: ``python -m benchmarks.run --quick`` runs every variant
on tiny workloads and writes well-formed JSON. Timing values are not checked."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("opacus")

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain", "proma-exact", "proma-gs2", "opacus-materialised", "loop-style"}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_benchmark_writes_wellformed_json(tmp_path):
    out = tmp_path / "latest.json"
    saved = tmp_path / "copy" / "benchmarks.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--out",
            str(out),
            "--save",
            str(saved),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| workload | variant | time vs plain | range |" in proc.stdout

    data = json.loads(out.read_text())
    assert json.loads(saved.read_text()) == data
    assert data["schema"] == "proma-accum-benchmarks/1"
    assert data["quick"] is True
    assert {"torch", "transformers", "opacus", "proma_accum"} <= set(data["environment"])
    assert [w["name"] for w in data["workloads"]] == ["default", "packed"]

    for wl in data["workloads"]:
        assert _is_number(wl["target_extra_bytes"]) and wl["target_extra_bytes"] > 0
        assert wl["packed"] is (wl["name"] == "packed")
        by_name = {v["name"]: v for v in wl["variants"]}
        assert set(by_name) == VARIANTS
        for name, v in by_name.items():
            if name == "opacus-materialised" and wl["packed"]:
                assert v["status"] == "unsupported" and v["reason"]
                continue
            assert v["status"] == "ok", v
            assert len(v["times_s"]) == wl["rounds"] >= 1
            assert all(_is_number(t) and t > 0 for t in v["times_s"])
            for key in (
                "median_s",
                "ratio_vs_plain",
                "peak_tensor_bytes",
                "extra_tensor_bytes",
                "median_peak_rss_bytes",
                "grad_norm",
            ):
                assert _is_number(v[key]), (name, key, v[key])
            assert v["grad_norm"] > 0
        assert by_name["plain"]["ratio_vs_plain"] == 1.0
        assert by_name["plain"]["extra_tensor_bytes"] == 0


@pytest.mark.parametrize("workload", ["default", "packed"])
def test_baselines_compute_what_the_library_computes(workload):
    """The benchmark's own baselines are fair: on the tiny workloads, Opacus-materialised gives
    proma-exact's gradients, and loop-style gives proma-gs2's on the Linear weights it covers
    (the tied lm_head / embedding excepted)."""
    import torch

    from benchmarks.variants import make_variant
    from benchmarks.workloads import quick_workloads, tokens_in_loss

    wl = quick_workloads()[workload]
    batches = wl.make_batches(seed=1)
    n_tokens = tokens_in_loss(batches)
    grads = {}
    for name in ("plain", "proma-exact", "proma-gs2", "opacus-materialised", "loop-style"):
        variant = make_variant(name)
        if variant.unsupported(wl):
            continue
        model = wl.model.build(seed=0)
        variant.setup(model, wl)
        variant.step(batches, n_tokens)
        variant.teardown()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}

    def rel(a: str, b: str, names) -> float:
        return max(float((grads[a][n] - grads[b][n]).norm() / grads[b][n].norm()) for n in names)

    every = list(grads["plain"])
    linear = [n for n in every if n.endswith("proj.weight")]
    assert rel("proma-exact", "plain", every) > 1e-2  # the projection does something
    if "opacus-materialised" in grads:
        assert rel("opacus-materialised", "proma-exact", every) < 1e-4
    assert rel("loop-style", "proma-gs2", linear) < 1e-4
    assert torch.isfinite(torch.stack([g.norm() for g in grads["loop-style"].values()])).all()


def test_ratio_range_column():
    from benchmarks.run import _ratio_range

    assert _ratio_range([1.2, 1.05, 1.31]) == "1.05–1.31"
    assert _ratio_range([1.2]) == ""  # one round: no range


def test_help_and_list():
    for flag in ("--help", "--list"):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", flag],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "default" in proc.stdout


def test_floor_takes_the_cheaper_way_per_tensor():
    """The overhead floor charges each tensor the cheaper of its memory pass and its GEMM
    (only the memory pass for 1-D tensors) and scales by the projected microbatches."""
    from benchmarks.floor import TensorFloor, kernel_bound, ratio_bound
    from benchmarks.workloads import quick_workloads

    floors = [
        TensorFloor("lm", (8, 4), memory_s=0.004, gemm_s=0.010),  # memory is cheaper
        TensorFloor("proj", (4, 4), memory_s=0.003, gemm_s=0.001),  # GEMM is cheaper
        TensorFloor("norm", (4,), memory_s=0.002, gemm_s=None),  # no GEMM
    ]
    assert [f.floor_s for f in floors] == [0.004, 0.001, 0.002]
    wl = quick_workloads()["default"].with_(microbatches=4)
    per_mb, bound = ratio_bound(wl, plain_s=0.1, floors=floors)
    assert per_mb == pytest.approx(0.007)
    assert bound == pytest.approx(1 + 3 * 0.007 / 0.1)
    # the library-kernel figure counts only tensors with measured kernels
    floors[0].kernels_s, floors[1].kernels_s = 0.02, 0.005
    per_mb, bound = kernel_bound(wl, plain_s=0.1, floors=floors)
    assert per_mb == pytest.approx(0.025)
    assert bound == pytest.approx(1 + 3 * 0.025 / 0.1)


def test_floor_cli_quick():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor", "--quick", "--workloads", "default"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| tensor(s) | shape | count |" in proc.stdout
    assert "model.embed_tokens.weight" in proc.stdout
    bound = float(proc.stdout.split("lower bound on the step time ratio: ")[1].split("**")[1][:-1])
    assert bound > 1.0
    kernels = float(proc.stdout.split("GEMMs, i.e. **")[1].split("×**")[0])
    assert kernels > 1.0
    assert "measured proma-exact" in proc.stdout


def test_attribution_groups_aten_self_times_per_step():
    """ATen operators are grouped by category and divided by the step count; other events
    (autograd nodes, engine scopes) are not counted, their time is what remains of the step."""
    from benchmarks.attribute import OTHER_OPS, OUTSIDE, SMALL_GEMM, category, summarise

    bmm, gemm = category("aten::bmm"), category("aten::mm")
    assert bmm != gemm and category("aten::frobnicate") == OTHER_OPS
    # GEMMs by the size of their result: a k x k Gram matrix, a weight gradient, an addmm
    assert category("aten::mm", [[8, 4096], [4096, 8]]) == SMALL_GEMM
    assert category("aten::mm", [[768, 512], [512, 256]]) == gemm
    assert category("aten::addmm", [[256], [512, 128], [128, 256]]) == gemm
    assert category("aten::addmm", [[8], [8, 128], [128, 8]]) == SMALL_GEMM
    events = [
        ("aten::bmm", [[8, 16, 4], [8, 4, 16]], 0.4, 6),
        ("aten::mm", [[768, 512], [512, 256]], 0.2, 4),
        ("aten::addmm", [[256], [512, 128], [128, 256]], 0.2, 2),
        ("aten::mm", [[8, 4096], [4096, 8]], 0.1, 2),
        ("aten::frobnicate", [], 0.1, 10),
        ("SequenceGradientGEMMBackward", [], 0.5, 6),  # not an ATen operator
    ]
    prof = summarise(events, wall_s=2.0, steps=2)
    assert prof.wall_s == pytest.approx(1.0)
    assert prof.seconds[bmm] == pytest.approx(0.2) and prof.calls[bmm] == pytest.approx(3)
    assert prof.seconds[gemm] == pytest.approx(0.2) and prof.calls[gemm] == pytest.approx(3)
    assert prof.seconds[SMALL_GEMM] == pytest.approx(0.05)
    assert prof.seconds[OTHER_OPS] == pytest.approx(0.05)
    assert prof.seconds[OUTSIDE] == pytest.approx(1.0 - 0.2 - 0.2 - 0.05 - 0.05)


def _attribution_rows(*args: str) -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.attribute", "--quick", "--steps", "1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6:
            rows[cells[0]] = cells[1:]
    return rows


def test_attribution_cli_quick():
    """PROMA's per-sequence GEMM shows up as batched GEMM calls that plain never makes; the
    same variant against itself (a second model) adds none (negative control)."""
    from benchmarks.attribute import CATEGORIES

    bmm = CATEGORIES[0][0]
    rows = _attribution_rows("--workload", "default")
    assert rows[bmm][4].startswith("0 → ") and not rows[bmm][4].endswith("→ 0")
    assert float(rows[bmm][2]) > 0
    assert "**step**" in rows
    same = _attribution_rows("--workload", "default", "--variant", "plain")
    assert same[bmm][4] == "0 → 0" and float(same[bmm][2]) == 0


def test_bf16_margins_quick(monkeypatch):
    """Correct bf16 runs stay below the check's bound; negative control: without the RMSNorms'
    per-token rounding term, the known run (seed 9) is a false alarm."""
    from benchmarks.bf16_margins import margins
    from proma_accum._kernels.rms_norm import HFRMSNormKernel

    failed, by_kind = margins("qwen3", seeds=2)
    assert failed == 0 and max(r[-1] for r in by_kind.values()) < 1.0
    assert {"q_norm", "k_norm", "Embedding"} <= set(by_kind)
    monkeypatch.setattr(HFRMSNormKernel, "per_token_rounding", False)
    failed, _ = margins("qwen3", seeds=10)
    assert failed >= 1
