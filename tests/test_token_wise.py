"""Norm-like layers covered by structure (``_kernels/token_wise``), ``nn.Embedding`` subclasses
judged by their forward (``_kernels/embedding``), and tensors tied to a module without a kernel
(``_coverage``): each against the brute-force reference, with negative controls."""

from __future__ import annotations

import pytest
import torch
from conftest import ids_in_order, packed_microbatches, row_microbatches, toy_sequence_losses
from torch import nn

from proma_accum import (
    IncompleteSequenceDataError,
    ProjectedAccumulator,
    _coverage,
    _kernels,
)
from proma_accum._kernels import token_wise
from proma_accum.testing import assert_grads_close, reference_accumulate

VOCAB, D = 23, 6


class OffsetRMSNorm(nn.Module):
    """Gemma-style ``x̂ ⊙ (1 + w) + β`` in float32: a class no registry names."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (xf * (1.0 + self.weight.float()) + self.shift).type_as(x)


class SequenceNorm(nn.Module):
    """``w ⊙ (x − mean over the row's tokens)``: 1-D weight, single input, but mixes tokens."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x - x.mean(dim=-2, keepdim=True))


class GatedNorm(nn.Module):
    """A norm with a second input (Mamba-style gate): not token-wise by structure."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, gate=None):
        return self.weight * x * (1 if gate is None else torch.sigmoid(gate))


class NormLM(nn.Module):
    def __init__(self, norm: nn.Module, embed: nn.Embedding | None = None, tied: bool = False):
        super().__init__()
        self.embed = embed if embed is not None else nn.Embedding(VOCAB, D)
        self.proj = nn.Linear(D, D)
        self.norm = norm
        self.head = nn.Linear(D, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, input_ids):
        return self.head(self.norm(torch.tanh(self.proj(self.embed(input_ids)))))


def _run(model, mbs, advantages=None):
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model) as acc:
        for m, mb in enumerate(mbs):
            adv = None if advantages is None else advantages[m]
            with acc.microbatch(mb["seq_ids"], advantages=adv):
                toy_sequence_losses(model, mb).sum().backward()
    return acc


def _mbs(seed=0, n=3):
    return row_microbatches(torch.Generator().manual_seed(seed), n, rows=4, length=5, vocab=VOCAB)


def test_a_norm_nobody_named_is_projected_exactly():
    torch.manual_seed(0)
    model = NormLM(OffsetRMSNorm(D))
    mbs = _mbs()
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    acc = _run(model, mbs)
    assert acc.unprojected_parameters() == {}
    assert isinstance(_kernels.kernel_for(model.norm), token_wise.TokenWiseKernel)
    assert acc.stats()["step"]["token_wise"]["updates"] > 0
    assert_grads_close(model, expected)


def test_without_the_structural_kernel_the_norm_is_plain_and_differs(monkeypatch):
    """Negative control: the same model with structural qualification switched off."""
    monkeypatch.setattr(_kernels, "is_candidate", lambda module: False)
    torch.manual_seed(0)
    model = NormLM(OffsetRMSNorm(D))
    mbs = _mbs()
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    with pytest.warns(UserWarning, match="norm.weight"):
        acc = _run(model, mbs)
    assert set(acc.unprojected_parameters()) == {"norm.weight", "norm.shift"}
    with pytest.raises(AssertionError, match="norm.weight"):
        assert_grads_close(model, expected)


def test_packed_rows_and_token_chunks(monkeypatch):
    """Per-token seq_ids with padding, and per-token gradients formed a few tokens at a time."""
    monkeypatch.setattr(token_wise, "_TOKEN_CHUNK_BYTES", 3 * D * 4)
    torch.manual_seed(0)
    model = NormLM(OffsetRMSNorm(D))
    mbs = packed_microbatches(torch.Generator().manual_seed(2), 3, 2, 2, 4, VOCAB)
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    _run(model, mbs)
    assert_grads_close(model, expected)


def test_a_module_that_mixes_tokens_fails_the_sum_check():
    torch.manual_seed(0)
    model = NormLM(SequenceNorm(D))
    mbs = _mbs()
    model.zero_grad(set_to_none=True)
    acc = ProjectedAccumulator(model)
    assert acc.unprojected_parameters() == {}  # qualifies by structure ...
    with acc, pytest.raises(IncompleteSequenceDataError, match="norm.weight"):
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
    # ... but its per-token gradients do not add up: the failed microbatch left p.grad as it was
    first = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    toy_sequence_losses(model, mbs[0]).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(first[n], p.grad, msg=n)


@pytest.mark.parametrize(
    ("norm", "reason"),
    [
        (GatedNorm(D), "forward takes several inputs"),
        (nn.PReLU(D), "torch.nn.PReLU is not applied token by token"),
    ],
)
def test_modules_that_do_not_qualify_say_why(norm, reason):
    model = NormLM(norm)
    acc = ProjectedAccumulator(model)
    unprojected = acc.unprojected_parameters()
    assert reason in unprojected["norm.weight"] and "layer 'norm'" in unprojected["norm.weight"]


class Gain(nn.Module):
    """A learned scalar gain and offset: token-wise, parameters of length 1."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1.3]))
        self.offset = nn.Parameter(torch.tensor([0.2]))

    def forward(self, x):
        return torch.tanh(x * self.gain + self.offset)


def test_parameters_shorter_than_the_features():
    torch.manual_seed(0)
    model = NormLM(Gain())
    mbs = _mbs()
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    acc = _run(model, mbs)
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected)


def test_an_integer_input_is_refused_at_the_forward():
    class Bias(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(VOCAB))

        def forward(self, ids):
            return self.weight[ids]

    class BiasedLM(NormLM):
        def __init__(self):
            super().__init__(OffsetRMSNorm(D))
            self.bias = Bias()

        def forward(self, input_ids):
            return super().forward(input_ids) + self.bias(input_ids)[..., None]

    torch.manual_seed(0)
    with pytest.raises(TypeError, match="Bias .covered as a token-wise layer. was called with a"):
        _run(BiasedLM(), _mbs())


# ------------------------------------------------------------------ nn.Embedding subclasses
class ScaledEmbedding(nn.Embedding):
    """transformers' Gemma*TextScaledWordEmbedding, line for line."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, embed_scale=1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scalar_embed_scale = embed_scale
        self.embed_scale = nn.Buffer(torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids: torch.Tensor):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class ShiftedEmbedding(ScaledEmbedding):
    def forward(self, input_ids: torch.Tensor):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype) + 1.0


class FloatScaledEmbedding(nn.Embedding):
    """transformers' BART-style scaled embedding: a float ``embed_scale`` attribute."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, embed_scale=1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor):
        return super().forward(input_ids) * self.embed_scale


class PlainSubclass(nn.Embedding):
    """Does not override forward: nn.Embedding's math."""


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["loss", "advantages"])
def test_scaled_embedding_matches_reference(tied, mode):
    torch.manual_seed(0)
    model = NormLM(OffsetRMSNorm(D), ScaledEmbedding(VOCAB, D, 0, embed_scale=D**0.5), tied)
    mbs = _mbs()
    by_id = adv = None
    if mode == "advantages":  # indexed by sequence id; the reference's aligned with first use
        gen = torch.Generator().manual_seed(5)
        by_id = [torch.randn(int(mb["seq_ids"].max()) + 1, generator=gen) for mb in mbs]
        adv = [t[ids_in_order(mb["seq_ids"])] for t, mb in zip(by_id, mbs, strict=True)]
    expected = reference_accumulate(model, mbs, toy_sequence_losses, advantages=adv)
    acc = _run(model, mbs, by_id)
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected)


def test_float_scaled_embedding_matches_reference():
    """A float ``embed_scale`` (BART's form) is applied as a number on the host: no tensor is
    made for it on the device."""
    torch.manual_seed(0)
    model = NormLM(OffsetRMSNorm(D), FloatScaledEmbedding(VOCAB, D, 0, embed_scale=D**0.5))
    mbs = _mbs()
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    acc = _run(model, mbs, None)
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected)


def test_embedding_subclasses_by_forward():
    torch.manual_seed(0)
    assert isinstance(
        _kernels.kernel_for(PlainSubclass(VOCAB, D)), _kernels.embedding.EmbeddingKernel
    )
    acc = ProjectedAccumulator(NormLM(OffsetRMSNorm(D), PlainSubclass(VOCAB, D)))
    assert acc.unprojected_parameters() == {}
    acc = ProjectedAccumulator(NormLM(OffsetRMSNorm(D), ShiftedEmbedding(VOCAB, D, 0, 2.0)))
    reason = acc.unprojected_parameters()["embed.weight"]
    assert "ShiftedEmbedding subclasses nn.Embedding with a forward that is neither" in reason


class Lookup(nn.Module):
    """An embedding table that is no ``nn.Embedding``: no kernel covers it."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, d))

    def forward(self, ids):
        return self.weight[ids]


def test_a_tensor_tied_to_a_module_without_kernel_is_plain_not_wrong(monkeypatch):
    """Gemma before its embedding had a kernel: the LM head (covered) shares its weight with an
    embedding nothing covers. Projecting it would use the head's per-sequence gradients only."""
    torch.manual_seed(0)
    model = NormLM(OffsetRMSNorm(D), Lookup(VOCAB, D), tied=True)
    mbs = _mbs()
    acc = ProjectedAccumulator(model)
    assert acc.unprojected_parameters() == {
        "embed.weight": "also a parameter of 'embed' (Lookup), which has no sequence kernel"
    }
    expected = reference_accumulate(
        model, mbs, toy_sequence_losses, projected=acc.projected_parameters()
    )
    with pytest.warns(UserWarning, match="embed.weight"):
        _run(model, mbs)
    assert_grads_close(model, expected)
    # negative control: without the rule the tensor is projected and the sum check fails
    monkeypatch.setattr(_coverage, "uncovered_owners", lambda *args: {})
    assert ProjectedAccumulator(model).unprojected_parameters() == {}
    with pytest.raises(IncompleteSequenceDataError, match="embed.weight"):
        _run(model, mbs)
