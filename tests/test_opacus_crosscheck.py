"""Per-row sequence gradients agree with Opacus's per-sample gradients (loss_reduction="sum")."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses

from proma_accum import ProjectedAccumulator
from proma_accum.testing import record_sequence_gradients

opacus_gs = pytest.importorskip("opacus.grad_sample")


def test_per_row_sequence_gradients_match_opacus(gen):
    torch.manual_seed(0)
    model = ToyLM(conv1d=False)
    mb = row_microbatches(gen, 1, rows=5, length=6, vocab=23)[0]
    mb["seq_ids"] = torch.arange(5)  # row i is sequence i, as Opacus's sample i

    hooks = opacus_gs.GradSampleHooks(model, loss_reduction="sum")
    toy_sequence_losses(model, mb).sum().backward()
    opacus_per_sample = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    hooks.cleanup()
    model.zero_grad(set_to_none=True)

    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(mb["seq_ids"]):  # plain: nothing accumulated to project yet
            toy_sequence_losses(model, mb).sum().backward()
        with record_sequence_gradients(acc) as ours:
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()

    assert set(ours) == set(opacus_per_sample)
    for name, per_sample in opacus_per_sample.items():
        got = ours[name]
        if name == "embed.weight":  # rows of ids that do not occur are zero in both
            rows = torch.unique(mb["input_ids"])
            assert float(per_sample.abs().sum()) == pytest.approx(
                float(per_sample[:, rows].abs().sum())
            )
        torch.testing.assert_close(got, per_sample.double(), rtol=1e-5, atol=1e-6, msg=name)
    # negative control: sequences really differ from each other
    assert not torch.allclose(ours["proj.weight"][0], ours["proj.weight"][1])
