"""Sparse MoE blocks (``_kernels/moe``): fused experts and routers against the brute-force
reference, sparse by expert and chunked under the byte budget, with negative controls."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_sequence_losses, ids_in_order, packed_microbatches, run_accumulator
from test_families import MOE, VOCAB, tiny

from proma_accum import ProjectedAccumulator
from proma_accum._kernels import _BY_NAME, moe
from proma_accum.testing import assert_grads_close, reference_accumulate

QWEN3_MOE = "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock"


def _many_experts():
    """16 experts, top-2 without renormalisation: few tokens reach only some experts."""
    return tiny("Qwen3Moe", num_experts=16, norm_topk_prob=False, **MOE)


def _packed(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mbs = packed_microbatches(gen, 3, rows=2, per_row=2, seg_len=3, vocab=VOCAB)
    by_id = [torch.randn(int(mb["seq_ids"].max()) + 1, generator=gen) for mb in mbs]
    aligned = [t[ids_in_order(mb["seq_ids"])] for t, mb in zip(by_id, mbs, strict=True)]
    return mbs, by_id, aligned


@pytest.mark.parametrize("mode", ["loss", "advantages"])
def test_sparse_by_expert_and_chunked(mode, monkeypatch):
    """Packed rows with padding; one expert per chunk; only routed experts are formed."""
    formed: dict[tuple[int, str], list[torch.Tensor]] = {}  # (call, role) -> chunks of experts
    seq_grads = moe.SparseMoeKernel.seq_grads

    def spy(self, use, rows, dtype):
        if use.role != moe.ROUTER:
            formed.setdefault((id(use.x), use.role), []).append(rows.clone())
        return seq_grads(self, use, rows, dtype)

    monkeypatch.setattr(moe.SparseMoeKernel, "seq_grads", spy)
    model = _many_experts()
    mbs, by_id, aligned = _packed()
    adv = aligned if mode == "advantages" else None
    expected = reference_accumulate(model, mbs, hf_sequence_losses, advantages=adv)
    expert = model.model.layers[0].mlp.experts.gate_up_proj[0]
    chunk_bytes = 5 * expert.numel() * 4  # k + 1 = 5 sequences: one expert's slice per chunk
    acc = run_accumulator(
        model,
        mbs,
        hf_sequence_losses,
        advantages=by_id if mode == "advantages" else None,
        chunk_bytes=chunk_bytes,
    )
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-7)
    assert acc.stats()["step"]["moe"]["updates"] > 0
    gate_up = [r for (_, role), chunks in formed.items() if role == moe.GATE_UP for r in chunks]
    assert gate_up and max(r.numel() for r in gate_up) == 1  # one expert's slice per chunk
    experts_formed = [torch.unique(torch.cat(chunks)).numel() for chunks in formed.values()]
    assert min(experts_formed) < 16  # only the experts some token was routed to
    assert acc.stats()["peak_seq_grad_bytes"] <= chunk_bytes


def test_without_the_kernel_experts_and_router_are_plain_and_differ(monkeypatch):
    monkeypatch.delitem(_BY_NAME, QWEN3_MOE)
    model = tiny("Qwen3Moe", num_experts=4, **MOE)
    mbs, _, _ = _packed()
    expected = reference_accumulate(model, mbs, hf_sequence_losses)
    with pytest.warns(UserWarning, match="accumulated plainly"):
        acc = run_accumulator(model, mbs, hf_sequence_losses)
    unprojected = acc.unprojected_parameters()
    assert {n.rsplit("mlp.", 1)[1] for n in unprojected} == {
        "experts.gate_up_proj",
        "experts.down_proj",
        "gate.weight",
    }
    with pytest.raises(AssertionError, match="experts.gate_up_proj"):
        assert_grads_close(model, expected, rtol=1e-4, atol=1e-7)


def test_router_jitter_is_refused_with_its_reason():
    model = tiny("Mixtral", num_local_experts=4, router_jitter_noise=0.1, **MOE)
    unprojected = ProjectedAccumulator(model).unprojected_parameters()
    reason = unprojected["model.layers.0.mlp.experts.down_proj"]
    assert reason.startswith("MixtralSparseMoeBlock: router jitter noise")
    assert set(unprojected) == {
        f"model.layers.{i}.mlp.{r}"
        for i in range(2)
        for r in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
    }


def test_qwen2_moe_shared_expert_with_a_bias_is_refused_with_its_reason():
    model = tiny("Qwen2Moe", num_experts=4, shared_expert_intermediate_size=16, **MOE)
    block = model.model.layers[0].mlp
    block.shared_expert.down_proj = torch.nn.Linear(16, block.shared_expert.down_proj.out_features)
    unprojected = ProjectedAccumulator(model).unprojected_parameters()
    reason = unprojected["model.layers.0.mlp.shared_expert.down_proj.weight"]
    assert reason.startswith("Qwen2MoeSparseMoeBlock: the shared expert is not three bias-free")
    assert "model.layers.0.mlp.experts.gate_up_proj" in unprojected  # the whole block is plain
    assert not any(n.startswith("model.layers.1.") for n in unprojected)  # the other is covered


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_wrong_shared_expert_gradient_is_caught(dtype, monkeypatch):
    """Negative control for the shared expert and for the check's bf16 allowance (autograd's
    per-token intermediates rounded to bf16, ``contribution_norm_sum``): a shared-expert
    gradient 10% off fails the microbatch in float32 and in bf16."""
    from proma_accum import IncompleteSequenceDataError

    model = tiny("Qwen2Moe", num_experts=4, shared_expert_intermediate_size=16, **MOE).to(dtype)
    mbs, _, _ = _packed()
    factors = moe._shared_factors

    def off(use, x, b, dtype):
        left, right = factors(use, x, b, dtype)
        return (1.1 * left if use.role == moe.SHARED_DOWN else left), right

    monkeypatch.setattr(moe, "_shared_factors", off)
    with pytest.raises(IncompleteSequenceDataError, match="shared_expert.down_proj"):
        run_accumulator(model, mbs, lambda m, mb: hf_sequence_losses(m, mb).float())


@pytest.mark.parametrize("mode", ["loss", "advantages"])
def test_qwen2_moe_packed_rows_match_reference(mode):
    """Packed rows with padding through Qwen2-MoE: experts, router and the gated shared
    expert, all from the block's hook."""
    model = tiny("Qwen2Moe", num_experts=4, shared_expert_intermediate_size=16, **MOE)
    mbs, by_id, aligned = _packed()
    advantages = aligned if mode == "advantages" else None
    expected = reference_accumulate(model, mbs, hf_sequence_losses, advantages=advantages)
    acc = run_accumulator(
        model, mbs, hf_sequence_losses, advantages=by_id if mode == "advantages" else None
    )
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["loss", "advantages"])
def test_granitemoe_packed_rows_match_reference(mode):
    """GraniteMoE: the same experts, a router named ``router`` (softmax over the top-k logits),
    through packed rows with padding."""
    model = tiny("GraniteMoe", num_local_experts=4, num_experts_per_tok=2)
    mbs, by_id, aligned = _packed()
    advantages = aligned if mode == "advantages" else None
    expected = reference_accumulate(model, mbs, hf_sequence_losses, advantages=advantages)
    acc = run_accumulator(
        model, mbs, hf_sequence_losses, advantages=by_id if mode == "advantages" else None
    )
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-7)
