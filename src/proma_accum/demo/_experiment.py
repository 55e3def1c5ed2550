"""The training loop of the compared methods and the per-step probe metrics.

Every method shares the prompts, the ``G`` samples per prompt, the group-relative advantages,
the token-mean loss, the optimizer and learning rate, microbatches of 8 sequences, the
absence of a KL penalty and the seeds. Only the update rule differs:

- ``grpo``: PPO likelihood-ratio clipping (0.2); the rollout batch is split into several
  optimizer minibatches, so from the second minibatch on the ratio departs from 1.
- ``reinforce``: the same without clipping.
- ``proma``: REINFORCE whose microbatch gradients are accumulated by
  ``ProjectedAccumulator(projection="gs2", clamp=0.5)`` (the note's setting).
- ``proma-exact``: the same with the exact projection.
- ``proma-unitadv`` (optional): ``proma`` with ``acc.microbatch(seq_ids, advantages=A)``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ._policy import build_policy, response_logits, sample_responses, warm_start
from ._rl import (
    entropy,
    exact_kl,
    group_relative_advantages,
    masked_mean,
    policy_loss,
    token_logprobs,
)
from ._task import AdditionTask

#: update rule of each method: PPO clip range (None = no clipping) and PROMA projection.
METHODS: dict[str, dict] = {
    "grpo": {"clip": 0.2, "projection": None},
    "reinforce": {"clip": None, "projection": None},
    "proma": {"clip": None, "projection": "gs2"},
    "proma-exact": {"clip": None, "projection": "exact"},
    # Not in the defaults: the advantages are handed to the accumulator and the backward is of
    # unit-advantage log-probabilities, so zero-advantage sequences are projected out too (as
    # in the note's own implementation).
    "proma-unitadv": {"clip": None, "projection": "gs2", "unit_advantages": True},
}
DEFAULT_METHODS = ("grpo", "reinforce", "proma", "proma-exact")

#: per-step metrics recorded for every (method, seed); index 0 is the initial policy.
PROBE_METRICS = (
    "val_reward",  # mean reward of sampled (temperature 1) responses on the probe prompts
    "val_reward_greedy",  # reward of greedy responses on the probe prompts
    "kl_from_initial",  # exact per-token KL(current || initial) along sampled responses
    "entropy",  # exact per-token entropy along sampled responses
    "kl_successive",  # exact per-token KL(current || previous step's policy)
    "kl_successive_running",  # running mean of kl_successive over `kl_window` steps
)
TRAIN_METRICS = (
    "train_reward",  # mean reward of the rollout batch of the step
    "clip_fraction",  # fraction of response tokens whose gradient PPO clipping removed
    "response_length",  # mean response length (tokens, incl. <eos>) of the rollout batch
    "proma_projected_norm_ratio",  # PROMA: |removed| / |accumulated gradient|, step mean
    "proma_clamp_fraction",  # PROMA: fraction of tensor updates where the clamp bound
    # The mechanism probe (every `mechanism_every` steps, NaN otherwise), on the sequences of
    # the step's last optimizer minibatch (at most `mechanism_sequences`), with g_i the
    # gradient of sequence i's log-probability and G the accumulated gradient:
    "mech_overlap",  # mean_i (G . g_i)^2 / (|G|^2 mean_i |g_i|^2): squared overlaps, scale-free
    "mech_kl_predicted",  # 1/2 mean_i (dtheta . g_i)^2: second-order (Fisher) KL of the update
    "mech_kl_measured",  # mean_i of the exact sequence-level KL(before || after) of the update
)


@dataclass
class DemoConfig:
    """Configuration of the experiment (defaults: the full CPU-scale run)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 5
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    microbatch_size: int = 8
    minibatches: int = 2
    lr: float = 5e-4
    clip: float = 0.2
    clamp: float | None = 0.5
    strength: float = 1.0
    probe_size: int = 64
    probe_samples: int = 2
    kl_window: int = 10
    digits: int = 2
    hidden_size: int = 64
    layers: int = 2
    warm_start_target: float = 0.25
    warm_start_max_steps: int = 1500
    warm_start_check_every: int = 25
    mechanism_every: int = 0  # 0: no mechanism probe
    mechanism_sequences: int = 64
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A smaller run that finishes in well under a minute on two CPU cores."""
        base = {
            "seeds": 2,
            "steps": 20,
            "prompts_per_step": 8,
            "probe_size": 32,
            "probe_samples": 1,
            "kl_window": 5,
        }
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if self.seeds < 1 or self.steps < 1 or self.minibatches < 1:
            raise ValueError("seeds, steps and minibatches must be positive")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("prompts_per_step * group_size must divide into minibatches")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _generator(*keys: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (same keys -> same random numbers)."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _single_thread():
    """Tiny models run fastest on one thread; restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def initial_policy(cfg: DemoConfig, seed: int) -> dict:
    """Build and warm-start the initial policy of one seed (shared by all methods).

    The supervised warm start runs until the sampled reward on a batch of training prompts
    reaches ``warm_start_target`` (checked every ``warm_start_check_every`` steps).
    Returns ``{"state_dict", "steps", "train_reward"}``.
    """
    with _single_thread():
        task = AdditionTask(digits=cfg.digits, probe_size=cfg.probe_size)
        policy = build_policy(
            task.vocab_size, seed=seed, hidden_size=cfg.hidden_size, layers=cfg.layers
        )
        gen = _generator(seed, 1)
        steps, reward = 0, 0.0
        while steps < cfg.warm_start_max_steps:
            warm_start(policy, task, steps=cfg.warm_start_check_every, generator=gen)
            steps += cfg.warm_start_check_every
            pairs = task.sample_pairs(128, gen)
            responses, _ = sample_responses(
                policy,
                task.encode_prompts(pairs),
                max_len=task.max_response_len,
                eos_id=task.eos_id,
                pad_id=task.pad_id,
                generator=gen,
            )
            reward = task.rewards(pairs, responses).mean().item()
            if reward >= cfg.warm_start_target:
                break
        state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    return {"state_dict": state, "steps": steps, "train_reward": reward}


@torch.no_grad()
def _probe(
    policy: nn.Module,
    initial: nn.Module,
    previous: nn.Module | None,
    task: AdditionTask,
    cfg: DemoConfig,
    gen: torch.Generator,
) -> dict[str, float]:
    """Probe metrics on the held-out prompts, each response sampled ``probe_samples`` times."""
    pairs = task.probe_pairs.repeat(cfg.probe_samples, 1)  # (M, 2)
    prompts = task.encode_prompts(pairs)  # (M, P)
    kw = {"max_len": task.max_response_len, "eos_id": task.eos_id, "pad_id": task.pad_id}
    responses, mask = sample_responses(policy, prompts, generator=gen, **kw)  # (M, L)
    greedy, _ = sample_responses(policy, prompts[: cfg.probe_size], greedy=True, **kw)
    logits = response_logits(policy, prompts, responses)  # (M, L, V)
    out = {
        "val_reward": task.rewards(pairs, responses).mean().item(),
        "val_reward_greedy": task.rewards(task.probe_pairs, greedy).mean().item(),
        "kl_from_initial": masked_mean(
            exact_kl(logits, response_logits(initial, prompts, responses)), mask
        ),
        "entropy": masked_mean(entropy(logits), mask),
        "kl_successive": math.nan,
    }
    if previous is not None:
        out["kl_successive"] = masked_mean(
            exact_kl(logits, response_logits(previous, prompts, responses)), mask
        )
    return out


def train_method(
    cfg: DemoConfig,
    method: str,
    seed: int,
    init_state: dict,
    on_step: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Train one method from the seed's initial policy; return every metric per step.

    Each list has ``steps + 1`` entries (index 0: the initial policy). Random numbers for
    the prompts, the shuffling and the probe are keyed by ``(seed, step)``, so all methods
    see the same prompts and the same probe noise.
    """
    spec = METHODS[method]
    with _single_thread():
        task = AdditionTask(digits=cfg.digits, probe_size=cfg.probe_size)

        def fresh() -> nn.Module:
            model = build_policy(
                task.vocab_size, seed=seed, hidden_size=cfg.hidden_size, layers=cfg.layers
            )
            model.load_state_dict(init_state)
            return model

        policy, initial = fresh(), fresh()
        previous = copy.deepcopy(policy)
        for model in (initial, previous):
            model.requires_grad_(False)
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
        acc = None
        if spec["projection"] is not None:
            from proma_accum import ProjectedAccumulator

            acc = ProjectedAccumulator(
                policy, projection=spec["projection"], clamp=cfg.clamp, strength=cfg.strength
            )
        shadow = fresh() if cfg.mechanism_every else None  # a hook-free copy for the probe

        history: dict[str, list[float]] = {k: [] for k in (*PROBE_METRICS, *TRAIN_METRICS)}
        history["seconds"] = []

        def record(step: int, train: dict[str, float], seconds: float) -> None:
            probe = _probe(
                policy, initial, previous if step else None, task, cfg, _generator(seed, step, 2)
            )
            for k, v in {**probe, **train}.items():
                history[k].append(v)
            window = [v for v in history["kl_successive"][-cfg.kl_window :] if not math.isnan(v)]
            history["kl_successive_running"].append(
                sum(window) / len(window) if window else math.nan
            )
            history["seconds"].append(seconds)

        record(0, dict.fromkeys(TRAIN_METRICS, math.nan), 0.0)
        with acc if acc is not None else contextlib.nullcontext():
            for step in range(1, cfg.steps + 1):
                t0 = time.perf_counter()
                previous.load_state_dict(policy.state_dict())
                mech = shadow if cfg.mechanism_every and step % cfg.mechanism_every == 0 else None
                train = _update(
                    policy, opt, acc, spec, task, cfg, _generator(seed, step, 3), shadow=mech
                )
                record(step, train, time.perf_counter() - t0)
                if on_step is not None:
                    on_step()
    return history


def _update(
    policy: nn.Module,
    opt: torch.optim.Optimizer,
    acc,
    spec: dict,
    task: AdditionTask,
    cfg: DemoConfig,
    gen: torch.Generator,
    shadow: nn.Module | None = None,
) -> dict[str, float]:
    """One RL step: rollout, group-relative advantages, ``minibatches`` optimizer steps.

    With ``shadow`` (a hook-free copy of the policy's architecture), the mechanism probe runs
    around the last optimizer step (see ``TRAIN_METRICS``)."""
    g = cfg.group_size
    clip = cfg.clip if spec["clip"] is not None else None
    unit_adv = spec.get("unit_advantages", False)
    pairs = task.sample_pairs(cfg.prompts_per_step, gen).repeat_interleave(g, 0)  # (N, 2)
    prompts = task.encode_prompts(pairs)  # (N, P)
    responses, mask = sample_responses(
        policy, prompts, max_len=task.max_response_len, eos_id=task.eos_id,
        pad_id=task.pad_id, generator=gen,
    )  # (N, L)  # fmt: skip
    rewards = task.rewards(pairs, responses)  # (N,)
    advantages = group_relative_advantages(rewards, g)  # (N,)
    with torch.no_grad():
        logp_old = token_logprobs(response_logits(policy, prompts, responses), responses)
    order = torch.randperm(len(pairs), generator=gen)
    clipped, ratios, clamps = 0.0, [], []
    mech = dict.fromkeys(("mech_overlap", "mech_kl_predicted", "mech_kl_measured"), math.nan)
    minis = order.chunk(cfg.minibatches)
    for i_mini, mini in enumerate(minis):
        opt.zero_grad(set_to_none=True)
        n_tokens = float(mask[mini].sum())
        for micro in mini.split(cfg.microbatch_size):
            if acc is None:
                ctx = contextlib.nullcontext()
            else:
                seq_ids = torch.arange(len(micro))  # one sequence per row
                ctx = acc.microbatch(seq_ids, advantages=advantages[micro] if unit_adv else None)
            with ctx:
                logits = response_logits(policy, prompts[micro], responses[micro])
                logp = token_logprobs(logits, responses[micro])
                adv = torch.ones(len(micro)) if unit_adv else advantages[micro]
                loss, n_clipped = policy_loss(
                    logp, logp_old[micro], adv, mask[micro], clip=clip, n_tokens=n_tokens
                )
                loss.backward()
            clipped += float(n_clipped)
        if acc is not None:
            step_stats = acc.stats()["step"].get("all", {})
            ratios.append(step_stats.get("projected_norm_ratio", math.nan))
            clamps.append(step_stats.get("clamp_fraction", math.nan))
        probe = shadow is not None and i_mini == len(minis) - 1
        if probe:
            sel = mini[: cfg.mechanism_sequences]
            before = _MechanismProbe(policy, shadow, prompts[sel], responses[sel], mask[sel])
        opt.step()
        if probe:
            mech = before.after(policy)
    opt.zero_grad(set_to_none=True)
    return {
        "train_reward": rewards.mean().item(),
        "clip_fraction": clipped / float(mask.sum()),
        "response_length": float(mask.sum(1).mean()),
        "proma_projected_norm_ratio": sum(ratios) / len(ratios) if ratios else math.nan,
        "proma_clamp_fraction": sum(clamps) / len(clamps) if clamps else math.nan,
        **mech,
    }


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class _MechanismProbe:
    """The note's motivation, measured: the KL an update incurs grows with the squared overlaps
    of the update with the sequences' log-probability gradients.

    Created after the accumulation, before ``opt.step()``; :meth:`after` is called after it.
    """

    def __init__(self, policy, shadow, prompts, responses, mask) -> None:
        params = list(policy.parameters())
        self.grad = _flat(
            p.grad if p.grad is not None else torch.zeros_like(p) for p in params
        ).double()
        self.theta = _flat(p.detach() for p in params).double()
        shadow.load_state_dict(policy.state_dict())
        shadow.requires_grad_(True)
        sparams = list(shadow.parameters())
        rows = []
        for i in range(len(prompts)):  # one sequence at a time: exact per-sequence gradients
            logp = token_logprobs(
                response_logits(shadow, prompts[i : i + 1], responses[i : i + 1]),
                responses[i : i + 1],
            )
            grads = torch.autograd.grad((logp * mask[i : i + 1]).sum(), sparams, allow_unused=True)
            rows.append(
                _flat(
                    g if g is not None else torch.zeros_like(p)
                    for g, p in zip(grads, sparams, strict=True)
                )
            )
        self.seq_grads = torch.stack(rows).double()  # (n, d)
        with torch.no_grad():
            self.logits = response_logits(shadow, prompts, responses)
        self.shadow, self.prompts, self.responses, self.mask = shadow, prompts, responses, mask

    @torch.no_grad()
    def after(self, policy) -> dict[str, float]:
        delta = _flat(p.detach() for p in policy.parameters()).double() - self.theta
        g = self.seq_grads
        norms = self.grad.square().sum() * g.square().sum(1).mean()
        overlap = (g @ self.grad).square().mean() / norms if norms > 0 else math.nan
        self.shadow.load_state_dict(policy.state_dict())
        after = response_logits(self.shadow, self.prompts, self.responses)
        measured = (exact_kl(self.logits, after) * self.mask).sum(1).mean()
        return {
            "mech_overlap": float(overlap),
            "mech_kl_predicted": float(0.5 * (g @ delta).square().mean()),
            "mech_kl_measured": float(measured),
        }
