"""PROMA in VeRL's FSDP2 training engine, against the installed ``verl`` package.

One gloo process on CPU runs ``PromaFSDPEngineWithLMHead`` (chosen through VeRL's engine
registry from a ``PromaFSDPEngineConfig``, as a VeRL config would) over a rollout of 6
sequences in 3 microbatches; the accumulated gradient is compared with
``proma_accum.testing.reference_accumulate`` on the same tiny Qwen3, with remove-padding on and
off. Negative control: the same engine without PROMA (plain accumulation) differs.
"""

from __future__ import annotations

import socket
import sys

import pytest
import torch

pytest.importorskip("verl", reason="needs the verl extra: pip install 'proma-accum[verl]'")

import _verl_worker as worker

from proma_accum.testing import assert_grads_close, reference_accumulate

pytestmark = [
    pytest.mark.verl,
    pytest.mark.skipif(
        not torch.distributed.is_available() or sys.platform == "win32",
        reason="needs torch.distributed with gloo",
    ),
]

SCENARIOS = [
    {"name": "proma_rmpad", "remove_padding": True, "proma": {"clamp": 0.5}, "bf16": False},
    {"name": "proma_padded", "remove_padding": False, "proma": {"clamp": 0.5}, "bf16": False},
    {"name": "plain_rmpad", "remove_padding": True, "proma": None, "bf16": False},
    {"name": "proma_bf16", "remove_padding": True, "proma": {"clamp": 0.5}, "bf16": True},
    {"name": "plain_bf16", "remove_padding": True, "proma": None, "bf16": True},
    {"name": "config", "kind": "config"},
    {"name": "fsdp1", "kind": "fsdp1"},
    {"name": "fused_kernels", "kind": "fused_kernels"},
    {"name": "bad_setting", "kind": "bad_setting"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results() -> dict:
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker.main, args=(0, 1, _free_port(), queue, SCENARIOS))
    proc.start()
    try:
        _, out = queue.get(timeout=600)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert "error" not in out, out["error"]
    return out


@pytest.fixture(scope="module")
def reference() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Brute-force PROMA over the engine's microbatches (consecutive rows, as VeRL splits
    without dynamic batch size)."""
    model = worker.tiny_qwen3()
    batch = worker.rollout(0)
    microbatches = [
        {k: v[i : i + worker.MICRO] for k, v in batch.items()}
        for i in range(0, worker.ROWS, worker.MICRO)
    ]
    expected = reference_accumulate(model, microbatches, worker.reference_losses, clamp=0.5)
    return model, expected


def _load(model: torch.nn.Module, grads: dict[str, list]) -> None:
    params = dict(model.named_parameters())
    assert grads.keys() == params.keys()
    for name, p in params.items():
        p.grad = torch.tensor(grads[name], dtype=p.dtype)


def _rel(grads: dict[str, list], expected: dict[str, torch.Tensor]) -> float:
    num = sum(
        float((torch.tensor(grads[n], dtype=torch.float64) - e).norm()) ** 2
        for n, e in expected.items()
    )
    return (num / sum(float(e.norm()) ** 2 for e in expected.values())) ** 0.5


@pytest.mark.parametrize("scenario", ["proma_rmpad", "proma_padded"])
def test_engine_matches_reference(results, reference, scenario):
    model, expected = reference
    res = results[scenario]
    assert res["engine"] == "PromaFSDPEngineWithLMHead"
    assert res["attached_after"] is False  # hooks only during the training batch
    assert res["step_stats"]["proma/microbatches"] == 3
    _load(model, res["grads"])
    assert_grads_close(model, expected)
    assert _rel(res["grads"], expected) < 1e-5


def test_plain_engine_differs_from_reference(results, reference):
    """Negative control: the registered engine with VeRL's own config accumulates plainly."""
    _, expected = reference
    res = results["plain_rmpad"]
    assert res["engine"] == "PromaFSDPEngineWithLMHead" and "step_stats" not in res
    assert _rel(res["grads"], expected) > 1e-2


def test_bf16_autocast_is_projected(results, reference):
    """VeRL's default bf16 autocast: PROMA runs, and its result is much nearer the float64
    reference than plain accumulation under the same autocast."""
    _, expected = reference
    proma, plain = results["proma_bf16"], results["plain_bf16"]
    assert proma["step_stats"]["proma/step/all/updates"] > 0
    assert _rel(proma["grads"], expected) < 0.1 * _rel(plain["grads"], expected)


def test_verl_config_selects_proma_for_the_actor_only(results):
    res = results["config"]
    assert res["actor_engine"] == "PromaFSDPEngineConfig" and res["strategy"] == "fsdp2"
    assert res["settings"] == {"clamp": 0.25, "exclude": ("lm_head.*",)}
    assert res["ref_engine"] == "FSDPEngineConfig"


def test_fsdp1_is_refused(results):
    message = results["fsdp1"]["error"]
    assert message.startswith("ValueError") and "strategy=fsdp2" in message, message


def test_fused_kernels_are_refused_without_leaking_hooks(results):
    res = results["fused_kernels"]
    assert res["error"].startswith("NotImplementedError"), res
    assert "use_fused_kernels" in res["error"]
    assert res["attached_after"] is False and res["grads_after"] == 0


def test_unknown_setting_is_refused(results):
    message = results["bad_setting"]["error"]
    assert message is not None and "fsdp_config.proma" in message and "'clip'" in message, message
