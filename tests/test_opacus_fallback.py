"""Layer kinds without a native kernel get per-sequence gradients from Opacus's grad samplers
(one sequence per row), checked against the brute-force reference; with per-token seq_ids
they are accumulated plainly, and say so."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyLM, packed_microbatches, toy_sequence_losses
from torch import nn

from proma_accum import ProjectedAccumulator
from proma_accum._kernels import opacus_fallback
from proma_accum.testing import assert_grads_close, reference_accumulate


class TinyCNNPolicy(nn.Module):
    """Images (B, 2, 6, 6) → conv → group norm → conv1d over rows → instance norm → logits."""

    def __init__(self, actions: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 3, 2, stride=2)
        self.inorm = nn.InstanceNorm1d(3, affine=True)
        self.head = nn.Linear(3 * 12, actions)
        with torch.no_grad():  # non-trivial affine parameters
            for norm in (self.gn, self.inorm):
                norm.weight.add_(0.3 * torch.randn_like(norm.weight))
                norm.bias.add_(0.1 * torch.randn_like(norm.bias))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.gn(self.conv(images)))  # (B, 4, 6, 6)
        # (B, 3, 18): stride 2 over 36 positions. The tanh keeps the conv1d bias's gradient
        # nonzero (instance norm right after would cancel it exactly).
        h = torch.tanh(self.conv1d(h.flatten(2)))
        h = torch.tanh(self.inorm(h))[..., :12]
        return self.head(h.flatten(1))


def _episodes(gen: torch.Generator, n_mb: int, rows: int) -> list[dict]:
    out = []
    for _ in range(n_mb):
        out.append(
            {
                "images": torch.randn(rows, 2, 6, 6, generator=gen),
                "actions": torch.randint(0, 5, (rows,), generator=gen),
                "seq_ids": torch.randperm(rows, generator=gen) * 2 + 1,
            }
        )
    return out


def _losses(model: nn.Module, mb: dict) -> torch.Tensor:
    """(k,) each row's -log π(action); each row is one sequence."""
    logp = torch.log_softmax(model(mb["images"]), -1)
    return -logp.gather(1, mb["actions"][:, None])[:, 0]  # distinct ids: row order is id order


@pytest.mark.parametrize("projection", ["exact", "gs2"])
@pytest.mark.parametrize("advantages", [False, True])
def test_cnn_policy_matches_the_reference(projection, advantages):
    torch.manual_seed(0)
    model = TinyCNNPolicy()
    gen = torch.Generator().manual_seed(1)
    mbs = _episodes(gen, 3, rows=4)
    advs = [torch.randn(9, generator=gen) for _ in mbs] if advantages else None
    ref_advs = [a[mb["seq_ids"]] for a, mb in zip(advs, mbs, strict=True)] if advs else None
    expected = reference_accumulate(model, mbs, _losses, projection=projection, advantages=ref_advs)
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model, projection=projection) as acc:
        assert acc.unprojected_parameters() == {}
        for m, mb in enumerate(mbs):
            with acc.microbatch(mb["seq_ids"], advantages=None if advs is None else advs[m]):
                _losses(model, mb).sum().backward()
        groups = acc.stats()["step"]
    assert groups["opacus"]["updates"] > 0
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-6)


def test_without_the_fallback_convolutions_are_plain_and_differ(monkeypatch):
    """Negative control: with the fallback off, the conv and norm tensors are unprojected and
    their gradients are not the reference's."""
    monkeypatch.setattr(opacus_fallback, "SOUND_KINDS", ())
    monkeypatch.setattr(opacus_fallback, "_CACHE", {})
    torch.manual_seed(0)
    model = TinyCNNPolicy()
    mbs = _episodes(torch.Generator().manual_seed(1), 3, rows=4)
    expected = reference_accumulate(model, mbs, _losses)
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="accumulated plainly"):
        acc = ProjectedAccumulator(model).attach()
    assert set(acc.unprojected_parameters()) == {
        "conv.weight", "conv.bias", "gn.weight", "gn.bias",
        "conv1d.weight", "conv1d.bias", "inorm.weight", "inorm.bias",
    }  # fmt: skip
    for mb in mbs:
        with acc.microbatch(mb["seq_ids"]):
            _losses(model, mb).sum().backward()
    acc.detach()
    with pytest.raises(AssertionError, match="conv.weight"):
        assert_grads_close(model, expected, rtol=1e-4, atol=1e-6)


class ConvLM(ToyLM):
    """ToyLM with a Conv1d over each row's tokens (kernel 1: token-wise) before the head."""

    def __init__(self) -> None:
        super().__init__(conv1d=False)
        self.tconv = nn.Conv1d(6, 6, 1)
        del self.ln, self.rms  # unused here

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(input_ids)))
        h = h + torch.tanh(self.tconv(h.transpose(1, 2)).transpose(1, 2))
        return self.head(h)


def test_packed_rows_leave_rows_only_tensors_plain_and_say_so():
    torch.manual_seed(0)
    model = ConvLM()
    mbs = packed_microbatches(torch.Generator().manual_seed(2), 3, rows=2, per_row=2, seg_len=4,
                              vocab=23)  # fmt: skip
    conv = {"tconv.weight", "tconv.bias"}
    projected = [n for n, _ in model.named_parameters() if n not in conv]
    expected = reference_accumulate(model, mbs, toy_sequence_losses, projected=projected)
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model) as acc:
        assert acc.unprojected_parameters() == {}
        for m, mb in enumerate(mbs):
            if m == 0:
                with pytest.warns(UserWarning, match="tconv.weight"):
                    with acc.microbatch(mb["seq_ids"]):
                        toy_sequence_losses(model, mb).sum().backward()
            else:
                with acc.microbatch(mb["seq_ids"]):
                    toy_sequence_losses(model, mb).sum().backward()
        assert set(acc.unprojected_parameters()) == conv
        assert "one sequence per row" in acc.unprojected_parameters()["tconv.weight"]
        with pytest.raises(ValueError, match="advantages mode cannot accumulate them plainly"):
            with acc.microbatch(mbs[0]["seq_ids"], advantages=torch.ones(100)):
                pass
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-6)
