"""Train a tiny causal LM for a few steps with and without PROMA and print what changed.

Run from the repository root:  python examples/quickstart.py
"""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from proma_accum import ProjectedAccumulator

torch.manual_seed(0)
config = Qwen3Config(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
)  # fmt: skip
initial = Qwen3ForCausalLM(config).eval()
batches = [torch.randint(0, 64, (16, 12)) for _ in range(3)]  # 3 steps, 16 sequences each


def policy_loss(model, tokens, advantages):
    """REINFORCE: -Σ_i adv_i · log p(sequence i), token-mean over the microbatch."""
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
    return -(advantages[:, None] * logp).sum() / logp.numel()


def train(use_proma):
    model = Qwen3ForCausalLM(config).eval()
    model.load_state_dict(initial.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = ProjectedAccumulator(model, projection="exact", clamp=0.5, strength=float(use_proma))
    with acc:
        for tokens in batches:
            advantages = torch.randn(len(tokens))
            opt.zero_grad()
            for mb in range(0, len(tokens), 4):  # microbatches of 4 sequences
                sl = slice(mb, mb + 4)
                with acc.microbatch(torch.arange(4)):
                    policy_loss(model, tokens[sl], advantages[sl]).backward()
            opt.step()
    return model, acc.stats()


torch.manual_seed(1)
plain, _ = train(use_proma=False)
torch.manual_seed(1)
proma, stats = train(use_proma=True)
step = stats["step"]["all"]
print(f"projected away (last step): {step['projected_norm_ratio']:.3f} of the running gradient")
print(f"clamp bound in {100 * step['clamp_fraction']:.0f}% of tensor updates")
print(f"mean rank of sequence gradients: {step['rank']:.1f} of {step['num_sequences']:.0f}")


def distance(a, b):
    """Euclidean distance between two models' parameters, all tensors together."""
    return (
        sum((x - y).norm() ** 2 for x, y in zip(a.parameters(), b.parameters(), strict=True)) ** 0.5
    )


print(
    f"parameters after 3 steps differ by {distance(plain, proma):.4f} "
    f"(the plain run moved {distance(initial, plain):.4f})"
)
