"""The family matrix: every causal-LM family RL users train, built tiny from its config, is fully
covered (empty ``unprojected_parameters()``) and agrees with the brute-force reference in loss
and advantages mode. Families that cannot be covered pin their reason. ``docs/coverage.md`` is
the table of this file."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    _perturb_norms,
    hf_sequence_losses,
    ids_in_order,
    row_microbatches,
    run_accumulator,
    tiny_gpt2,
)

from proma_accum import ProjectedAccumulator, ShapeMismatchError
from proma_accum.testing import assert_grads_close, reference_accumulate

transformers = pytest.importorskip("transformers")

VOCAB = 61
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)


def tiny(family: str, config: str | None = None, **overrides):
    """``<family>ForCausalLM`` from a tiny ``<config or family>Config``, norms perturbed."""
    cfg = getattr(transformers, f"{config or family}Config")(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    _perturb_norms(model)
    return model


# family id -> builder. The first block is the list; the second are families nobody
# named, covered by the same mechanisms (norms by structure, embeddings by forward).
FAMILIES = {
    "llama": lambda: tiny("Llama"),
    "qwen2": lambda: tiny("Qwen2"),
    "qwen3": lambda: tiny("Qwen3", tie_word_embeddings=True),
    "mistral": lambda: tiny("Mistral"),
    "gpt2": tiny_gpt2,
    "gpt-neox": lambda: tiny("GPTNeoX"),
    "phi3": lambda: tiny("Phi3"),
    "gemma": lambda: tiny("Gemma"),
    "gemma2": lambda: tiny("Gemma2"),
    "gemma3": lambda: tiny("Gemma3", "Gemma3Text"),
    "qwen3-moe": lambda: tiny("Qwen3Moe", num_experts=4, **MOE),
    "mixtral": lambda: tiny("Mixtral", num_local_experts=4, **MOE),
    "olmoe": lambda: tiny("Olmoe", num_experts=4, **MOE),
    "granitemoe": lambda: tiny("GraniteMoe", num_local_experts=4, num_experts_per_tok=2),
    "granitemoe-shared": lambda: tiny(
        "GraniteMoeShared", num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=16
    ),
    "qwen2-moe": lambda: tiny("Qwen2Moe", num_experts=4, shared_expert_intermediate_size=16, **MOE),
    "olmo2": lambda: tiny("Olmo2"),
    "cohere": lambda: tiny("Cohere"),
    "granite": lambda: tiny("Granite"),
    "smollm3": lambda: tiny("SmolLM3"),
    "phi": lambda: tiny("Phi"),
    "stablelm": lambda: tiny("StableLm"),
    "exaone4": lambda: tiny("Exaone4"),
    "ernie4.5": lambda: tiny("Ernie4_5"),
}


def _microbatches(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mbs = row_microbatches(gen, 2, rows=3, length=5, vocab=VOCAB)
    for mb in mbs:
        b, t = mb["input_ids"].shape
        mb["position_ids"] = torch.arange(t).expand(b, t)
    by_id = [torch.randn(int(mb["seq_ids"].max()) + 1, generator=gen) for mb in mbs]
    aligned = [t[ids_in_order(mb["seq_ids"])] for t, mb in zip(by_id, mbs, strict=True)]
    return mbs, by_id, aligned


@pytest.mark.parametrize("mode", ["loss", "advantages"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_fully_covered_and_matches_reference(family, mode):
    model = FAMILIES[family]()
    assert ProjectedAccumulator(model).unprojected_parameters() == {}
    mbs, by_id, aligned = _microbatches()
    advantages = aligned if mode == "advantages" else None
    expected = reference_accumulate(model, mbs, hf_sequence_losses, advantages=advantages)
    acc = run_accumulator(
        model, mbs, hf_sequence_losses, advantages=by_id if mode == "advantages" else None
    )
    assert_grads_close(model, expected, rtol=1e-4, atol=1e-7)
    step = acc.stats()["step"]
    assert sum(g["updates"] for k, g in step.items() if isinstance(g, dict)) > 0


# ------------------------------------------------------------------ what is not covered, and why
NO_KERNEL = "not a parameter of a layer with a sequence kernel"


@pytest.mark.parametrize(
    ("build", "reasons"),
    [
        pytest.param(
            lambda: tiny("GptOss", num_local_experts=4, num_experts_per_tok=2),
            {
                "model.layers.0.mlp.experts.gate_up_proj_bias": NO_KERNEL,
                "model.layers.0.mlp.router.bias": NO_KERNEL,
                "model.layers.0.self_attn.sinks": "GptOssAttention is not token-wise by "
                "structure: it has submodules (layer 'model.layers.0.self_attn')",
            },
            id="gpt-oss",
        ),
    ],
)
def test_uncovered_families_say_why(build, reasons):
    unprojected = ProjectedAccumulator(build()).unprojected_parameters()
    for name, reason in reasons.items():
        assert unprojected[name] == reason


def test_qwen2_moe_shared_expert_is_owned_by_its_block(monkeypatch):
    """Qwen2-MoE's shared expert (``nn.Linear``) is called on ``(B·T, H)``, which ``seq_ids``
    cannot split: its block's kernel owns it, so its own layers are not hooked. Negative
    control: without the ownership rule, those layers get the tokens flattened and the
    microbatch fails (and restores ``p.grad``) instead of mixing rows."""
    from proma_accum import _coverage

    model = FAMILIES["qwen2-moe"]()
    mbs, _, _ = _microbatches()
    acc = ProjectedAccumulator(model)
    hooked = {layer.name for layer in acc._coverage.layers.values()}
    assert "model.layers.0.mlp" in hooked
    assert not any("shared_expert" in name for name in hooked)
    monkeypatch.setattr(_coverage, "delegated", lambda module, roles: set())
    with pytest.raises(ShapeMismatchError, match="shared_expert"):
        run_accumulator(model, mbs, hf_sequence_losses)
