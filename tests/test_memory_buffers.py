"""Large per-sequence gradient buffers are reused from one microbatch to the next of a step."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses

from proma_accum import ProjectedAccumulator, _memory
from proma_accum._kernels import linear
from proma_accum.testing import assert_grads_close, reference_accumulate


def test_pool_keeps_one_whole_large_buffer_per_kind(monkeypatch):
    monkeypatch.setattr(_memory, "MIN_BYTES", 1000)
    pool = _memory.BufferPool()
    like = torch.zeros(1)
    pool.give(torch.zeros(10))  # too small
    pool.give(torch.zeros(2, 500)[:, :300])  # a view
    assert len(pool) == 0
    a, b = torch.zeros(4, 100), torch.zeros(4, 100)
    pool.give(a)
    pool.give(b)  # one of a kind is enough
    assert len(pool) == 1
    assert _memory.new_empty(like, 4, 100) is not a  # the pool is not active
    with pool.active():
        assert _memory.new_empty(like, 4, 100) is a
        assert len(pool) == 0
        pool.give(a)
        assert _memory.new_empty(like, 4, 100, dtype=torch.float64) is not a
        assert _memory.new_empty(like, 4, 300) is not a
        assert len(pool) == 1  # kept: neither asks for a buffer of a's kind
        assert _memory.new_empty(like, 5, 100) is not a  # another number of sequences
        assert len(pool) == 0
    pool.give(a)
    pool.clear()
    assert len(pool) == 0


@pytest.mark.parametrize("tied", [True, False])
def test_buffers_are_reused_within_a_step_and_results_match_the_reference(tied, gen, monkeypatch):
    monkeypatch.setattr(_memory, "MIN_BYTES", 0)  # pool every fused layer's buffer
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
            assert (len(acc._pool) > 0) == (m > 0)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
    assert len(acc._pool) == 0  # emptied on detach
    with acc:
        for mb in mbs[:2]:
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
        assert len(acc._pool) > 0
        model.zero_grad()
        with acc.microbatch(mbs[0]["seq_ids"]):  # a new step empties the pool
            assert len(acc._pool) == 0


def test_optimizer_pass_through_empties_the_pool(gen, monkeypatch):
    monkeypatch.setattr(_memory, "MIN_BYTES", 0)
    torch.manual_seed(0)
    model = ToyLM(tied=True, conv1d=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    with ProjectedAccumulator(model, optimizer=opt) as acc:
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
        assert len(acc._pool) > 0
        acc.step()
        assert len(acc._pool) == 0
        with acc.microbatch(mbs[1]["seq_ids"]):
            toy_sequence_losses(model, mbs[1]).sum().backward()
        assert len(acc._pool) > 0
        acc.zero_grad()
        assert len(acc._pool) == 0
