"""Hypothesis properties of the PROMA update and of the accumulator on a small model."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, row_microbatches, run_accumulator, toy_sequence_losses
from hypothesis import given, settings
from hypothesis import strategies as st

from proma_accum._numerics import sq_norm
from proma_accum._proma import (
    accumulate_proma,
    span_coefficients_exact,
    span_coefficients_gs2,
)
from proma_accum.testing import (
    accumulate_proma_reference,
    project_to_complement_v1,
    project_to_complement_v2,
)

FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=10, deadline=None)


class DenseSeqGrads:
    """``SequenceGradients`` over an explicit ``(k, d)`` matrix."""

    def __init__(self, s: torch.Tensor):
        self.s = s
        self.num_sequences = s.shape[0]

    def gram_and_inner(self, acc):
        s = self.s.double()
        inner = torch.zeros(len(s), dtype=torch.float64) if acc is None else s @ acc.double()
        return s @ s.T, inner

    def combine(self, weights):
        return (weights.double() @ self.s.double()).to(self.s.dtype)

    spectrum = None  # nothing computed ahead

    def plus_combination(self, acc, mcb_grad, weights):
        c = self.combine(weights)
        return acc.to(c.dtype) + (c if mcb_grad is None else mcb_grad.to(c.dtype) + c)


@st.composite
def sequence_gradients(draw, max_k=6, max_d=12):
    """``(k, d)`` sequence gradients with repeated, scaled and zero rows mixed in."""
    k = draw(st.integers(1, max_k))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(k, d, generator=g, dtype=torch.float64)
    for i in range(1, k):
        kind = draw(st.sampled_from(["fresh", "repeat", "scaled", "zero"]))
        j = draw(st.integers(0, i - 1))
        if kind == "repeat":
            s[i] = s[j]
        elif kind == "scaled":
            s[i] = -2.5 * s[j]
        elif kind == "zero":
            s[i] = 0
    acc = torch.randn(d, generator=g, dtype=torch.float64)
    return s, acc


@FAST
@given(sequence_gradients())
def test_exact_projection_is_orthogonal_and_idempotent(data):
    s, acc = data
    project = lambda v: v - span_coefficients_exact(s @ s.T, s @ v) @ s  # noqa: E731
    complement = project(acc)
    scale = acc.norm() * s.norm(dim=1).clamp(min=1e-300)
    assert torch.all((s @ complement).abs() <= 1e-9 * scale + 1e-12)
    torch.testing.assert_close(project(complement), complement, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(complement, project_to_complement_v1(acc, s.T))


@FAST
@given(sequence_gradients())
def test_gs2_coefficients_match_the_literal_loop(data):
    s, acc = data
    complement = acc - span_coefficients_gs2(s @ s.T, s @ acc) @ s
    torch.testing.assert_close(complement, project_to_complement_v2(acc, s.T))


@FAST
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_gs2_equals_exact_for_orthogonal_sequence_gradients(k, seed):
    g = torch.Generator().manual_seed(seed)
    d = k + 3
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    s = (q * torch.rand(k, generator=g, dtype=torch.float64).add(0.1)).T
    acc = torch.randn(d, generator=g, dtype=torch.float64)
    gram, inner = s @ s.T, s @ acc
    torch.testing.assert_close(
        span_coefficients_gs2(gram, inner), span_coefficients_exact(gram, inner)
    )


@FAST
@given(
    sequence_gradients(),
    st.sampled_from(["exact", "gs2"]),
    st.floats(0.01, 3.0),
    st.floats(0.0, 1.0),
)
def test_clamp_bound_holds_and_matches_reference(data, projection, clamp, strength):
    s, acc = data
    mcb = s.sum(0)
    new, info = accumulate_proma(
        acc, mcb, DenseSeqGrads(s), projection=projection, clamp=clamp, strength=strength
    )
    removed = acc + mcb - new
    assert removed.norm() <= strength * clamp * mcb.norm() * (1 + 1e-9) + 1e-12
    want = accumulate_proma_reference(
        acc, mcb, s, projection=projection, clamp=clamp, strength=strength
    )
    torch.testing.assert_close(new, want)
    if bool(info.clamped):  # when the clamp binds, it binds exactly at the bound
        torch.testing.assert_close(removed.norm(), strength * clamp * mcb.norm())


@pytest.mark.parametrize("projection", ["exact", "gs2"])
def test_clamp_statistic_counts_only_a_binding_bound(projection):
    """``clamped`` means ‖P(acc)‖ exceeded the bound: with a zero microbatch gradient (bound
    0) and ``acc`` orthogonal to the span (nothing to project) nothing is clamped; with the same
    bound and ``acc`` inside the span, the clamp binds and removes nothing."""
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)  # Σ g_i = 0
    mcb = g.sum(0)
    for acc, binds in ((torch.tensor([0.0, 2.0, 0.0]), False), (torch.tensor([3.0, 0, 0]), True)):
        acc = acc.double()
        new, info = accumulate_proma(
            acc, mcb, DenseSeqGrads(g), projection=projection, clamp=0.5, strength=1.0
        )
        assert bool(info.clamped) is binds
        assert float(info.removed_norm) == 0.0
        torch.testing.assert_close(new, acc)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _close(a, b, rtol=2e-5):
    for n in a:
        err = (a[n].double() - b[n].double()).norm()
        assert err <= rtol * b[n].double().norm() + 1e-7, n


@SLOW
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 5),
    st.integers(2, 4),
    st.sampled_from(["exact", "gs2"]),
)
def test_invariant_to_relabelling_and_row_order(seed, rows, n_mb, projection):
    """Relabelling ids never matters; row order does not matter for the exact projection
    (gs2 visits sequences in order of appearance, so only relabelling is checked for it)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    model = ToyLM(conv1d=False)
    mbs = row_microbatches(gen, n_mb, rows=rows, length=4, vocab=23)
    run_accumulator(model, mbs, toy_sequence_losses, projection=projection)
    reference = _grads(model)
    shuffled = []
    for mb in mbs:
        perm = torch.randperm(rows, generator=gen) if projection == "exact" else torch.arange(rows)
        relabel = torch.randperm(100, generator=gen)  # new arbitrary ids, same partition
        shuffled.append(
            {
                "input_ids": mb["input_ids"][perm],
                "targets": mb["targets"][perm],
                "seq_ids": relabel[mb["seq_ids"][perm]],
            }
        )
    run_accumulator(model, shuffled, toy_sequence_losses, projection=projection)
    _close(_grads(model), reference)


@SLOW
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_single_microbatch_and_strength_zero_are_plain(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    model = ToyLM(conv1d=False).to(dtype)
    mbs = row_microbatches(gen, 3, rows=3, length=4, vocab=23)
    model.zero_grad(set_to_none=True)
    toy_sequence_losses(model, mbs[0]).sum().backward()
    one = _grads(model)
    for mb in mbs[1:]:
        toy_sequence_losses(model, mb).sum().backward()
    plain = _grads(model)
    run_accumulator(model, mbs[:1], toy_sequence_losses)
    assert all(torch.equal(p.grad, one[n]) for n, p in model.named_parameters())
    run_accumulator(model, mbs, toy_sequence_losses, strength=0.0)
    assert all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())
    run_accumulator(model, mbs, toy_sequence_losses)  # negative control: projection changes it
    assert not all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())


@FAST
@given(sequence_gradients(), st.floats(1e-8, 1e3))
def test_exact_projection_does_not_depend_on_lengths(data, scale):
    """A sequence scaled by a tiny (or huge) advantage is still a full direction of the span."""
    s, acc = data
    scaled = s.clone()
    scaled[0] *= scale
    complement = acc - span_coefficients_exact(s @ s.T, s @ acc) @ s
    complement_scaled = acc - span_coefficients_exact(scaled @ scaled.T, scaled @ acc) @ scaled
    torch.testing.assert_close(complement_scaled, complement, rtol=1e-7, atol=1e-9)


@FAST
@given(
    # up to _NORM_SMALL one float64 reduction; above, row norms (with and without a tail)
    st.one_of(st.integers(0, 3000), st.integers(4097, 20000)),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    st.integers(0, 2**31 - 1),
)
def test_sq_norm_matches_a_float64_reduction(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (1,), generator=g)).to(dtype)
    expected = x.double().square().sum()
    got = sq_norm(x.view(-1, 3) if n % 3 == 0 and n else x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)
