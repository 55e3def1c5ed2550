"""The public kernel registry: a user-defined layer kind, registered with
``proma_accum.kernels.register``, is projected and matches the brute-force reference."""

from __future__ import annotations

import pytest
import torch
from conftest import row_microbatches, toy_sequence_losses
from torch import nn

from proma_accum import IncompleteSequenceDataError, ProjectedAccumulator, kernels
from proma_accum._kernels import _BY_TYPE
from proma_accum.testing import assert_grads_close, reference_accumulate


class Scale(nn.Module):
    """``y_t = w ⊙ x_t``: a layer kind proma_accum does not know. Its weight is ``(1, d)``, not
    1-D, so the structural token-wise kernel does not take it either (``test_token_wise``)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class ScaledLM(nn.Module):
    def __init__(self, vocab: int = 23, d: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.scale = Scale(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.scale(self.embed(input_ids))))


class ScaleKernel(kernels.Kernel):
    kind = "scale"

    def seq_grads(self, use, rows, dtype):
        b = kernels.tokens(use.grad_out, 1, dtype)
        x = kernels.tokens(use.x, 1, dtype)
        return kernels.segment_sum(b * x, use.seg).unsqueeze(1)[:, rows]


class WrongScaleKernel(ScaleKernel):
    def seq_grads(self, use, rows, dtype):
        return 2 * super().seq_grads(use, rows, dtype)


@pytest.fixture
def registry():
    """Registrations made by a test are undone after it."""
    saved = dict(_BY_TYPE)
    yield
    _BY_TYPE.clear()
    _BY_TYPE.update(saved)


def _run(model, mbs):
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model) as acc:
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                toy_sequence_losses(model, mb).sum().backward()
    return acc


def test_a_registered_kernel_covers_a_user_layer(registry):
    torch.manual_seed(0)
    model = ScaledLM()
    mbs = row_microbatches(torch.Generator().manual_seed(0), 3, rows=4, length=5, vocab=23)
    expected = reference_accumulate(model, mbs, toy_sequence_losses)
    # negative control: unregistered, the layer is plain and its gradient is not PROMA's
    with pytest.warns(UserWarning, match="scale.weight"):
        acc = _run(model, mbs)
    assert "scale.weight" in acc.unprojected_parameters()
    with pytest.raises(AssertionError, match="scale.weight"):
        assert_grads_close(model, expected)

    assert kernels.register(Scale)(ScaleKernel) is ScaleKernel
    assert isinstance(kernels.kernel_for(model.scale), ScaleKernel)
    acc = _run(model, mbs)
    assert acc.unprojected_parameters() == {}
    assert acc.stats()["step"]["scale"]["updates"] > 0
    assert_grads_close(model, expected)


def test_a_wrong_kernel_is_caught_by_the_consistency_check(registry):
    torch.manual_seed(0)
    model = ScaledLM()
    mbs = row_microbatches(torch.Generator().manual_seed(0), 2, rows=4, length=5, vocab=23)
    kernels.register(Scale)(WrongScaleKernel)
    with pytest.raises(IncompleteSequenceDataError, match="scale.weight"):
        _run(model, mbs)
