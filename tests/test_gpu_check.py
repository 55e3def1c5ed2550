"""``python -m benchmarks.gpu_check`` runs on CPU with a small model (so it never rots), and
on CUDA when one is present."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


def test_gpu_check_runs_on_cpu_small(capsys):
    result = gpu_check.main(["--device", "cpu", "--small", "--rounds", "1"])
    out = capsys.readouterr().out
    assert result["ok"], result["kinds"]
    assert set(result["timing"]) == {"plain", "proma-exact", "proma-gs2", "proma-exact-compiled"}
    assert result["timing"]["plain"]["ratio"] == 1.0
    assert result["counts"]["syncs"] <= 2 and result["counts"]["exit_syncs"] == 1
    assert result["counts"]["cuda_syncs"] is None  # CUDA's sync debug mode: on CUDA only
    assert "| tied |" in out and "ratio to plain" in out


def test_gpu_check_refuses_cuda_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layer_kind_matches_the_reference_on_cuda(dtype):
    errors = gpu_check.check_kinds(torch.device("cuda"), dtype)
    assert all(e <= gpu_check.TOLERANCE[dtype] for e in errors.values()), errors
