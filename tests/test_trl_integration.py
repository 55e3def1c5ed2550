"""End-to-end: TRL's GRPOTrainer with PROMA accumulation, on CPU, with a tiny Qwen3."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    TrainerCallback,
)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from proma_accum.integrations.hf_trainer import PromaTrainerMixin  # noqa: E402
from proma_accum.integrations.trl import PromaGRPOTrainer, unfuse_lm_head  # noqa: E402
from proma_accum.testing import assert_grads_close, reference_accumulate  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?."


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and does not thrash on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_model(vocab_size: int, tied: bool = False) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=tied,
    )
    return Qwen3ForCausalLM(cfg)


def distinct_chars(completions, **kwargs):
    """Rule reward: number of distinct characters of the completion."""
    return [float(len(set(c))) for c in completions]


def constant_for_z(prompts, completions, **kwargs):
    """Rule reward that is constant for prompts with a "z": zero advantages in that group."""
    return [
        1.0 if "z" in p else float(len(set(c))) for p, c in zip(prompts, completions, strict=True)
    ]


class GradsAtStep(TrainerCallback):
    """Keeps the accumulated gradients seen just before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


def grpo_args(tmp_path, **overrides) -> GRPOConfig:
    # TRL defaults otherwise: gradient checkpointing on, bf16 autocast, loss_type "dapo".
    kwargs = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "gradient_accumulation_steps": 2,
        "max_completion_length": 6,
        "max_steps": 1,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def run_grpo(cls, tmp_path, *, reward=distinct_chars, tied=False, args=None, **kwargs):
    tok = make_tokenizer()
    model = make_model(len(tok), tied=tied)
    data = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3=", "ab ", "zz? "] * 4})
    grads = GradsAtStep()
    trainer = cls(
        model=model,
        reward_funcs=reward,
        args=args or grpo_args(tmp_path),
        train_dataset=data,
        processing_class=tok,
        callbacks=[grads],
        **kwargs,
    )
    trainer.train()
    return trainer, grads.grads


def rel_diff(a: dict, b: dict) -> float:
    num = sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in a)
    den = sum(float((a[n].double() ** 2).sum()) for n in a)
    return (num / den) ** 0.5


# ------------------------------------------------------------------ the unfused LM head


@pytest.mark.parametrize("tied", [False, True])
def test_unfused_head_matches_trl_fused_head(tied):
    tok = make_tokenizer()
    fused = make_model(len(tok), tied=tied)
    unfused = copy.deepcopy(fused)
    add_fused_lm_head(fused, temperature=0.7, outputs=("log_probs", "entropy"))
    add_fused_lm_head(unfused, temperature=0.7, outputs=("log_probs", "entropy"))
    unfuse_lm_head(unfused, temperature=0.7, entropy_grad=True)

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(tok), (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-4] = -100  # score the last 4 tokens (the "completion")
    labels[2, -1] = -100

    outs = []
    for model in (fused, unfused):
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True
        )
        (out.loss + 0.1 * out.entropy.sum()).backward()
        outs.append(out)
    a, b = outs
    assert b.log_probs.shape == a.log_probs.shape == (3, 8)
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.entropy, a.entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(b.label_mask, a.label_mask)
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # without the fused flag, both are the model's own forward
    torch.testing.assert_close(
        unfused(input_ids=input_ids).logits, fused(input_ids=input_ids).logits
    )


# ------------------------------------------------------------------ TRL defaults, end to end


def test_grpo_defaults_take_the_proma_path(tmp_path):
    """TRL defaults (gradient checkpointing, bf16 autocast, fused head, generation inside
    training_step): the PROMA path is taken and changes the update; strength 0 does not."""
    _, plain = run_grpo(GRPOTrainer, tmp_path / "plain")
    trainer, proma = run_grpo(PromaGRPOTrainer, tmp_path / "proma")
    _, off = run_grpo(PromaGRPOTrainer, tmp_path / "off", proma_strength=0.0)

    assert trainer.args.gradient_checkpointing and trainer.model.is_gradient_checkpointing
    assert trainer.args.bf16
    assert "lm_head.weight" in trainer.proma.projected_parameters()
    assert trainer.proma.unprojected_parameters() == {}

    logs = trainer.state.log_history[0]
    assert logs["proma/microbatches"] == 2 and logs["proma/steps"] == 1
    assert logs["proma/step/all/updates"] > 0
    assert logs["proma/step/linear/projected_norm_ratio"] > 0
    assert logs["proma/step/embedding/projected_norm_ratio"] > 0
    assert logs["proma/step/all/num_sequences"] == 4

    assert proma[0].keys() == plain[0].keys()
    # Negative control: strength 0 is the plain update (up to bf16 noise of the unfused head)
    assert rel_diff(plain[0], off[0]) < 0.02
    assert rel_diff(plain[0], proma[0]) > 0.05


def test_fused_head_without_unfusing_is_refused(tmp_path):
    """Negative control: hooks alone never see the fused LM head, and the core says so."""

    class NaiveGRPO(PromaTrainerMixin, GRPOTrainer):
        def proma_sequence_ids(self, inputs):
            return torch.arange(inputs["completion_ids"].shape[0])

    with pytest.raises(RuntimeError, match="lm_head"):
        run_grpo(NaiveGRPO, tmp_path, args=grpo_args(tmp_path, bf16=False))


def test_keep_fused_head_accumulates_it_plainly(tmp_path):
    trainer, grads = run_grpo(PromaGRPOTrainer, tmp_path, tied=True, proma_unfuse_lm_head=False)
    unprojected = trainer.proma.unprojected_parameters()
    # tied: the LM head is the embedding, both names excluded together
    assert list(unprojected) == ["model.embed_tokens.weight"]
    assert "excluded" in unprojected["model.embed_tokens.weight"]
    assert "model.layers.0.mlp.up_proj.weight" in trainer.proma.projected_parameters()
    assert grads and trainer.state.log_history[0]["proma/step/linear/projected_norm_ratio"] > 0


# ------------------------------------------------------------------ against the reference


class RecordingGRPO(PromaGRPOTrainer):
    """Keeps each microbatch's prepared inputs and checks the step against the reference."""

    def __init__(self, *args, **kwargs):
        self.microbatches: list[dict] = []
        self.checked = False
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        if torch.is_grad_enabled() and self._proma_stack is not None:
            self.microbatches.append(
                {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            )
        return super().compute_loss(model, inputs, *args, **kwargs)

    def row_losses(self, model, mb, unit_advantages=False):
        """Each sequence's term of TRL's loss ("dapo" sums over tokens: additive in rows)."""
        rows = mb["completion_ids"].shape[0]
        out = []
        for i in range(rows):
            row = {
                k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                for k, v in mb.items()
            }
            if unit_advantages:
                row["advantages"] = torch.ones_like(row["advantages"])
            out.append(self.compute_loss(model, row))
        return torch.stack(out)


class CheckAgainstReference(TrainerCallback):
    def __init__(self, use_advantages: bool) -> None:
        self.use_advantages = use_advantages
        self.trainer: RecordingGRPO | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        trainer.proma.detach()  # the reference's own backward passes must stay plain
        mbs = trainer.microbatches
        assert len(mbs) == args.gradient_accumulation_steps
        expected = reference_accumulate(
            model,
            mbs,
            lambda m, mb: trainer.row_losses(m, mb, unit_advantages=self.use_advantages),
            clamp=0.5,
            advantages=[mb["advantages"] for mb in mbs] if self.use_advantages else None,
        )
        assert_grads_close(model, expected, rtol=2e-4, atol=1e-7)
        trainer.checked = True


@pytest.mark.parametrize(
    ("use_advantages", "reward", "gc"),
    [(False, distinct_chars, True), (True, constant_for_z, False)],
    ids=["loss-mode-checkpointing", "advantages-mode"],
)
def test_grpo_step_matches_reference(tmp_path, use_advantages, reward, gc):
    check = CheckAgainstReference(use_advantages)
    tok = make_tokenizer()
    trainer = RecordingGRPO(
        model=make_model(len(tok)),
        reward_funcs=reward,
        # no gradient clipping: the callback sees the accumulated gradient itself
        args=grpo_args(tmp_path, bf16=False, gradient_checkpointing=gc, max_grad_norm=0.0),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["zz? ", "ab "]}),
        processing_class=tok,
        callbacks=[check],
        proma_advantages=use_advantages,
    )
    check.trainer = trainer
    trainer.train()
    assert trainer.checked
    if use_advantages:
        # zero-advantage sequences still span directions that are projected out
        adv = torch.cat([mb["advantages"] for mb in trainer.microbatches])
        assert bool((adv == 0).any()) and bool((adv != 0).any())


def test_advantage_mode_rejects_unsuitable_losses(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="loss_type"):
        PromaGRPOTrainer(
            model=make_model(len(tok)),
            reward_funcs=distinct_chars,
            args=grpo_args(tmp_path, loss_type="sapo"),
            train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * 8}),
            processing_class=tok,
            proma_advantages=True,
        )


class _Boom(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        raise RuntimeError("boom")


def test_unfused_head_is_active_during_train_only(tmp_path):
    """The LM head module runs in the fused-head calls while train() runs, and outside
    train() (after it returned, and after it raised) the fused call is TRL's own again."""
    tok = make_tokenizer()
    model = make_model(len(tok))
    data = datasets.Dataset.from_dict({"prompt": ["1+1=", "2+3="] * 4})
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    trainer = PromaGRPOTrainer(
        model=model,
        reward_funcs=distinct_chars,
        args=grpo_args(tmp_path),
        train_dataset=data,
        processing_class=tok,
    )
    ids = torch.randint(2, len(tok), (2, 5))

    def fused_call_runs_the_head() -> bool:
        head_calls.clear()
        with torch.no_grad():
            model(input_ids=ids, labels=ids, fused_lm_head=True)
        return bool(head_calls)

    assert not fused_call_runs_the_head()  # before train(): TRL's fused head
    trainer.train()
    assert not fused_call_runs_the_head()  # after: TRL's again
    trainer._proma_unfused.active = True  # negative control: the switch is what differs
    assert fused_call_runs_the_head()
    trainer._proma_unfused.active = False
    trainer.add_callback(_Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not fused_call_runs_the_head()  # after a failure too
