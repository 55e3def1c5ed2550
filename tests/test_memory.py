"""Memory behaviour, pinned structurally by the library's own count of live per-sequence bytes.

Per-sequence gradients of a layer are formed during the backward and freed when its tensor is
updated; huge tensors go chunk by chunk under ``chunk_bytes``. Target: the extra memory stays
below ``1.5 × k × (largest covered tensor, float32)``, never ``k × model size``.
"""

from __future__ import annotations

import torch
from conftest import hf_sequence_losses, row_microbatches, run_accumulator, tiny_qwen3


def _peak(model, k, vocab=1024, **kwargs):
    mbs = row_microbatches(torch.Generator().manual_seed(0), 3, rows=k, length=8, vocab=vocab)
    acc = run_accumulator(model, mbs, hf_sequence_losses, **kwargs)
    return acc.stats()["peak_seq_grad_bytes"]


def _sizes(model):
    largest = max(p.numel() for p in model.parameters()) * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    return largest, total


def test_peak_below_target_and_far_below_k_times_model():
    k = 4
    # the tied embedding/lm_head is the largest tensor, but far from the whole model
    model = tiny_qwen3(tied=True, layers=6, vocab=256)
    largest, total = _sizes(model)
    assert largest < total / 4
    peak = _peak(model, k, vocab=256)
    assert 0 < peak <= 1.5 * k * largest
    assert peak < 0.5 * k * total  # per-sequence data is freed layer by layer


def test_chunk_budget_bounds_the_peak():
    k = 4
    model = tiny_qwen3(tied=True, layers=3, vocab=1024)
    largest, _ = _sizes(model)
    budget = 64 * 1024  # far below (k + 1) × the embedding
    peak = _peak(model, k, chunk_bytes=budget)
    assert peak <= 2 * budget  # a chunk of one tensor, plus a fused small layer's
    # negative control: without the budget the tied embedding is formed whole
    assert _peak(model, k) > 4 * budget
    assert largest * (k + 1) > 4 * budget


def test_fused_path_replaces_the_weight_gradient_and_first_microbatch_is_free(monkeypatch):
    """Structural: GEMM layers form per-sequence gradients in the fused backward (no second
    weight-gradient GEMM), and the first microbatch of a step forms none at all."""
    from proma_accum import ProjectedAccumulator
    from proma_accum._fused import SequenceGradientGEMM

    calls = []
    backward = SequenceGradientGEMM.backward

    def counting(ctx, grad_out):
        calls.append(ctx.capture.module)
        return backward(ctx, grad_out)

    monkeypatch.setattr(SequenceGradientGEMM, "backward", staticmethod(counting))
    model = tiny_qwen3(tied=False, layers=2, vocab=256)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    mbs = row_microbatches(torch.Generator().manual_seed(0), 2, rows=3, length=6, vocab=256)
    with ProjectedAccumulator(model) as acc:
        with acc.microbatch(mbs[0]["seq_ids"]):
            hf_sequence_losses(model, mbs[0]).sum().backward()
        assert calls == []  # nothing accumulated yet: plain accumulation, no sequence data
        with acc.microbatch(mbs[1]["seq_ids"]):
            hf_sequence_losses(model, mbs[1]).sum().backward()
    assert sorted(map(id, calls)) == sorted(map(id, linears))
    # negative control: a budget below one layer's sequence gradients disables the fused path
    calls.clear()
    run_accumulator(model, mbs, hf_sequence_losses, chunk_bytes=1024)
    assert calls == []
