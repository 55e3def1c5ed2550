"""The brute-force comparison on every available device, in float32 and bf16: CPU always, CUDA
when one is present (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, packed_microbatches, row_microbatches, toy_sequence_losses

from proma_accum import ProjectedAccumulator
from proma_accum.testing import assert_grads_close, reference_accumulate

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
# bf16: the gradients are stored in bf16 (relative rounding 2**-8 per element), against a
# float64 reference computed from the same bf16 model.
RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _to(mb: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in mb.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["rows", "packed"])
@pytest.mark.parametrize("projection", ["exact", "gs2"])
def test_toy_model_matches_reference_on_device(device, dtype, layout, projection, gen):
    torch.manual_seed(0)
    model = ToyLM(tied=layout == "packed").to(device, dtype)
    if layout == "rows":
        mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    else:
        mbs = packed_microbatches(gen, 3, rows=2, per_row=3, seg_len=3, vocab=23)
    mbs = [_to(mb, device) for mb in mbs]

    def losses(m, mb):
        return toy_sequence_losses(m, mb).float()

    expected = reference_accumulate(model, mbs, losses, projection=projection)
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model, projection=projection) as acc:
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                losses(model, mb).sum().backward()
    assert_grads_close(model, expected, rtol=RTOL[dtype], atol=1e-6)
    # negative control: plain accumulation is far from it
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for mb in mbs:
        losses(model, mb).sum().backward()
    diff = sum(
        float((p.grad.double() - plain[n].double()).norm()) for n, p in model.named_parameters()
    )
    assert diff > 0.1


# Families of every kind of layer the kernels cover (tied head, Conv1D, scaled embedding and
# (1 + w) norms, fused MoE experts); the rest of the matrix runs on CPU in test_families.py.
DEVICE_FAMILIES = ["qwen3", "llama", "gpt2", "gemma2", "qwen3-moe", "qwen2-moe"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", DEVICE_FAMILIES)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_families_match_reference_on_device(family, device, dtype, compile):
    from conftest import hf_sequence_losses
    from test_families import FAMILIES, _microbatches

    model = FAMILIES[family]().to(device, dtype)
    mbs = [_to(mb, device) for mb in _microbatches()[0]]

    def losses(m, mb):
        return hf_sequence_losses(m, mb).float()

    expected = reference_accumulate(model, mbs, losses)
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model, compile=compile) as acc:
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                losses(model, mb).sum().backward()
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected, rtol=RTOL[dtype], atol=1e-6)
    # negative control: plain accumulation misses the reference by more than the tolerance
    model.zero_grad(set_to_none=True)
    for mb in mbs:
        losses(model, mb).sum().backward()
    with pytest.raises(AssertionError, match="gradients differ from the reference"):
        assert_grads_close(model, expected, rtol=RTOL[dtype], atol=1e-6)
