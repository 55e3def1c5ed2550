"""The README's ecosystem snippets ("Use with TRL", "Use with a Hugging Face Trainer",
"Use with VeRL"), run exactly as written (each in a fresh namespace and directory)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and does not thrash on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = """
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# A tiny model and tokenizer so that this runs anywhere; use your own instead, e.g.
# AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B") and AutoTokenizer.
vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *"abcdefghij+=0123456789 "])}
backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
backend.decoder = decoders.Fuse()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", padding_side="left"
)
model = Qwen3ForCausalLM(
    Qwen3Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_cache=False,
    )
)
"""

USE_WITH_TRL = """
import torch
from datasets import Dataset
from trl import GRPOConfig

from proma_accum.integrations.trl import PromaGRPOTrainer


def reward(completions, **kwargs):  # any TRL reward function
    return [float(len(set(c))) for c in completions]


trainer = PromaGRPOTrainer(
    model=model,
    reward_funcs=reward,
    args=GRPOConfig(
        output_dir="grpo-proma",
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=2,  # PROMA acts across these microbatches
        max_completion_length=8,
        max_steps=2,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    ),
    train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+3=", "ab", "c"] * 4}),
    processing_class=tokenizer,
    proma_projection="exact",  # or "gs2", the note's two-pass Gram-Schmidt
    proma_clamp=0.5,  # the note's setting
    proma_strength=1.0,
)
trainer.train()
print(trainer.proma.stats()["step"]["all"])  # also logged as proma/... with the loss
"""

USE_WITH_HF_TRAINER = """
from datasets import Dataset
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from proma_accum.integrations.hf_trainer import PromaTrainerMixin


class PromaTrainer(PromaTrainerMixin, Trainer):
    pass  # override proma_sequence_ids(inputs) for other layouts


data = Dataset.from_dict({"input_ids": [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13]] * 4})
trainer = PromaTrainer(
    model=model,
    args=TrainingArguments(
        output_dir="sft-proma",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,  # PROMA acts across these microbatches
        max_steps=2,
        report_to=[],
    ),
    train_dataset=data,
    # packed rows: position_ids restart at 0 per sequence, no attention_mask
    data_collator=DataCollatorWithFlattening(),
    proma_clamp=0.5,
)
trainer.train()
print(trainer.proma.stats()["step"]["all"])
"""

USE_WITH_VERL = """
import torch

from proma_accum import ProjectedAccumulator
from proma_accum.sequence_ids import from_remove_padding

acc = ProjectedAccumulator(model, clamp=0.5)
opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
# Two microbatches of a padded rollout batch (B = 3 rows each): VeRL's layout before unpadding.
microbatches = []
for _ in range(2):
    attention_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    input_ids = torch.randint(2, 20, attention_mask.shape) * attention_mask
    response_mask = torch.zeros_like(attention_mask)
    response_mask[:, -2:] = 1
    response_mask *= attention_mask
    advantages = torch.randn(3)
    microbatches.append((input_ids, attention_mask, response_mask, advantages))

with acc:
    opt.zero_grad()
    for input_ids, attention_mask, response_mask, advantages in microbatches:
        keep = attention_mask.bool()
        # use_remove_padding: the real tokens of all rows packed into one (1, nnz) row
        packed_ids = input_ids[keep][None]
        position_ids = (attention_mask.cumsum(-1) - 1)[keep][None]
        seq_ids = from_remove_padding(attention_mask)  # (1, nnz): row index of each token
        with acc.microbatch(seq_ids):
            logits = model(
                input_ids=packed_ids, position_ids=position_ids, use_cache=False
            ).logits
            # log-prob of each packed token given the previous one of the same sequence
            logp = torch.log_softmax(logits[0, :-1].float(), -1)
            token_logp = logp.gather(-1, packed_ids[0, 1:, None])[:, 0]
            token_logp = torch.cat([token_logp.new_zeros(1), token_logp])
            first = torch.cat([torch.ones(1, dtype=torch.bool), seq_ids[0, 1:] != seq_ids[0, :-1]])
            token_logp = token_logp.masked_fill(first, 0.0)  # no prediction across sequences
            weight = advantages[seq_ids[0]] * response_mask[keep]
            loss = -(token_logp * weight).sum() / response_mask.sum()
            loss.backward()
    opt.step()
print(acc.stats()["step"]["all"])
"""

SNIPPETS = {
    "trl": USE_WITH_TRL,
    "hf_trainer": USE_WITH_HF_TRAINER,
    "verl": USE_WITH_VERL,
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_runs(name, tmp_path, monkeypatch):
    if name == "trl":
        pytest.importorskip("trl")
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"snippet_{name}"}
    exec(compile(TINY, "<tiny>", "exec"), namespace)
    exec(compile(SNIPPETS[name], f"<snippet {name}>", "exec"), namespace)
    acc = namespace["acc"] if name == "verl" else namespace["trainer"].proma
    assert acc.stats()["step"]["all"]["projected_norm_ratio"] > 0
