"""``compile=True``: the ``k × k`` algebra of each update as one ``torch.compile``'d graph.

Same gradients as the eager path, one graph for every ``k`` (no recompilation per step or per
number of sequences), and the eager path under a ``TorchDispatchMode`` (which ``torch.compile``
does not support)."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses
from torch._dynamo.utils import counters

from benchmarks.dispatch_counts import CountOps
from proma_accum import ProjectedAccumulator
from proma_accum.testing import assert_grads_close, reference_accumulate

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _steps(model, microbatches, compile, steps=2):
    """Gradients after each of ``steps`` optimizer steps (no update: the same gradients), and
    the compiled graphs counted after each step."""
    graphs = []
    with ProjectedAccumulator(model, compile=compile) as acc:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            for mb in microbatches:
                with acc.microbatch(mb["seq_ids"]):
                    toy_sequence_losses(model, mb).sum().backward()
            graphs.append(counters["stats"]["unique_graphs"])
    return {n: p.grad.clone() for n, p in model.named_parameters()}, graphs


def test_compiled_update_matches_eager_with_one_graph_for_every_k(gen):
    torch.manual_seed(0)
    model = ToyLM()
    # k = 4, 4, 6, 6: a second number of sequences must not compile again.
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    mbs += row_microbatches(gen, 2, rows=6, length=5, vocab=23)
    torch._dynamo.reset()
    counters.clear()
    eager, graphs = _steps(model, mbs, compile=False)
    assert graphs == [0, 0]  # negative control: the eager path compiles nothing
    compiled, graphs = _steps(model, mbs, compile=True)
    assert graphs == [1, 1]  # one graph, compiled in the first step, for k = 4 and k = 6
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-10, atol=0.0)
    assert_grads_close(model, reference_accumulate(model, mbs, toy_sequence_losses))


def test_compile_runs_eagerly_under_a_dispatch_mode(gen):
    """``torch.compile`` refuses to run under a ``TorchDispatchMode`` (a FLOP counter, a memory
    tracker): the update then runs eagerly, with the same operators as ``compile=False``."""
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    ops = {}
    for compile in (False, True):
        model.zero_grad(set_to_none=True)
        with ProjectedAccumulator(model, compile=compile) as acc:
            for mb in mbs:
                with acc.microbatch(mb["seq_ids"]):
                    loss = toy_sequence_losses(model, mb).sum()
                    with CountOps() as c:
                        loss.backward()
        ops[compile] = c.total
        assert_grads_close(model, reference_accumulate(model, mbs, toy_sequence_losses))
    assert ops[True] == ops[False]
