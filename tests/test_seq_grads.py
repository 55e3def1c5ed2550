"""``TensorSequenceGradients`` on explicit per-sequence gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from proma_accum import _seq_grads
from proma_accum._capture import Capture, Layer
from proma_accum._consistency import Consistency, Tolerance
from proma_accum._kernels import LayerUse
from proma_accum._kernels.embedding import EmbeddingKernel
from proma_accum._kernels.linear import LinearKernel
from proma_accum._layout import SequenceLayout
from proma_accum._proma import accumulate_proma
from proma_accum._seq_grads import TensorSequenceGradients
from proma_accum._workspace import Workspace
from proma_accum.testing import accumulate_proma_reference


def _tensor_seq_grads(param, capture, role, k, grad, chunk_bytes=2**30, check_rtol=1e-3):
    check = None if check_rtol is None else Consistency("w", ["Layer"], Tolerance(check_rtol, 0))
    return TensorSequenceGradients(
        "w",
        param,
        [(capture, role)],
        k,
        grad,
        chunk_bytes=chunk_bytes,
        workspace=capture.workspace,
        check=check,
    )


def _linear_seq_grads(s, grad, chunk_bytes=2**30, check_rtol=1e-3):
    """A Linear weight whose ``(k + 1, rows, cols)`` sequence gradients are ``s``."""
    param = nn.Parameter(torch.zeros(s.shape[1:]))
    module = nn.Linear(1, 1)
    layer = Layer("lin", LinearKernel(), {"weight": module.weight}, fusable=True)
    capture = Capture(layer, module, None, None, None, Workspace(), formed={"weight": s})
    k = s.shape[0] - 1
    return _tensor_seq_grads(param, capture, "weight", k, grad, chunk_bytes, check_rtol)


@pytest.mark.parametrize("chunk_bytes", [2**30, 200])
@pytest.mark.parametrize("nearly_dependent", [False, True])
def test_plus_combination_is_acc_plus_grad_plus_the_combination(chunk_bytes, nearly_dependent):
    g = torch.Generator().manual_seed(0)
    k = 4
    s = torch.randn(k + 1, 7, 3, generator=g)
    weights = torch.randn(k, generator=g, dtype=torch.float64)
    if nearly_dependent:  # large coefficients of mixed sign: the float64 path
        s[1] = s[0] + 1e-4 * s[1]
        weights[:2] = torch.tensor([3e4, -3e4], dtype=torch.float64)
    grad = s.sum(0)
    acc = torch.randn(7, 3, generator=g)
    expected = acc.double() + grad.double() + torch.einsum("i,i...->...", weights, s[:k].double())
    seq = _linear_seq_grads(s.clone(), grad, chunk_bytes)
    seq.gram_and_inner(acc)
    got = seq.plus_combination(acc, grad, weights)
    scale = acc.double().norm() + grad.double().norm() + expected.norm()
    assert got.dtype == torch.float32
    assert (got.double() - expected).norm() <= 1e-6 * scale
    # without the microbatch gradient (advantages mode), and acc left intact
    acc_before = acc.clone()
    seq = _linear_seq_grads(s.clone(), grad, chunk_bytes)
    seq.gram_and_inner(acc)
    got = seq.plus_combination(acc, None, weights)
    assert torch.equal(acc, acc_before)
    assert (got.double() - (expected - grad.double())).norm() <= 1e-6 * scale


def test_plus_combination_on_touched_rows_of_an_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3)
    ids = torch.tensor([[1, 4, 4], [7, 1, 2]])
    out = emb(ids)
    grad_out = torch.randn_like(out)
    layout = SequenceLayout.from_seq_ids(torch.tensor([5, 2]), None)
    seg = layout.token_segments(ids.shape, "emb")
    (grad,) = torch.autograd.grad(out, emb.weight, grad_out)
    layer = Layer("emb", EmbeddingKernel(), {"weight": emb.weight})
    capture = Capture(layer, emb, seg, ids, None, Workspace(), grad_out=grad_out)
    seq = _tensor_seq_grads(emb.weight, capture, "weight", 2, grad)
    acc = torch.randn(10, 3)
    seq.gram_and_inner(acc)
    weights = torch.tensor([0.5, -2.0], dtype=torch.float64)
    got = seq.plus_combination(acc, grad, weights)
    per_seq = torch.zeros(2, 10, 3)
    for i in range(2):
        per_seq[i].index_add_(0, ids[i], grad_out[i])
    expected = acc + grad + 0.5 * per_seq[0] - 2.0 * per_seq[1]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("host_decisions", [False, True])
@pytest.mark.parametrize("projection", ["exact", "gs2"])
@pytest.mark.parametrize("case", ["independent", "zero", "nearly_dependent"])
def test_no_eigendecomposition_and_reference_result(projection, case, host_decisions, monkeypatch):
    """The device policy never calls an eigensolver (it synchronises on CUDA); the CPU policy
    calls one ``eigvalsh`` per update, to decide whether float32 products are enough."""
    monkeypatch.setattr(_seq_grads, "HOST_DECISIONS_ON_CPU", host_decisions)
    g = torch.Generator().manual_seed(1)
    k = 5
    s = torch.randn(k + 1, 6, 7, generator=g)
    if case == "zero":
        s[2] = 0.0
    elif case == "nearly_dependent":  # the float64 pass: its Gram is decomposed afresh
        s[1] = s[0] + 1e-3 * s[1]
    grad = s.sum(0)
    acc = 3.0 * torch.randn(6, 7, generator=g)
    calls = []
    for name in ("eigh", "eigvalsh"):
        original = getattr(torch.linalg, name)
        monkeypatch.setattr(
            torch.linalg, name, lambda m, _f=original, _n=name: calls.append(_n) or _f(m)
        )
    new, info = accumulate_proma(
        acc, grad, _linear_seq_grads(s, grad), projection=projection, clamp=None, strength=1.0
    )
    assert calls == (["eigvalsh"] if host_decisions else [])
    expected = accumulate_proma_reference(acc, grad, s[:k], projection=projection, clamp=None)
    torch.testing.assert_close(new.double(), expected, rtol=1e-5, atol=1e-5)
    assert int(info.rank) == (k - 1 if case == "zero" else k)


@pytest.mark.parametrize("padding_idx", [None, 4])
def test_embedding_grad_sum_is_the_sum_of_its_sequence_gradients(padding_idx):
    """The check of a tied embedding's gradient uses ``grad_sum``: padding tokens (sequence id
    -1) count, ``padding_idx`` tokens and rows outside ``rows`` do not."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, padding_idx=padding_idx)
    ids = torch.tensor([[1, 4, 4, 9], [7, 1, 2, 4]])
    grad_out = torch.randn(2, 4, 3)
    seq_ids = torch.tensor([[5, 5, 5, -1], [2, 2, -1, -1]])  # padding tokens hold ids 9, 2, 4
    seg = SequenceLayout.from_seq_ids(seq_ids, None).token_segments(ids.shape, "emb")
    kernel = EmbeddingKernel()
    rows = torch.tensor([1, 2, 4, 9])  # 7 left out
    use = LayerUse(emb, "weight", ids, grad_out, seg, Workspace())
    got = kernel.grad_sum(use, rows, torch.float32)
    want = kernel.seq_grads(use, rows, torch.float32).sum(0)
    torch.testing.assert_close(got, want)
    out = emb(ids)
    (full,) = torch.autograd.grad(out, emb.weight, grad_out)
    torch.testing.assert_close(got, full[rows])
