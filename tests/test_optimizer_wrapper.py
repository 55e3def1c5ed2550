"""torch.optim-style pass-through: zero_grad, step, param_groups, schedulers, checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses

from proma_accum import ProjectedAccumulator


def _train(acc, model, steps, gen):
    for _ in range(steps):
        acc.zero_grad()
        for mb in row_microbatches(gen, 2, rows=3, length=4, vocab=23):
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
        acc.step()


def test_wrapped_optimizer_and_scheduler(gen):
    torch.manual_seed(0)
    model = ToyLM(conv1d=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = ProjectedAccumulator(model, optimizer=opt)
    sched = torch.optim.lr_scheduler.LambdaLR(acc.optimizer, lambda s: 0.5**s)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with acc, warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            _train(acc, model, 1, gen)
            sched.step()
    assert acc.param_groups is opt.param_groups
    assert acc.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert acc.stats()["steps"] == 3 and acc.stats()["microbatches"] == 6
    # the accumulator keeps nothing in the optimizer's per-parameter state
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in model.parameters())


def test_state_dict_round_trip(gen):
    torch.manual_seed(0)
    model = ToyLM(conv1d=False)
    acc = ProjectedAccumulator(
        model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), clamp=0.25
    )
    with acc:
        _train(acc, model, 2, gen)
    sd = acc.state_dict()
    assert sd["proma_accum"]["clamp"] == 0.25 and sd["proma_accum"]["steps"] == 2
    other = ProjectedAccumulator(model, optimizer=torch.optim.AdamW(model.parameters(), lr=1.0))
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert other.stats()["steps"] == 2
    p = next(model.parameters())
    torch.testing.assert_close(other.state[p]["exp_avg"], acc.state[p]["exp_avg"])
    with pytest.raises(ValueError, match="state_dict must be what"):
        other.load_state_dict({"state": {}})


def test_without_optimizer(gen):
    model = ToyLM(conv1d=False)
    acc = ProjectedAccumulator(model)
    with pytest.raises(RuntimeError, match="no optimizer was given"):
        acc.step()
    model(torch.zeros(1, 2, dtype=torch.long)).sum().backward()
    acc.zero_grad()  # falls back to the model's zero_grad
    assert all(p.grad is None for p in model.parameters())
