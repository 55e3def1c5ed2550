"""The fast path against the brute-force reference (``proma_accum.testing``), per layer kind."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ToyLM,
    ids_in_order,
    packed_microbatches,
    row_microbatches,
    run_accumulator,
    toy_sequence_losses,
)

from proma_accum.testing import assert_grads_close, reference_accumulate


def _advantages(microbatches, gen):
    """Per microbatch: (id-indexed tensor for the accumulator, (k,) aligned for the reference)."""
    by_id, aligned = [], []
    for mb in microbatches:
        ids = ids_in_order(mb["seq_ids"])
        table = torch.zeros(int(ids.max()) + 1)
        table[ids] = torch.randn(ids.numel(), generator=gen)
        table[ids[0]] = 0.0  # a zero-advantage sequence is still projected against
        by_id.append(table)
        aligned.append(table[ids])
    return by_id, aligned


@pytest.mark.parametrize("projection", ["exact", "gs2"])
@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("layout", ["rows", "packed"])
@pytest.mark.parametrize("mode", ["loss", "advantages"])
def test_toy_model_matches_reference(projection, clamp, layout, mode, gen):
    torch.manual_seed(0)
    model = ToyLM(tied=(layout == "packed"))
    if layout == "rows":
        mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    else:
        mbs = packed_microbatches(gen, 3, rows=2, per_row=3, seg_len=3, vocab=23)
    adv_by_id = adv_aligned = None
    if mode == "advantages":
        adv_by_id, adv_aligned = _advantages(mbs, gen)
    expected = reference_accumulate(
        model, mbs, toy_sequence_losses, projection=projection, clamp=clamp, advantages=adv_aligned
    )
    acc = run_accumulator(
        model, mbs, toy_sequence_losses, advantages=adv_by_id, projection=projection, clamp=clamp
    )
    assert sorted(acc.projected_parameters()) == sorted(expected)
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
    step = acc.stats()["step"]["all"]
    assert step["projected_norm_ratio"] > 0
    if clamp is not None:  # correlated microbatches: the clamp must really bind
        assert step["clamp_fraction"] > 0


def test_reference_differs_from_plain_accumulation(gen):
    """Negative control: the comparison above would catch an accumulator that did nothing."""
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    expected = reference_accumulate(model, mbs, toy_sequence_losses, clamp=None)
    run_accumulator(model, mbs, toy_sequence_losses, strength=0.0)
    with pytest.raises(AssertionError, match="gradients differ"):
        assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


def test_gs2_differs_from_exact_when_sequences_overlap(gen):
    """Negative control for the projection choice: non-orthogonal sequence gradients."""
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    expected_exact = reference_accumulate(model, mbs, toy_sequence_losses, clamp=None)
    run_accumulator(model, mbs, toy_sequence_losses, projection="gs2", clamp=None)
    with pytest.raises(AssertionError):
        assert_grads_close(model, expected_exact, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("strength", [0.0, 0.3])
def test_strength(strength, gen):
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    expected = reference_accumulate(model, mbs, toy_sequence_losses, strength=strength)
    run_accumulator(model, mbs, toy_sequence_losses, strength=strength)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


def test_strength_zero_is_bitwise_plain_accumulation(gen):
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    model.zero_grad(set_to_none=True)
    for mb in mbs:
        toy_sequence_losses(model, mb).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    run_accumulator(model, mbs, toy_sequence_losses, strength=0.0)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n]), n


def test_excluded_parameters_accumulate_plainly(gen):
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    acc_names = ["proj.*", "ln.bias"]
    expected_names = [
        n for n, _ in model.named_parameters() if not (n.startswith("proj.") or n == "ln.bias")
    ]
    expected = reference_accumulate(
        model, mbs, toy_sequence_losses, projected=expected_names, clamp=None
    )
    with pytest.warns(UserWarning, match="accumulated plainly"):
        acc = run_accumulator(model, mbs, toy_sequence_losses, exclude=acc_names, clamp=None)
    assert set(acc.unprojected_parameters()) == {"proj.weight", "proj.bias", "ln.bias"}
    assert "excluded" in acc.unprojected_parameters()["ln.bias"]
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


def test_chunked_matches_unchunked(gen):
    """A tiny byte budget forces every tensor through the multi-chunk path."""
    torch.manual_seed(0)
    model = ToyLM(tied=True)
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    acc = run_accumulator(model, mbs, toy_sequence_losses, chunk_bytes=64)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
    assert acc.stats()["peak_seq_grad_bytes"] <= 2 * 64 + 5 * 6 * 4  # one row at most over


def test_one_microbatch_equals_plain_gradient(gen):
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 1, rows=4, length=5, vocab=23)
    model.zero_grad(set_to_none=True)
    toy_sequence_losses(model, mbs[0]).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    run_accumulator(model, mbs, toy_sequence_losses)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n]), n


def test_embedding_padding_idx(gen):
    torch.manual_seed(0)
    model = ToyLM()
    model.embed.padding_idx = 0
    with torch.no_grad():
        model.embed.weight[0].zero_()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    for mb in mbs:
        mb["input_ids"][:, 0] = 0
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    run_accumulator(model, mbs, toy_sequence_losses)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
    assert float(model.embed.weight.grad[0].abs().max()) == 0.0


def test_duplicate_and_zero_gradient_sequences(gen):
    """Rank-deficient spans: a repeated sequence and one whose every target is masked."""
    torch.manual_seed(0)
    model = ToyLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23, pad=False)
    for mb in mbs[1:]:
        mb["input_ids"][1] = mb["input_ids"][0]
        mb["targets"][1] = mb["targets"][0]
        mb["targets"][2] = -100
    for projection in ("exact", "gs2"):
        expected = reference_accumulate(model, mbs, toy_sequence_losses, projection=projection)
        acc = run_accumulator(model, mbs, toy_sequence_losses, projection=projection)
        assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
        assert acc.stats()["microbatch"]["linear"]["rank"] == 2.0


def test_embedding_microbatch_of_padding_idx_only(gen):
    """No embedding row can get gradient: the embedding's sequence gradients have no rows."""
    torch.manual_seed(0)
    model = ToyLM()
    model.embed.padding_idx = 0
    with torch.no_grad():
        model.embed.weight[0].zero_()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    mbs[1]["input_ids"][:] = 0
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    run_accumulator(model, mbs, toy_sequence_losses)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)


class SharedLinearLM(torch.nn.Module):
    """One Linear applied twice per forward (weight sharing across depth) and a tied head: the
    shared weight has two fused uses, the tied one a fused use and an embedding use."""

    def __init__(self, vocab: int = 23, d: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.proj = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(input_ids)))
        return self.head(torch.tanh(self.proj(h)))


@pytest.mark.parametrize("projection", ["exact", "gs2"])
def test_weight_used_twice_matches_reference(projection, gen):
    torch.manual_seed(0)
    model = SharedLinearLM()
    mbs = row_microbatches(gen, 3, rows=4, length=5, vocab=23)
    expected = reference_accumulate(
        model, mbs, toy_sequence_losses, projection=projection, clamp=0.5
    )
    acc = run_accumulator(model, mbs, toy_sequence_losses, projection=projection, clamp=0.5)
    assert sorted(acc.projected_parameters()) == sorted(expected)
    assert_grads_close(model, expected, rtol=2e-5, atol=1e-7)
