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
from proma_accum import ProjectedAccumulator, _seq_grads
from proma_accum.testing import assert_grads_close, reference_accumulate

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _steps(model, steps, compile):
    """Gradients after the last of ``steps`` (lists of microbatches; no parameter update), and
    the compiled graphs counted after each step."""
    graphs = []
    with ProjectedAccumulator(model, compile=compile) as acc:
        for microbatches in steps:
            model.zero_grad(set_to_none=True)
            for mb in microbatches:
                with acc.microbatch(mb["seq_ids"]):
                    toy_sequence_losses(model, mb).sum().backward()
            graphs.append(counters["stats"]["unique_graphs"])
    return {n: p.grad.clone() for n, p in model.named_parameters()}, graphs


def test_compiled_update_matches_eager_with_no_recompilation(gen, monkeypatch):
    """Against the eager path under the device precision policy (float64 products, which the
    compiled passes use on every device), to rounding; and against the reference."""
    monkeypatch.setattr(_seq_grads, "HOST_DECISIONS_ON_CPU", False)
    torch.manual_seed(0)
    model = ToyLM()
    four = row_microbatches(gen, 2, rows=4, length=5, vocab=23)  # k = 4
    six = row_microbatches(gen, 2, rows=6, length=5, vocab=23)  # k = 6
    steps = [four, six + four, four + six]
    torch._dynamo.reset()
    counters.clear()
    eager, graphs = _steps(model, steps, compile=False)
    assert graphs == [0, 0, 0]  # negative control: the eager path compiles nothing
    compiled, graphs = _steps(model, steps, compile=True)
    # Compiled in the first step (k = 4); another k and further steps compile nothing.
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 3, graphs
    for name in eager:  # float32 rounding apart (bitwise equal on this machine)
        torch.testing.assert_close(compiled[name], eager[name])
    assert_grads_close(model, reference_accumulate(model, steps[-1], toy_sequence_losses))


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


def test_changed_settings_run_the_same_graph(gen):
    """The clamp bound and the strength are inputs of the graph: a strength schedule over 12
    values (and accumulators with other clamps) compiles nothing more — far past torch's 8
    recompilations per function, which would end in a hard error under ``fullgraph=True``."""
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for i in range(12):
        acc = ProjectedAccumulator(model, compile=True, strength=1.0 - i / 20, clamp=0.3 + i / 10)
        model.zero_grad(set_to_none=True)
        with acc:
            for mb in mbs:
                with acc.microbatch(mb["seq_ids"]):
                    toy_sequence_losses(model, mb).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
        expected = reference_accumulate(
            model, mbs, toy_sequence_losses, strength=acc.strength, clamp=acc.clamp
        )
        assert_grads_close(model, expected)
    assert graphs[0] >= 1 and graphs == [graphs[0]] * 12, graphs


@pytest.mark.parametrize("block_bytes", [None, 8], ids=["one-block", "one-column-blocks"])
def test_the_compiled_passes_only_take_tensors_whose_float64_copy_fits_a_block(
    gen, monkeypatch, block_bytes
):
    """The compiled passes copy all of ``S`` to float64 at once: only tensors whose copy fits
    one column block take them (the transient the eager passes allow themselves); the others
    run the eager passes with the compiled algebra. Both match the reference."""
    if block_bytes is not None:
        monkeypatch.setitem(_seq_grads._GRAM_BLOCK_BYTES, "cpu", block_bytes)
    taken = []
    whole = _seq_grads.TensorSequenceGradients.whole

    def spy(self):
        s = whole(self)
        taken.append(s is not None)
        return s

    monkeypatch.setattr(_seq_grads.TensorSequenceGradients, "whole", spy)
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    _, _ = _steps(model, [mbs], compile=True)
    assert taken and (any(taken) if block_bytes is None else not any(taken))
    assert_grads_close(model, reference_accumulate(model, mbs, toy_sequence_losses))
