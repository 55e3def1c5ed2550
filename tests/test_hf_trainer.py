"""PromaTrainerMixin on a plain transformers.Trainer: padded rows and packed rows."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

datasets = pytest.importorskip("datasets")

from transformers import (  # noqa: E402
    DataCollatorWithFlattening,
    Qwen3Config,
    Qwen3ForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from proma_accum.integrations.hf_trainer import PromaTrainerMixin  # noqa: E402
from proma_accum.sequence_ids import from_position_ids  # noqa: E402
from proma_accum.testing import assert_grads_close, reference_accumulate  # noqa: E402

VOCAB = 41


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and does not thrash on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_qwen3() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        use_cache=False,  # packed rows are isolated only without a cache
    )
    return Qwen3ForCausalLM(cfg)


def padded_dataset(n: int = 8, length: int = 6):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (length,), generator=gen)
        mask = torch.ones(length, dtype=torch.long)
        if i % 2:
            ids[-2:] = 0
            mask[-2:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        if i == 2:
            ids[0] = rows[0]["input_ids"][0]  # a revisited prefix
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return datasets.Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])


def ragged_dataset(n: int = 8):
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 5, 4, 2, 6, 3, 4, 5][:n]
    return datasets.Dataset.from_list(
        [{"input_ids": torch.randint(1, VOCAB, (m,), generator=gen).tolist()} for m in lengths]
    )


class CheckAgainstReference(TrainerCallback):
    """Before the optimizer step: the accumulated gradient equals the brute-force reference."""

    def __init__(self) -> None:
        self.trainer = None
        self.checked = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        trainer.proma.detach()  # the reference's own backward passes must stay plain
        expected = reference_accumulate(model, trainer.microbatches, sequence_losses, clamp=None)
        assert_grads_close(model, expected, rtol=2e-4, atol=1e-7)
        self.checked = True


class PromaTrainer(PromaTrainerMixin, Trainer):
    """The README's trainer, plus a record of each microbatch for the reference."""

    def __init__(self, *args, **kwargs):
        self.microbatches: list[dict] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, *args, num_items_in_batch=None, **kwargs):
        if self._proma_stack is not None:
            mb = {k: v.clone() for k, v in inputs.items()}
            mb["num_items_in_batch"] = num_items_in_batch
            mb["seq_ids"] = self.proma_sequence_ids(inputs)
            self.microbatches.append(mb)
        return super().compute_loss(
            model, inputs, *args, num_items_in_batch=num_items_in_batch, **kwargs
        )


def sequence_losses(model: nn.Module, mb: dict) -> torch.Tensor:
    """Each sequence's part of the HF causal-LM loss (summed CE / num_items_in_batch)."""
    kwargs = {k: mb[k] for k in ("attention_mask", "position_ids") if k in mb}
    logits = model(input_ids=mb["input_ids"], **kwargs).logits[:, :-1]
    targets = mb["labels"][:, 1:]
    tok = nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=-100, reduction="none"
    )
    seq_ids = mb["seq_ids"]
    seq_ids = seq_ids[:, None].expand_as(mb["labels"]) if seq_ids.dim() == 1 else seq_ids
    seq_ids = seq_ids[:, :-1]  # the token at t predicts label t + 1
    valid = (seq_ids >= 0) & (targets != -100)
    k = int(seq_ids.max()) + 1
    out = tok.new_zeros(k).index_add(0, seq_ids[valid], tok[valid])
    return out / mb["num_items_in_batch"]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trainer_step_matches_reference(tmp_path, layout, compile):
    model = tiny_qwen3()
    if layout == "padded":
        data, collator = padded_dataset(), default_data_collator
    else:
        data, collator = ragged_dataset(), DataCollatorWithFlattening()
    check = CheckAgainstReference()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_steps=1,
        max_grad_norm=0.0,  # the callback sees the accumulated gradient itself
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    trainer = PromaTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collator,
        callbacks=[check],
        proma_clamp=None,
        proma_compile=compile,
    )
    assert trainer.proma.compile is compile
    check.trainer = trainer
    trainer.train()
    assert check.checked
    mbs = trainer.microbatches
    assert len(mbs) == 3
    if layout == "packed":
        assert mbs[0]["input_ids"].shape[0] == 1 and "attention_mask" not in mbs[0]
        assert torch.equal(mbs[0]["seq_ids"], from_position_ids(mbs[0]["position_ids"]))
        assert int(mbs[0]["seq_ids"].max()) == 1  # two sequences packed in one row
    else:
        assert torch.equal(mbs[0]["seq_ids"], torch.arange(2))

    logs = trainer.state.log_history[0]
    assert logs["proma/step/all/projected_norm_ratio"] > 0
    assert logs["proma/microbatches"] == 3
