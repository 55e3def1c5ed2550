"""The consistency check's tolerance in reduced precision: no false alarm on a correct run, and
a contribution from outside the hooked layers caught where autograd's own gradient is precise
enough to show it. A fast slice of ``python -m benchmarks.consistency_sweep``."""

from __future__ import annotations

import pytest
import torch

from benchmarks.consistency_sweep import PRECISIONS, Setting, run_setting
from proma_accum import IncompleteSequenceDataError, ProjectedAccumulator
from proma_accum._consistency import Tolerance, tolerance
from proma_accum._kernels.rms_norm import HFRMSNormKernel

# The contribution from outside the hooked layers each layer kind's check catches in every
# precision: 1% where autograd's gradient is rounded once (GEMMs accumulate in float32); 5%
# for the RMSNorms, whose half-precision gradient sums per-token products rounded to that
# dtype (the check allows ~u (Σ_t ‖c_t‖²)^½ for it); 20% for LayerNorm, which accumulates
# over tokens in the half dtype (u Σ_t ‖c_t‖).
OUTSIDE = {"linear": 0.01, "conv1d": 0.01, "rms_norm": 0.05, "hf_rms_norm": 0.05, "layer_norm": 0.2}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layer", list(OUTSIDE))
def test_no_false_alarm_and_outside_contributions_caught(precision, layer):
    for seed, (d, tokens, k) in enumerate([(32, 16, 2), (64, 128, 8), (256, 64, 4)]):
        setting = Setting(precision, layer, d, tokens, k)
        records = run_setting(setting, seed, outside=OUTSIDE[layer])
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


def test_the_per_token_rounding_term():
    bf16 = tolerance(torch.bfloat16, [], False, per_token_rounding=True)
    assert bf16.per_token == 2 * 2.0**-8 and bf16.accumulation == 0.0
    assert tolerance(torch.float32, [], False, per_token_rounding=True).per_token == 0.0


def _bf16_qwen3(seed: int, scale_norms: float = 1.0):
    """Two microbatches of a tiny bf16 Qwen3 (weights perturbed by the seed): its per-head
    ``q_norm`` / ``k_norm`` (8 features) sum contributions of every token and head."""
    from conftest import hf_sequence_losses, row_microbatches
    from test_families import FAMILIES, VOCAB

    torch.manual_seed(seed)
    model = FAMILIES["qwen3"]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    mbs = row_microbatches(gen, 2, rows=4, length=16, vocab=VOCAB)
    for mb in mbs:
        b, t = mb["input_ids"].shape
        mb["position_ids"] = torch.arange(t).expand(b, t)
    with ProjectedAccumulator(model) as acc:
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                hf_sequence_losses(model, mb).float().sum().backward()


def test_no_false_alarm_on_a_bf16_k_norm(monkeypatch):
    """Regression: this run's ``k_norm`` check failed the ``2u`` bound (at 2.14u) before the
    per-token rounding term; negative control: without the term it fails again."""
    _bf16_qwen3(seed=9)
    monkeypatch.setattr(HFRMSNormKernel, "per_token_rounding", False)
    with pytest.raises(IncompleteSequenceDataError, match="k_norm"):
        _bf16_qwen3(seed=9)


def test_a_wrong_rms_norm_gradient_is_caught_in_bf16(monkeypatch):
    """The allowance does not hide a kernel 5% off."""
    normalized = HFRMSNormKernel.normalized
    monkeypatch.setattr(
        HFRMSNormKernel, "normalized", lambda self, m, x: 1.05 * normalized(self, m, x)
    )
    with pytest.raises(IncompleteSequenceDataError, match="norm"):
        _bf16_qwen3(seed=9)
