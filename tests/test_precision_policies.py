"""Both precision policies of the per-sequence gradients (``_seq_grads``) agree with the
brute-force reference: the device policy (float64 products, no host reads: what GPUs run) and
the CPU policy (float32 products, float64 only when the data needs it), on the cases that
exercise the precision decisions: nearly dependent, duplicate and zero sequence gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ToyLM,
    packed_microbatches,
    row_microbatches,
    run_accumulator,
    toy_sequence_losses,
)

from proma_accum import _seq_grads
from proma_accum.testing import assert_grads_close, reference_accumulate


@pytest.mark.parametrize("host_decisions", [False, True], ids=["device", "cpu"])
@pytest.mark.parametrize("projection", ["exact", "gs2"])
@pytest.mark.parametrize("case", ["packed", "duplicates", "nearly-dependent"])
def test_policy_matches_the_reference(host_decisions, projection, case, gen, monkeypatch):
    monkeypatch.setattr(_seq_grads, "HOST_DECISIONS_ON_CPU", host_decisions)
    torch.manual_seed(0)
    model = ToyLM(tied=case == "packed")
    if case == "packed":
        mbs = packed_microbatches(gen, 3, rows=2, per_row=3, seg_len=3, vocab=23)
    else:
        mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23, pad=False)
        for mb in mbs[1:]:
            mb["input_ids"][1] = mb["input_ids"][0]
            mb["targets"][1] = mb["targets"][0]
            if case == "duplicates":
                mb["targets"][2] = -100  # and a zero gradient
            else:  # the same sequence but its last target: nearly dependent gradients
                mb["targets"][1, -1] = (mb["targets"][0, -1] + 1) % 23
    expected = reference_accumulate(model, mbs, toy_sequence_losses, projection=projection)
    run_accumulator(model, mbs, toy_sequence_losses, projection=projection)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
