"""PEFT LoRA adapters on a tiny Qwen3: the adapters' Linear layers are projected."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

peft = pytest.importorskip("peft")

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from proma_accum import ProjectedAccumulator  # noqa: E402
from proma_accum.sequence_ids import from_position_ids  # noqa: E402
from proma_accum.testing import assert_grads_close, reference_accumulate  # noqa: E402

VOCAB = 37


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and does not thrash on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_qwen3(**lora_kwargs) -> nn.Module:
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        use_cache=False,
    )
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(cfg)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: both get gradients from the first step
        **lora_kwargs,
    )
    return peft.get_peft_model(base, config).train()


def padded_microbatches(gen: torch.Generator, n_mb: int = 3, rows: int = 3, length: int = 7):
    out = []
    prev = None
    for _ in range(n_mb):
        ids = torch.randint(0, VOCAB, (rows, length + 1), generator=gen)
        if prev is not None:
            ids[0] = prev[0]  # revisit a sequence: a large overlap to project out
        prev = ids
        targets = ids[:, 1:].clone()
        targets[1, -2:] = -100  # padded tail
        out.append({"input_ids": ids[:, :-1], "targets": targets, "seq_ids": torch.arange(rows)})
    return out


def packed_microbatches(gen: torch.Generator, n_mb: int = 2):
    """Two rows, each holding sequences of lengths 3 and 4; position ids restart at 0."""
    out = []
    for _ in range(n_mb):
        input_ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
        position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]] * 2)
        targets = torch.randint(0, VOCAB, (2, 7), generator=gen)
        targets[:, 2] = -100  # no next-token target across a sequence boundary
        targets[:, 6] = -100
        seq_ids = from_position_ids(position_ids)
        out.append(
            {
                "input_ids": input_ids,
                "targets": targets,
                "seq_ids": seq_ids,
                "position_ids": position_ids,
            }
        )
    return out


def sequence_losses(model: nn.Module, mb: dict) -> torch.Tensor:
    """``(k,)``: each sequence's summed token cross-entropy (sequence ids 0..k-1)."""
    kwargs = {"position_ids": mb["position_ids"]} if "position_ids" in mb else {}
    logits = model(input_ids=mb["input_ids"], use_cache=False, **kwargs).logits
    tok = nn.functional.cross_entropy(
        logits.transpose(1, 2), mb["targets"], ignore_index=-100, reduction="none"
    )
    seq_ids = mb["seq_ids"]
    if seq_ids.dim() == 1:
        seq_ids = seq_ids[:, None].expand_as(tok)
    valid = (seq_ids >= 0) & (mb["targets"] != -100)
    k = int(seq_ids.max()) + 1
    return tok.new_zeros(k).index_add(0, seq_ids[valid], tok[valid])


def run(model: nn.Module, mbs: list[dict], **kwargs) -> ProjectedAccumulator:
    model.zero_grad(set_to_none=True)
    acc = ProjectedAccumulator(model, **kwargs)
    with acc:
        for mb in mbs:
            with acc.microbatch(mb["seq_ids"]):
                sequence_losses(model, mb).sum().backward()
    return acc


def test_lora_layers_are_covered_and_base_is_untouched():
    model = lora_qwen3()
    acc = ProjectedAccumulator(model)
    projected = acc.projected_parameters()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(projected) == sorted(trainable)
    assert acc.unprojected_parameters() == {}
    assert len(projected) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers
    assert all(".lora_A." in n or ".lora_B." in n for n in projected)
    assert any(n.endswith("q_proj.lora_A.default.weight") for n in projected)
    assert any(n.endswith("down_proj.lora_B.default.weight") for n in projected)

    mbs = padded_microbatches(torch.Generator().manual_seed(0))
    run(model, mbs)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(p.grad.any()), name
        else:
            assert p.grad is None, name  # frozen base weights: no gradient at all


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize(("projection", "clamp"), [("exact", 0.5), ("gs2", None)])
def test_lora_matches_reference(layout, projection, clamp):
    gen = torch.Generator().manual_seed(1)
    mbs = padded_microbatches(gen) if layout == "padded" else packed_microbatches(gen)
    model = lora_qwen3()
    expected = reference_accumulate(model, mbs, sequence_losses, projection=projection, clamp=clamp)
    plain = reference_accumulate(model, mbs, sequence_losses, strength=0.0)
    acc = run(model, mbs, projection=projection, clamp=clamp)
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-7)
    # negative control: the projection changed the LoRA gradients
    diff = sum(float((expected[n] - plain[n]).norm()) for n in expected)
    assert diff > 1e-3 * sum(float(plain[n].norm()) for n in plain)
    assert acc.stats()["step"]["linear"]["projected_norm_ratio"] > 0


def test_lora_advantages_mode_matches_reference():
    gen = torch.Generator().manual_seed(2)
    mbs = padded_microbatches(gen)
    advantages = [torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.3, -1.0, 0.0])] + [
        torch.randn(3, generator=gen) for _ in mbs[2:]
    ]
    model = lora_qwen3()
    expected = reference_accumulate(model, mbs, sequence_losses, advantages=advantages)
    model.zero_grad(set_to_none=True)
    with ProjectedAccumulator(model) as acc:
        for mb, adv in zip(mbs, advantages, strict=True):
            with acc.microbatch(mb["seq_ids"], advantages=adv):
                sequence_losses(model, mb).sum().backward()
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-7)


def test_dora_magnitude_is_reported_unprojected():
    """DoRA calls lora_A on an identity matrix whose output is detached: a shape that does
    not match seq_ids is only an error if that output receives a gradient."""
    model = lora_qwen3(use_dora=True)
    acc = ProjectedAccumulator(model)
    unprojected = acc.unprojected_parameters()
    assert unprojected and all("lora_magnitude_vector" in n for n in unprojected)
    assert all(".lora_A." in n or ".lora_B." in n for n in acc.projected_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(model, padded_microbatches(torch.Generator().manual_seed(3), n_mb=2))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_grpo_with_peft_config_keeps_the_fused_head(tmp_path):
    """With LoRA the LM head is frozen: TRL's fused head stays, only adapters are projected."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from test_trl_integration import distinct_chars, grpo_args, make_model, make_tokenizer
    from trl.trainer.utils import FusedCausalLMOutput  # noqa: F401

    from proma_accum.integrations.trl import PromaGRPOTrainer

    tok = make_tokenizer()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = PromaGRPOTrainer(
        model=make_model(len(tok)),
        reward_funcs=distinct_chars,
        args=grpo_args(tmp_path, bf16=False, learning_rate=1e-2),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["1+1=", "ab "] * 2}),
        processing_class=tok,
        peft_config=config,
    )
    base = trainer.model.get_base_model()
    assert "_unfused_forward" not in getattr(base.forward, "__qualname__", "")
    projected = trainer.proma.projected_parameters()
    assert projected and all("lora_" in n for n in projected)
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["proma/step/linear/updates"] > 0
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
