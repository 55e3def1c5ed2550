"""Everyday training-loop patterns inside and around ``acc.microbatch(...)`` (issue #12).

Each test fails without the fix it names: the pattern either gives exactly what plain PyTorch
gives (or the reference), or a clear error before anything is touched, with every ``p.grad``
as it was before the microbatch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses

from proma_accum import ProjectedAccumulator


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ToyLM()


@pytest.fixture
def mbs(gen):
    return row_microbatches(gen, 3, rows=4, length=5, vocab=23)


def _run(acc, model, mb):
    with acc.microbatch(mb["seq_ids"]):
        toy_sequence_losses(model, mb).sum().backward()


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, before[n]), n


def _assert_equal_grads(model, other):
    for (n, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


# ----------------------------------------------------------------- 13. smaller
def test_step_all_exists_after_a_step_of_one_microbatch(model, mbs):
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        stats = acc.stats()
    assert stats["step"]["all"]["updates"] == 0
    assert stats["microbatch"]["all"]["updates"] == 0
    assert "proma/step/all/updates" in acc.stats(flat=True)


def test_exclude_of_the_wrong_type_names_it(model):
    with pytest.raises(TypeError, match="exclude must be"):
        ProjectedAccumulator(model, exclude=5)


def test_advantages_on_another_device_names_it(model):
    with ProjectedAccumulator(model) as acc, pytest.raises(ValueError, match="advantages is on"):
        with acc.microbatch(torch.arange(4), advantages=torch.ones(4, device="meta")):
            pass
