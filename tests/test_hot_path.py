"""The per-tensor hot path: host synchronisations and ATen operators pinned, failures of the
backward caught inside the context, non-finite values, and the deferred consistency check."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import ToyLM, row_microbatches, toy_sequence_losses

from benchmarks.dispatch_counts import CountOps, algebra_launches, count, profiled_kernels
from proma_accum import IncompleteSequenceDataError, MicrobatchFailedError, ProjectedAccumulator
from proma_accum.testing import assert_grads_close, reference_accumulate

# Measured with ``python -m benchmarks.dispatch_counts`` (tiny Qwen3, k = 8, 32 tokens); these
# numbers may only go down. Syncs: the embedding's ``unique`` (its touched rows) in the
# backward, and the consistency checks of every tensor together at the context exit; no
# eigensolver (``torch.linalg.eigh`` synchronises on CUDA).
MAX_BACKWARD_SYNCS = 1
MAX_EXIT_SYNCS = 1
MAX_EXTRA_OPS_PER_TENSOR = {"exact": 79, "gs2": 81}
# Of those, the operators that launch a kernel on a GPU (views and metadata left out).
MAX_EXTRA_KERNELS_PER_TENSOR = {"exact": 54, "gs2": 56}


@pytest.mark.parametrize("projection", ["exact", "gs2"])
def test_host_syncs_per_microbatch_do_not_grow_with_the_model(projection):
    small, large = count(layers=1, projection=projection), count(layers=4, projection=projection)
    assert large.projected_tensors > 3 * small.projected_tensors
    for c in (small, large):
        assert c.proma_syncs <= MAX_BACKWARD_SYNCS, c
        assert c.exit_syncs <= MAX_EXIT_SYNCS, c
        assert c.extra_ops_per_tensor <= MAX_EXTRA_OPS_PER_TENSOR[projection], c
        assert c.extra_kernels_per_tensor <= MAX_EXTRA_KERNELS_PER_TENSOR[projection], c
        assert c.proma_eigh == 0, c


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compile_fuses_the_k_by_k_algebra():
    """``compile=True``: the update's ``k × k`` algebra in 4 fused kernels around the 4 linear
    algebra calls (eager, the same counter sees about 30)."""
    compiled, eager = algebra_launches(compile=True), algebra_launches(compile=False)
    assert len(compiled) <= 8, compiled
    assert sum("cpp_fused" in name for name in compiled) >= 1, compiled
    assert len(eager) >= 25, eager  # negative control: the counter sees every eager kernel


# compile=True, counted with torch.profiler over the whole backward (4 layers, exact).
MAX_EXTRA_KERNELS_PER_TENSOR_COMPILED = 25


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_compile_brings_the_kernels_per_tensor_within_25():
    """With ``compile=True`` the passes and the algebra of a one-chunk, verified tensor are one
    compiled function. The profiler's count of the eager path agrees with the dispatch mode's
    (a check of the profiler-based counter, which alone sees inside compiled code)."""
    eager = profiled_kernels(layers=4, compile=False)
    assert abs(eager - count(layers=4).extra_kernels_per_tensor) < 1.0, eager
    compiled = profiled_kernels(layers=4, compile=True)
    assert compiled <= MAX_EXTRA_KERNELS_PER_TENSOR_COMPILED, compiled
    assert compiled < eager - 20  # negative control: the eager path is far above


def test_the_counter_sees_host_syncs():
    """Negative control for the counts: each pattern that synchronises is counted."""
    x = torch.randn(10)
    with CountOps() as c:
        bool(x.sum() > 0)
        x[x > 0]
        torch.unique(x)
    assert c.syncs == 3  # (.tolist() and .cpu() of a CPU tensor dispatch nothing: not seen)
    with CountOps() as c:
        torch.where(x > 0, x, 0.0).sum()
    assert c.syncs == 0


def test_the_counter_tells_kernels_from_views():
    """Negative control for the kernel count: views and allocations launch nothing."""
    x = torch.randn(4, 6)
    with CountOps() as c:
        x.view(6, 4).T[1:].diagonal()
        torch.empty(3)
    assert (c.total, c.kernels) == (5, 0)
    with CountOps() as c:
        (x * 2).sum()
    assert (c.total, c.kernels) == (2, 2)


def _run(acc, model, mb):
    with acc.microbatch(mb["seq_ids"]):
        toy_sequence_losses(model, mb).sum().backward()


def test_an_exception_caught_inside_the_context_fails_the_microbatch(gen):
    """The "skip a bad batch" pattern inside the context: the backward raises in the middle
    (some tensors already updated), the body swallows it; the context exit restores every
    p.grad bitwise and raises, and the next microbatch is exact."""
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    expected = reference_accumulate(model, [mbs[0], mbs[2]], toy_sequence_losses)
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        before = {n: p.grad.clone() for n, p in model.named_parameters()}

        def boom(grad):
            raise RuntimeError("bad batch")

        with pytest.raises(MicrobatchFailedError, match="did not complete"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
                handle = model.proj.weight.register_hook(boom)  # raises after the head's update
                with contextlib.suppress(RuntimeError):  # skipped, as a loop would
                    loss.backward()
                assert not torch.equal(model.head.weight.grad, before["head.weight"])
        handle.remove()
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, before[n]), n
        _run(acc, model, mbs[2])
    assert_grads_close(model, expected)


def test_the_consistency_check_fails_at_the_context_exit(gen):
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 2, rows=4, length=5, vocab=23)
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        with pytest.raises(IncompleteSequenceDataError, match=r"proj\.weight.*restored"):
            with acc.microbatch(mbs[1]["seq_ids"]):
                loss = toy_sequence_losses(model, mbs[1]).sum()
                (loss + 0.1 * model.proj.weight.square().sum()).backward()  # returns normally
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, before[n]), n


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["loss", "running"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_non_finite_values_accumulate_as_plain_accumulation_would(gen, bad, where, compile):
    """No eigensolver error: the running gradient is non-finite wherever plain accumulation's
    is, finite where plain accumulation's is (so an isfinite check keeps working), and the
    next step is exact again."""
    torch.manual_seed(0)
    model = ToyLM()
    plain = copy.deepcopy(model)
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)

    def step(acc, m, mb, poison):
        with acc.microbatch(mb["seq_ids"]):
            loss = toy_sequence_losses(m, mb).sum()
            if poison and where == "loss":
                loss = loss * bad
            loss.backward()

    with (
        ProjectedAccumulator(model, compile=compile) as acc,
        ProjectedAccumulator(plain, strength=0.0) as ref,
    ):
        for a, m in ((acc, model), (ref, plain)):
            step(a, m, mbs[0], poison=False)
            if where == "running":
                with torch.no_grad():
                    m.head.weight.grad[0, 0] = bad
            step(a, m, mbs[1], poison=True)
        for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            assert torch.equal(torch.isfinite(p.grad), torch.isfinite(q.grad)), n
        assert not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    # the next step, after zero_grad, is exact
    model.zero_grad(set_to_none=True)
    expected = reference_accumulate(model, [mbs[0], mbs[2]], toy_sequence_losses)
    with ProjectedAccumulator(model) as acc:
        _run(acc, model, mbs[0])
        _run(acc, model, mbs[2])
    assert_grads_close(model, expected)
