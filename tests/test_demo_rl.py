"""Tests of the CPU demo: RL pieces against hand-computed values, and a small end-to-end run."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proma_accum.demo import DemoConfig, main
from proma_accum.demo._policy import build_policy, response_logits, sample_responses
from proma_accum.demo._report import PANELS, make_figure, paired_interval, verdicts
from proma_accum.demo._rl import (
    entropy,
    exact_kl,
    group_relative_advantages,
    masked_mean,
    policy_loss,
    token_logprobs,
)
from proma_accum.demo._runner import Progress
from proma_accum.demo._task import AdditionTask

# ---------------------------------------------------------------- advantage estimator


def test_group_relative_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_relative_advantages(rewards, group_size=4)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 1/sqrt(3)  ->  ±0.5 * sqrt(3)
    a = 0.5 * math.sqrt(3.0)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    # negative control: the population std would give ±1
    assert not torch.allclose(adv[:4].abs(), torch.ones(4), atol=1e-2)


def test_group_relative_advantages_respects_group_layout():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    by_pairs = group_relative_advantages(rewards, group_size=2)
    # consecutive pairs (1, 0), (1, 0): mean 0.5, unbiased std 1/sqrt(2)
    s = 0.5 * math.sqrt(2.0)
    torch.testing.assert_close(by_pairs, torch.tensor([s, -s, s, -s]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_pairs, group_relative_advantages(rewards, group_size=4))
    with pytest.raises(ValueError):
        group_relative_advantages(rewards, group_size=3)


# ---------------------------------------------------------------- PPO clip loss


def _loss_and_grad(ratios, advantages, clip, mask=None):
    logp_old = torch.zeros(len(ratios), 1)
    logp = torch.log(torch.tensor(ratios))[:, None].requires_grad_(True)
    mask = torch.ones_like(logp_old) if mask is None else mask
    loss, clipped = policy_loss(
        logp, logp_old, torch.tensor(advantages), mask, clip=clip, n_tokens=float(len(ratios))
    )
    loss.backward()
    return loss.item(), logp.grad[:, 0], clipped.item()


def test_ppo_clip_loss_hand_values():
    # one token per sequence, clip 0.2:
    #  rho 1.5, A +1 -> min(1.5, 1.2) = 1.2, clipped (no gradient)
    #  rho 1.5, A -1 -> min(-1.5, -1.2) = -1.5, gradient d/dlogp (-rho*A) = +1.5
    #  rho 0.5, A +1 -> min(0.5, 0.8) = 0.5, gradient -0.5
    #  rho 0.5, A -1 -> min(-0.5, -0.8) = -0.8, clipped (no gradient)
    loss, grad, clipped = _loss_and_grad([1.5, 1.5, 0.5, 0.5], [1.0, -1.0, 1.0, -1.0], 0.2)
    assert loss == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.5, -0.5, 0.0]) / 4)
    assert clipped == 2
    # negative control: without clipping (REINFORCE) every token keeps its gradient
    loss_u, grad_u, clipped_u = _loss_and_grad([1.5, 1.5, 0.5, 0.5], [1.0, -1.0, 1.0, -1.0], None)
    assert loss_u == pytest.approx(-(1.5 - 1.5 + 0.5 - 0.5) / 4, abs=1e-6)
    torch.testing.assert_close(grad_u, torch.tensor([-1.5, 1.5, -0.5, 0.5]) / 4)
    assert clipped_u == 0


def test_ppo_loss_on_policy_equals_reinforce_gradient():
    # at rho == 1 the clipped and unclipped losses have the gradient -A * grad logp
    _, g_clip, _ = _loss_and_grad([1.0, 1.0], [2.0, -0.5], 0.2)
    _, g_none, _ = _loss_and_grad([1.0, 1.0], [2.0, -0.5], None)
    torch.testing.assert_close(g_clip, torch.tensor([-2.0, 0.5]) / 2)
    torch.testing.assert_close(g_none, g_clip)


def test_token_mean_over_microbatches_and_mask():
    torch.manual_seed(0)
    logp = torch.randn(4, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    n = float(mask.sum())  # 9 tokens in the minibatch
    parts = [
        policy_loss(logp[i], logp[i], adv[i], mask[i], clip=0.2, n_tokens=n)[0]
        for i in (slice(0, 2), slice(2, 4))
    ]
    expected = -(adv[:, None] * mask).sum() / n  # rho == 1: -sum(A over tokens) / tokens
    torch.testing.assert_close(sum(parts), expected)
    # negative control: averaging the microbatch means is not the token mean
    per_mb = [-(adv[i, None] * mask[i]).sum() / mask[i].sum() for i in (slice(0, 2), slice(2, 4))]
    assert not torch.isclose(sum(per_mb) / 2, expected)
    # masked (padding) tokens do not matter
    logp2 = logp.clone()
    logp2[1, 2] = 50.0
    a = policy_loss(logp2, logp, adv, mask, clip=0.2, n_tokens=n)[0]
    b = policy_loss(logp, logp, adv, mask, clip=0.2, n_tokens=n)[0]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- exact KL and entropy


def test_exact_kl_hand_values():
    p = torch.log(torch.tensor([0.25, 0.75]))
    q = torch.zeros(2)  # uniform
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert exact_kl(p, q).item() == pytest.approx(expected, abs=1e-6)
    # KL is not symmetric (negative control), zero for equal distributions, shift invariant
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert exact_kl(q, p).item() == pytest.approx(reverse, abs=1e-6)
    assert abs(reverse - expected) > 1e-2
    assert exact_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert exact_kl(p + 3.0, q - 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_exact_kl_matches_torch_over_vocabulary():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    ref = torch.nn.functional.kl_div(
        b.log_softmax(-1), a.log_softmax(-1), reduction="none", log_target=True
    ).sum(-1)
    torch.testing.assert_close(exact_kl(a, b), ref)
    assert exact_kl(a, b).shape == (3, 5)
    assert (exact_kl(a, b) >= 0).all()


def test_entropy_hand_values():
    v = 16
    assert entropy(torch.zeros(v)).item() == pytest.approx(math.log(v), abs=1e-6)
    assert entropy(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    two = entropy(torch.log(torch.tensor([0.25, 0.75]))).item()
    assert two == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    # negative control: the entropy of the sampled token alone (-log p) is not the entropy
    assert abs(two - (-math.log(0.75))) > 0.1


def test_masked_mean_and_token_logprobs():
    assert masked_mean(torch.tensor([1.0, 2.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])) == 1.5
    logits = torch.log(torch.tensor([[[0.2, 0.8], [0.6, 0.4]]]))
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    torch.testing.assert_close(lp, torch.log(torch.tensor([[0.8, 0.6]])))


# ---------------------------------------------------------------- task and policy


def test_task_rewards_and_encoding():
    task = AdditionTask(probe_size=8)
    tok = task.tokenizer
    pairs = torch.tensor([[7, 35], [7, 35], [7, 35], [99, 99]])

    def resp(text, eos=True):
        ids = tok.encode(text).ids + ([task.eos_id] if eos else [])
        return ids + [task.pad_id] * (task.max_response_len - len(ids))

    responses = torch.tensor([resp("42"), resp("042"), resp("42", eos=False), resp("198")])
    torch.testing.assert_close(task.rewards(pairs, responses), torch.tensor([1.0, 0, 0, 1]))
    prompts = task.encode_prompts(pairs[:1])
    assert prompts.shape == (1, task.prompt_len)
    assert prompts[0, 0].item() == task.bos_id
    assert tok.decode(prompts[0, 1:].tolist()) == "07+35="
    # the probe prompts are held out of the training pool
    probe = {tuple(p) for p in task.probe_pairs.tolist()}
    assert not probe & {tuple(p) for p in task.train_pairs.tolist()}


def test_sampling_mask_and_response_logits_alignment():
    task = AdditionTask(probe_size=8)
    policy = build_policy(task.vocab_size, seed=0, hidden_size=32, layers=1)
    prompts = task.encode_prompts(task.probe_pairs)
    responses, mask = sample_responses(
        policy, prompts, max_len=5, eos_id=task.eos_id, pad_id=task.pad_id,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert responses.shape == mask.shape == (8, 5)
    for row, m in zip(responses.tolist(), mask.tolist(), strict=True):
        n = int(sum(m))
        assert m == [1.0] * n + [0.0] * (5 - n)
        if task.eos_id in row[:n]:
            assert row.index(task.eos_id) == n - 1
            assert all(t == task.pad_id for t in row[n:])
    logits = response_logits(policy, prompts, responses)
    with torch.no_grad():
        full = policy(input_ids=torch.cat([prompts, responses], 1)).logits
    torch.testing.assert_close(logits[:, 0], full[:, prompts.shape[1] - 1].float())
    torch.testing.assert_close(logits[:, -1], full[:, -2].float())


# ---------------------------------------------------------------- verdict rule


def test_paired_interval_and_verdict_rule():
    diff, half, n = paired_interval([1.0, 2.0, 3.0], [0.0, 1.0, 1.0])
    assert n == 3 and diff == pytest.approx(4 / 3)
    sd = math.sqrt(((1 - 4 / 3) ** 2 * 2 + (2 - 4 / 3) ** 2) / 2)
    assert half == pytest.approx(4.303 * sd / math.sqrt(3))
    steps = [0, 1, 2]

    def curves(values):
        return [[math.nan, v, v] for v in values]

    results = {
        "methods": ["grpo", "reinforce", "proma"],
        "seeds": [0, 1, 2],
        "steps": steps,
        "metrics": {
            "grpo": {"val_reward": curves([0.5, 0.6, 0.7]), "kl_from_initial": curves([1, 1, 1]),
                     "entropy": curves([0.5, 0.5, 0.6]), "kl_successive": curves([2, 2, 2])},
            "reinforce": {"val_reward": curves([0.5, 0.6, 0.7]),
                          "kl_from_initial": curves([2.0, 2.1, 2.2]),
                          "entropy": curves([0.5, 0.5, 0.6]), "kl_successive": curves([1, 1, 1])},
            "proma": {"val_reward": curves([0.2, 0.3, 0.4]), "kl_from_initial": curves([1, 1, 1]),
                      "entropy": curves([0.5, 0.52, 0.58]), "kl_successive": curves([3, 1, 2])},
        },
    }  # fmt: skip
    v = verdicts(results)["proma"]
    assert v["a"]["verdict"] == "does not hold"  # 0.3 below grpo with zero spread
    assert v["b"]["verdict"] == "holds"  # 1.1 below reinforce, consistently
    assert v["c"]["verdict"] == "inconclusive"
    assert v["d"]["verdict"] == "inconclusive"


# ---------------------------------------------------------------- end to end


def test_cli_parses_options(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cfg, out, progress=True):
        seen.update(cfg=cfg, out=out)
        raise SystemExit(0)

    monkeypatch.setattr("proma_accum.demo.run", fake_run)
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--seeds", "3", "--methods", "grpo,proma", "--out", "x"])
    assert seen["cfg"].seeds == 3 and seen["cfg"].methods == ("grpo", "proma")
    assert seen["cfg"].steps == DemoConfig.quick().steps and seen["out"] == "x"
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "7", "--workers", "1"])
    assert seen["cfg"].steps == 7 and seen["cfg"].seeds == DemoConfig().seeds
    with pytest.raises(SystemExit) as err:
        main(["demo", "--methods", "ppo"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:  # an option without its command says which
        main(["--quick"])
    assert err.value.code == 2


def test_bare_cli_prints_help_listing_the_commands_and_runs_nothing(monkeypatch, capsys):
    def fake_run(cfg, out, progress=True):
        raise AssertionError("bare `proma-accum` started the demo")

    monkeypatch.setattr("proma_accum.demo.run", fake_run)
    assert main([]) == 0
    printed = capsys.readouterr().out
    assert "usage: proma-accum" in printed
    assert "demo" in printed and "plot" in printed


def test_python_m_proma_accum_demo_is_the_demo_command():
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "proma_accum.demo", "--help"], env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage: proma-accum demo" in done.stdout and "--quick" in done.stdout


def test_progress_labels_what_runs_and_starts_the_eta_clock_at_training():
    out = io.StringIO()
    bar = Progress(10, bar=True, file=out)
    bar.started("warm start seed 0")
    assert "warm start seed 0" in bar._bar.desc
    bar._bar.start_t -= 100.0  # a warm start of 100 s, during which no training step is made
    bar.finished("warm start seed 0", "done")
    bar.started("proma seed 0")
    assert bar._bar.desc == "proma seed 0"
    bar.step()
    # the ETA is remaining steps / average rate since the first training step, not since the
    # start (which would make it about 100 s x 9 remaining steps)
    assert bar._bar.format_dict["elapsed"] < 50
    bar.close()
    assert "done: warm start seed 0" in out.getvalue()


def test_progress_without_a_bar_prints_one_line_per_finished_run(capsys):
    bar = Progress(4, bar=False)
    for name in ("warm start seed 0", "grpo seed 0", "proma seed 0"):
        bar.started(name)
        bar.finished(name, "details")
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"done: {n} (0 s): details" for n in ("warm start seed 0", "grpo seed 0", "proma seed 0")
    ]


def test_quick_run_writes_well_formed_outputs(tmp_path, capsys, monkeypatch):
    # the --quick configuration, made smaller: 3 steps and a capped warm start (the outputs'
    # form is checked here, not the verdicts); two worker processes exercise the parallel path
    small = DemoConfig.quick(steps=3, warm_start_max_steps=50, workers=2)
    monkeypatch.setattr("proma_accum.demo.DemoConfig.quick", classmethod(lambda cls, **kw: small))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| metric |" in printed and "(d) [proma]" in printed
    done = [line for line in printed.splitlines() if line.startswith("done: ")]
    assert len(done) == 2 + 4 * 2  # --no-progress: a line per warm start and per run
    assert any(line.startswith("done: proma-exact seed 1 ") for line in done)
    png = (out / "figure.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    res = json.loads((out / "results.json").read_text())  # strict JSON (no NaN)
    assert {"config", "methods", "seeds", "steps", "metrics", "summary", "verdicts",
            "warm_start", "runtime_s", "table"} <= set(res)  # fmt: skip
    cfg = res["config"]
    assert res["methods"] == ["grpo", "reinforce", "proma", "proma-exact"]
    assert res["steps"] == list(range(cfg["steps"] + 1)) and cfg["steps"] == 3
    assert len(res["seeds"]) == cfg["seeds"] == 2
    for method in res["methods"]:
        metrics = res["metrics"][method]
        for name in ("val_reward", "val_reward_greedy", "kl_from_initial", "entropy",
                     "kl_successive", "kl_successive_running", "train_reward"):  # fmt: skip
            assert len(metrics[name]) == 2
            assert all(len(curve) == 4 for curve in metrics[name])
        assert all(c[0] == 0.0 for c in metrics["kl_from_initial"])  # step 0 = initial policy
        assert all(c[0] is None for c in metrics["kl_successive"])  # undefined at step 0
        assert all(0.0 <= r <= 1.0 for c in metrics["val_reward"] for r in c)
        assert all(x >= 0.0 for c in metrics["entropy"] for x in c)
    for method in ("proma", "proma-exact"):
        assert set(res["verdicts"][method]) == {"a", "b", "c", "d"}
        for entry in res["verdicts"][method].values():
            assert entry["verdict"] in {"holds", "does not hold", "inconclusive"}
    # every method starts from the same warm-started policy of its seed
    first = {m: [c[0] for c in res["metrics"][m]["entropy"]] for m in res["methods"]}
    assert len({tuple(v) for v in first.values()}) == 1
    # the figure is redrawn from results.json alone (NaN stored as null), without training
    assert main(["plot", str(out / "results.json"), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = make_figure(res)
    assert [ax.get_ylabel() for ax in fig.axes] == [ylabel for _, _, ylabel in PANELS]
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend over the curves
    assert len(fig.legends) == 1


def test_plot_command_refuses_a_file_that_is_not_demo_results(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('{"methods": []}')
    with pytest.raises(SystemExit) as err:
        main(["plot", str(bad)])
    assert err.value.code == 2
