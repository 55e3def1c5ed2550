"""The consistency check's tolerance in reduced precision: no false alarm on a correct run, and
a contribution from outside the hooked layers caught where autograd's own gradient is precise
enough to show it. A fast slice of ``python -m benchmarks.consistency_sweep``."""

from __future__ import annotations

import pytest
import torch

from benchmarks.consistency_sweep import PRECISIONS, Setting, run_setting
from proma_accum._consistency import Tolerance, tolerance

# Layer kinds whose autograd gradient is rounded once (GEMM / float32 accumulation): a 1%
# contribution from outside is caught in every precision.
PRECISE = ("linear", "rms_norm", "hf_rms_norm", "conv1d")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layer", [*PRECISE, "layer_norm"])
def test_no_false_alarm_and_outside_contributions_caught(precision, layer):
    for seed, (d, tokens, k) in enumerate([(32, 16, 2), (64, 128, 8), (256, 64, 4)]):
        setting = Setting(precision, layer, d, tokens, k)
        records = run_setting(setting, seed, outside=0.01 if layer in PRECISE else 0.2)
        clean = [(n, r, a) for n, r, a, outside in records if not outside]
        assert clean and all(r <= a for _, r, a in clean), (setting, clean)
        control = [(r, a) for n, r, a, outside in records if outside and n == "mid.weight"]
        assert control and all(r > a for r, a in control), (setting, control)


def test_the_tolerance_follows_the_precisions_in_play():
    fp32 = tolerance(torch.float32, [torch.float32], low_precision_accumulation=True)
    assert fp32 == Tolerance(1e-3, 0.0)
    bf16 = tolerance(torch.bfloat16, [torch.bfloat16], low_precision_accumulation=False)
    assert bf16 == Tolerance(2 * 2.0**-8, 0.0)
    assert tolerance(torch.bfloat16, [], low_precision_accumulation=True).accumulation == 2.0**-8
    autocast = tolerance(torch.float32, [torch.bfloat16], low_precision_accumulation=True)
    assert autocast == Tolerance(2 * 2.0**-8, 0.0)  # autocast runs norms in float32
    assert tolerance(torch.float16, [None], low_precision_accumulation=False).rtol == 1e-3
    # float16's subnormal spacing, 2**-24, over N tokens x numel elements
    fp16 = tolerance(torch.float16, [], False, tokens=4, numel=9)
    assert fp16.absolute == 2.0**-24 * 6
    assert tolerance(torch.float32, [torch.float16], False, tokens=4, numel=9).absolute > 0
    assert tolerance(torch.bfloat16, [torch.bfloat16], False, tokens=4, numel=9).absolute == 0
