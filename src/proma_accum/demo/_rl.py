"""RL pieces shared by every method: advantages, the policy-gradient loss, exact KL/entropy.

Shapes: ``N`` sequences, ``L`` response tokens, ``V`` vocabulary size, ``G`` samples per prompt.
"""

from __future__ import annotations

import torch


def group_relative_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's group-relative advantage estimator (outcome reward, one value per sequence).

    rewards (N,), laid out as ``N / G`` consecutive groups of ``G = group_size`` samples of
    the same prompt -> advantages (N,): ``(r - mean_group) / (std_group + eps)`` with the
    unbiased (``G - 1``) standard deviation. A group whose rewards are all equal gets 0.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError("rewards must be 1-D with a length divisible by group_size")
    if group_size < 2:
        raise ValueError("group_size must be at least 2")
    r = rewards.float().view(-1, group_size)  # (N/G, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits (N, L, V), tokens (N, L) -> log pi(token) (N, L)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None,
    n_tokens: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate, token-mean aggregation.

    logp, logp_old, mask (N, L); advantages (N,) broadcast over each sequence's tokens.
    Per token, with ratio ``rho = exp(logp - logp_old)``:
    ``-min(rho * A, clip(rho, 1 - clip, 1 + clip) * A)``, or ``-rho * A`` when ``clip`` is None
    (REINFORCE; its gradient is ``-A * grad logp`` wherever ``rho == 1``).
    The loss is the masked sum divided by ``n_tokens`` — the number of response tokens of the
    whole optimizer minibatch — so summing the microbatch gradients gives the token mean.

    Returns ``(loss, clipped)``: the scalar loss and the number of tokens where clipping
    removed the gradient.
    """
    ratio = torch.exp(logp - logp_old.detach())
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    if clip is None:
        per_token = -unclipped
        clipped = torch.zeros((), dtype=logp.dtype)
    else:
        clipped_obj = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
        per_token = -torch.minimum(unclipped, clipped_obj)
        clipped = ((clipped_obj < unclipped).float() * mask).sum()
    return (per_token * mask).sum() / n_tokens, clipped.detach()


def exact_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || q) summed exactly over the vocabulary.

    logits_p, logits_q (..., V) -> (...): ``sum_v p(v) (log p(v) - log q(v))``.
    """
    logp = torch.log_softmax(logits_p.float(), -1)
    logq = torch.log_softmax(logits_q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-token entropy over the vocabulary: logits (..., V) -> (...) in nats."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over the positions where ``mask`` is 1 (same shape)."""
    return float((values * mask).sum() / mask.sum().clamp_min(1.0))
