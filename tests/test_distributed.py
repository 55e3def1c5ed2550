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

The same rules hold for FSDP2 (``fully_shard``), where a synchronised running gradient is
sharded and is all-gathered before it is projected.
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


def spawn_ranks(main, world: int, *args, timeout: float = 240) -> dict[int, dict]:
    """Run ``main(rank, world, port, queue, *args)`` in ``world`` spawned processes; return each
    rank's result dict (failing the test with a rank's traceback if it reported an error)."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=main, args=(r, world, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = dict(queue.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank, res in out.items():
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    return out


@pytest.fixture(scope="module")
def results() -> dict[int, dict]:
    return spawn_ranks(worker.main, WORLD)


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


def _fsdp(results: dict, scenario: str) -> list[dict[str, torch.Tensor]]:
    return [_tensors(results[r][scenario]["grads"]) for r in range(WORLD)]


def test_fsdp2_sync_every_microbatch_removes_sum_of_rank_projections(results):
    """Reduce-scattered after every microbatch: the running gradient's shards are all-gathered
    and each rank removes W times its projection, as with DDP."""
    grads = _fsdp(results, "fsdp2_every")
    assert_close(grads[1], grads[0])
    assert_close(grads[0], simulate_synced(WORLD, multiplier=float(WORLD)))
    assert _rel(grads[0], simulate_synced(WORLD, multiplier=1.0)) > 1e-3  # negative control


def test_fsdp2_local_accumulation_gives_mean_of_per_rank_proma(results):
    """set_requires_gradient_sync(False) on all but the last microbatch: no extra collective."""
    grads = _fsdp(results, "fsdp2_local")
    assert_close(grads[1], grads[0])
    assert_close(grads[0], simulate_local(WORLD))
    assert _rel(grads[0], simulate_synced(WORLD, multiplier=float(WORLD))) > 1e-3


@pytest.mark.parametrize("scenario", ["fsdp2_mixed_local", "fsdp2_mixed_every"])
def test_fsdp2_mixed_precision_keeps_the_reduce_dtype_gradient(results, scenario):
    """float32 compute, float64 reduction: FSDP2 keeps the local running gradient in its
    reduce dtype, outside p.grad; PROMA must take it from there (not count it twice)."""
    grads = _fsdp(results, scenario)
    want = simulate_local(WORLD) if scenario.endswith("local") else None
    if want is None:
        want = simulate_synced(WORLD, multiplier=float(WORLD))
    assert_close(grads[1], grads[0])
    assert_close(grads[0], want)
    assert all(results[r][scenario]["updates"] > 0 for r in range(WORLD))


def test_fsdp2_failed_microbatch_restores_gradients(results):
    for r in range(WORLD):
        assert results[r]["fsdp2_every_fail"]["restored"] is True
    # ... and training goes on as if the failed attempt never happened
    grads = _fsdp(results, "fsdp2_every_fail")
    assert_close(grads[0], simulate_synced(WORLD, multiplier=float(WORLD)))


def test_fsdp2_one_process_is_plain_proma(results):
    for r in range(WORLD):
        assert_close(_tensors(results[r]["fsdp2_solo"]["grads"]), _single_rank(r))


def test_other_dtensor_parameters_are_refused_clearly(results):
    for r in range(WORLD):
        message = results[r]["tensor_parallel"]
        assert message is not None and "not managed by FSDP2" in message, message


def test_fsdp2_hooks_on_unsharded_copies_are_removed(results):
    for r in range(WORLD):
        res = results[r]["fsdp2_every"]
        assert res["copies"] == 7 and res["hooks_left"] == 0


def test_fsdp2_custom_divide_factor_is_refused(results):
    for r in range(WORLD):
        message = results[r]["fsdp2_divide_factor"]
        assert message is not None and "set_gradient_divide_factor" in message, message


@pytest.mark.parametrize(
    "scenario", ["qwen3_fsdp2_solo", "qwen3_fsdp2_solo_ckpt", "qwen3_fsdp2_solo_adv"]
)
def test_fsdp2_hf_model_matches_unsharded_proma(results, scenario):
    """Tiny tied-embedding Qwen3, FSDP2 on each decoder layer and the root (one rank): plain,
    with gradient checkpointing, and in advantages mode."""
    res = results[0][scenario]
    assert res["updates"] > 0
    assert len(res["errors"]) > 10 and max(res["errors"].values()) < 1e-5, res["errors"]


def test_fsdp1_is_refused_clearly(results):
    for r in range(WORLD):
        message = results[r]["fsdp1"]
        assert message is not None and "FSDP1" in message and "fully_shard" in message, message
