"""Multi-process semantics, with 2 gloo processes on CPU, against single-process simulations.

Rule (W processes, engine averages gradients, rank r's microbatch gradient g_r, its sequences'
span P_r, running gradient A = p.grad before the microbatch):

* local accumulation (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync(False)`` on all but
  the last microbatch): each rank runs single-process PROMA on its own microbatches and the
  final synchronisation averages the results: ``mean_r PROMA(rank r's microbatches)``;
* gradients synchronised after every microbatch (A replicated): every rank removes its own
  projection scaled by W so that the average removes the sum of the per-rank projections,
  ``A ← A − Σ_r clamp_{c‖g_r‖/W}(P_r A) + mean_r g_r`` — single-process PROMA over the global
  microbatch whenever the ranks' spans are orthogonal, at no extra communication;
* one process: plain single-process PROMA.
"""

from __future__ import annotations

import functools
import socket
import sys

import _distributed_worker as worker
import pytest
import torch

from proma_accum.testing import accumulate_proma_reference, per_sequence_gradients

WORLD = 2
CLAMP = 0.5

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker.main, args=(r, WORLD, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        out = dict(queue.get(timeout=240) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank, res in out.items():
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    return out


def _tensors(d: dict[str, list]) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in d.items()}


@functools.cache
def _local_terms(rank: int, m: int):
    """Rank ``rank``'s per-sequence and microbatch gradients of microbatch ``m`` (float64)."""
    model = worker.make_model()
    params = list(model.parameters())
    seq = per_sequence_gradients(worker.sequence_losses(model, worker.microbatch(rank, m)), params)
    return seq, [s.sum(0) for s in seq]


def _names() -> list[str]:
    return [n for n, _ in worker.make_model().named_parameters()]


def simulate_local(world: int) -> dict[str, torch.Tensor]:
    """``mean_r`` of single-process PROMA over each rank's microbatches."""
    names = _names()
    total = [0.0] * len(names)
    for r in range(world):
        acc = [None] * len(names)
        for m in range(worker.MICROBATCHES):
            seq, mcb = _local_terms(r, m)
            acc = [
                accumulate_proma_reference(a, g, s, clamp=CLAMP)
                for a, g, s in zip(acc, mcb, seq, strict=True)
            ]
        total = [t + a for t, a in zip(total, acc, strict=True)]
    return {n: t / world for n, t in zip(names, total, strict=True)}


def simulate_synced(world: int, multiplier: float) -> dict[str, torch.Tensor]:
    """Averaged gradients after every microbatch, each rank removing ``multiplier`` times its
    projection clamped to ``c‖g_r‖ / multiplier``."""
    names = _names()
    acc: list = [None] * len(names)
    for m in range(worker.MICROBATCHES):
        new = [0.0] * len(names)
        for r in range(world):
            seq, mcb = _local_terms(r, m)
            for i in range(len(names)):
                if acc[i] is None:
                    new[i] = new[i] + mcb[i] / world
                    continue
                # A − clamp_{c‖g/μ‖}(P A) + g/μ, hence the removed part:
                part = accumulate_proma_reference(acc[i], mcb[i] / multiplier, seq[i], clamp=CLAMP)
                removed = acc[i] + mcb[i] / multiplier - part
                new[i] = new[i] + (acc[i] - multiplier * removed + mcb[i]) / world
        acc = new
    return dict(zip(names, acc, strict=True))


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n in want:
        err = float((got[n] - want[n]).norm())
        assert err <= 1e-6 + 1e-5 * float(want[n].norm()), (n, err, float(want[n].norm()))


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[n] - b[n]).norm() ** 2) for n in a)
    return (num / sum(float(b[n].norm() ** 2) for n in b)) ** 0.5


@pytest.mark.parametrize("scenario", ["local", "local_bucket_view"])
def test_no_sync_gives_mean_of_per_rank_proma(results, scenario):
    grads = [_tensors(results[r][scenario]) for r in range(WORLD)]
    assert_close(grads[1], grads[0])  # replicated after the final all-reduce
    assert_close(grads[0], simulate_local(WORLD))
    # negative control: not the plain (unprojected) average
    no_proma = {
        n: sum(
            sum(_local_terms(r, m)[1][i] for m in range(worker.MICROBATCHES)) for r in range(WORLD)
        )
        / WORLD
        for i, n in enumerate(_names())
    }
    assert _rel(grads[0], no_proma) > 1e-2


def test_one_process_is_plain_proma(results):
    for r in range(WORLD):
        got = _tensors(results[r]["solo"])
        assert_close(got, _single_rank(r))


def _single_rank(rank: int) -> dict[str, torch.Tensor]:
    names = _names()
    acc = [None] * len(names)
    for m in range(worker.MICROBATCHES):
        seq, mcb = _local_terms(rank, m)
        acc = [
            accumulate_proma_reference(a, g, s, clamp=CLAMP)
            for a, g, s in zip(acc, mcb, seq, strict=True)
        ]
    return dict(zip(names, acc, strict=True))


def test_sync_every_microbatch_removes_sum_of_rank_projections(results):
    grads = [_tensors(results[r]["every"]) for r in range(WORLD)]
    assert_close(grads[1], grads[0])
    assert_close(grads[0], simulate_synced(WORLD, multiplier=float(WORLD)))
    # negative control: without the scaling only 1/W of the projections would be removed
    assert _rel(grads[0], simulate_synced(WORLD, multiplier=1.0)) > 1e-3


def test_unwrapped_model_cannot_see_the_synchronisation(results):
    """Given the inner module, the accumulator cannot know DDP averages: each rank removes its
    unscaled projection (documented; pass the DDP wrapper instead)."""
    grads = _tensors(results[0]["every_unwrapped"])
    assert_close(grads, simulate_synced(WORLD, multiplier=1.0))


def test_fsdp2_is_refused_clearly(results):
    for r in range(WORLD):
        res = results[r]["fsdp2"]
        assert res["error"] is not None and "NotImplementedError" in res["error"], res
        assert "FSDP" in res["error"]
