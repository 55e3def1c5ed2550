"""Hugging Face causal LMs built from tiny configs, against the brute-force reference."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    hf_sequence_losses,
    ids_in_order,
    packed_microbatches,
    row_microbatches,
    run_accumulator,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen3,
)

from proma_accum import ProjectedAccumulator
from proma_accum.testing import assert_grads_close, reference_accumulate

pytest.importorskip("transformers")

RTOL, ATOL = 1e-4, 1e-7


def _with_positions(mbs):
    for mb in mbs:
        b, t = mb["input_ids"].shape
        mb["position_ids"] = torch.arange(t).expand(b, t)
    return mbs


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: tiny_qwen3(tied=False), id="qwen3-untied"),
        pytest.param(lambda: tiny_qwen3(tied=True), id="qwen3-tied"),
        pytest.param(tiny_llama, id="llama"),
        pytest.param(tiny_gpt2, id="gpt2"),
    ],
)
@pytest.mark.parametrize("projection", ["exact", "gs2"])
def test_rows_match_reference(build, projection, gen):
    model = build()
    mbs = _with_positions(row_microbatches(gen, 3, rows=3, length=6, vocab=61))
    expected = reference_accumulate(model, mbs, hf_sequence_losses, projection=projection)
    acc = run_accumulator(model, mbs, hf_sequence_losses, projection=projection)
    assert acc.unprojected_parameters() == {}
    assert_grads_close(model, expected, rtol=RTOL, atol=ATOL)
    assert acc.stats()["step"]["all"]["clamp_fraction"] > 0


def test_qwen3_kinds_covered():
    model = tiny_qwen3(tied=True)
    acc = ProjectedAccumulator(model)
    names = acc.projected_parameters()
    assert "model.embed_tokens.weight" in names  # tied with lm_head: one tensor
    assert any("q_norm" in n for n in names) and any("input_layernorm" in n for n in names)
    assert len(names) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["loss", "advantages"])
def test_qwen3_packed_matches_reference(mode, gen):
    model = tiny_qwen3(tied=True)
    mbs = packed_microbatches(gen, 3, rows=2, per_row=2, seg_len=4, vocab=61)
    adv_by_id = adv_aligned = None
    if mode == "advantages":
        adv_by_id, adv_aligned = [], []
        for mb in mbs:
            ids = ids_in_order(mb["seq_ids"])
            table = torch.randn(int(ids.max()) + 1, generator=gen)
            adv_by_id.append(table)
            adv_aligned.append(table[ids])
    expected = reference_accumulate(model, mbs, hf_sequence_losses, advantages=adv_aligned)
    run_accumulator(model, mbs, hf_sequence_losses, advantages=adv_by_id)
    assert_grads_close(model, expected, rtol=RTOL, atol=ATOL)


def test_packed_equals_padded(gen):
    """The same sequences, packed two per row or one per padded row, give the same result."""
    model = tiny_qwen3()
    packed = packed_microbatches(gen, 2, rows=2, per_row=2, seg_len=4, vocab=61)
    padded = []
    for mb in packed:
        rows = []
        for r in range(2):
            for j in range(2):
                sl = slice(j * 4, (j + 1) * 4)
                rows.append((mb["input_ids"][r, sl], mb["targets"][r, sl], mb["seq_ids"][r, j * 4]))
        padded.append(
            {
                "input_ids": torch.stack([x for x, _, _ in rows]),
                "targets": torch.stack([y for _, y, _ in rows]),
                "seq_ids": torch.stack([s for _, _, s in rows]),
            }
        )
    run_accumulator(model, packed, hf_sequence_losses)
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    run_accumulator(model, padded, hf_sequence_losses)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, packed_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant, gen):
    model = tiny_qwen3(tied=True)
    mbs = row_microbatches(gen, 3, rows=3, length=6, vocab=61)
    expected = reference_accumulate(model, mbs, hf_sequence_losses)
    model.train()  # HF only checkpoints in training mode; dropout is 0 in this config
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    calls = []
    # a pre-hook: non-reentrant recomputation stops early, inside the MLP's forward
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    acc = run_accumulator(model, mbs, hf_sequence_losses)
    assert_grads_close(model, expected, rtol=RTOL, atol=ATOL)
    assert acc.stats()["step"]["all"]["updates"] > 0
    assert len(calls) == 2 * len(mbs)  # checkpointing really re-ran the forward


def test_gpt2_implicit_position_ids_error(gen):
    model = tiny_gpt2()
    mbs = row_microbatches(gen, 1, rows=3, length=6, vocab=61)  # no position_ids given
    before = {n: None for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"position_ids expanded to \(B, T\)"):
        run_accumulator(model, mbs, hf_sequence_losses)
    assert {n: p.grad for n, p in model.named_parameters()} == before


def test_no_grad_forwards_ignored(gen):
    """Generation-style no-grad forwards inside and outside the context change nothing."""
    model = tiny_qwen3()
    mbs = row_microbatches(gen, 2, rows=3, length=6, vocab=61)
    expected = reference_accumulate(model, mbs, hf_sequence_losses)
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model) as acc:
        model(input_ids=mbs[0]["input_ids"], use_cache=False)  # outside any microbatch
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                with torch.no_grad():
                    model.generate(mb["input_ids"][:, :2], max_new_tokens=3, do_sample=False)
                hf_sequence_losses(model, mb).sum().backward()
    assert_grads_close(model, expected, rtol=RTOL, atol=ATOL)


def test_bf16_parameters(gen):
    """bf16 weights: sequence statistics in fp32; agrees with the fp64 reference of the same
    bf16 model to bf16 accuracy, and differs clearly from plain accumulation."""
    model = tiny_qwen3().to(torch.bfloat16)
    mbs = row_microbatches(gen, 3, rows=3, length=6, vocab=61)
    expected = reference_accumulate(model, mbs, hf_sequence_losses)
    acc = run_accumulator(model, mbs, hf_sequence_losses)
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert_grads_close(model, expected, rtol=3e-2, atol=1e-4)
    assert acc.stats()["step"]["all"]["projected_norm_ratio"] > 0.05


def test_autocast(gen):
    model = tiny_qwen3()
    mbs = row_microbatches(gen, 3, rows=3, length=6, vocab=61)

    def autocast_losses(model, mb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return hf_sequence_losses(model, mb).float()

    expected = reference_accumulate(model, mbs, autocast_losses)
    run_accumulator(model, mbs, autocast_losses)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert_grads_close(model, expected, rtol=3e-2, atol=1e-4)
