"""Large per-sequence gradient buffers are reused from one microbatch to the next of a step."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses

from proma_accum import ProjectedAccumulator, _workspace
from proma_accum._kernels import linear
from proma_accum.testing import assert_grads_close, reference_accumulate


def test_workspace_keeps_one_whole_large_buffer_per_kind(monkeypatch):
    monkeypatch.setattr(_workspace, "MIN_BYTES", 1000)
    ws = _workspace.Workspace()
    cpu = torch.device("cpu")
    small, view = torch.zeros(10), torch.zeros(2, 500)[:, :300]
    for t in (small, view):
        ws.formed(t)
        ws.released(t, keep=True)  # too small; a view
    assert len(ws) == 0
    a, b = torch.zeros(4, 100), torch.zeros(4, 100)
    ws.released(a, keep=True)
    ws.released(b, keep=True)  # one of a kind is enough
    assert len(ws) == 1
    ws.released(torch.zeros(4, 100))  # without keep: not kept
    assert len(ws) == 1
    assert ws.empty((4, 100), torch.float32, cpu) is a
    assert len(ws) == 0
    ws.released(a, keep=True)
    assert ws.empty((4, 100), torch.float64, cpu) is not a
    assert ws.empty((4, 300), torch.float32, cpu) is not a
    assert len(ws) == 1  # kept: neither asks for a buffer of a's kind
    assert ws.empty((5, 100), torch.float32, cpu) is not a  # another number of sequences
    assert len(ws) == 0
    ws.released(a, keep=True)
    ws.clear()
    assert len(ws) == 0


def test_workspace_meters_live_and_peak_bytes():
    ws = _workspace.Workspace()
    a, b = torch.zeros(10), torch.zeros(5)
    ws.formed(a)
    ws.formed(b)
    ws.released(a)
    assert (ws.live, ws.peak) == (20, 60)
    ws.reset_meter()
    assert (ws.live, ws.peak) == (0, 0)


@pytest.mark.parametrize("tied", [True, False])
def test_buffers_are_reused_within_a_step_and_results_match_the_reference(tied, gen, monkeypatch):
    monkeypatch.setattr(_workspace, "MIN_BYTES", 0)  # pool every fused layer's buffer
    formed = []
    outer = linear.outer_by_sequence

    def recording(left, right, seg):
        out = outer(left, right, seg)
        formed.append(out.data_ptr())
        return out

    monkeypatch.setattr(linear, "outer_by_sequence", recording)
    torch.manual_seed(0)
    model = ToyLM(tied=tied, conv1d=False)
    mbs = row_microbatches(gen, 4, rows=4, length=5, vocab=23)
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    acc = ProjectedAccumulator(model)
    with acc:
        model.zero_grad()
        for m, mb in enumerate(mbs):
            formed.clear()
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
            if m == 1:
                second = set(formed)
            if m >= 2:  # every buffer formed in the second microbatch is used again
                assert second <= set(formed), m
            assert (len(acc._workspace) > 0) == (m > 0)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
    assert len(acc._workspace) == 0  # emptied on detach
    with acc:
        for mb in mbs[:2]:
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
        assert len(acc._workspace) > 0
        model.zero_grad()
        with acc.microbatch(mbs[0]["seq_ids"]):  # a new step empties the pool
            assert len(acc._workspace) == 0


def test_optimizer_pass_through_empties_the_pool(gen, monkeypatch):
    monkeypatch.setattr(_workspace, "MIN_BYTES", 0)
    torch.manual_seed(0)
    model = ToyLM(tied=True, conv1d=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    with ProjectedAccumulator(model, optimizer=opt) as acc:
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
        assert len(acc._workspace) > 0
        acc.step()
        assert len(acc._workspace) == 0
        with acc.microbatch(mbs[1]["seq_ids"]):
            toy_sequence_losses(model, mbs[1]).sum().backward()
        assert len(acc._workspace) > 0
        acc.zero_grad()
        assert len(acc._workspace) == 0
