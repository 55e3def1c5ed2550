"""Worker for tests/test_distributed.py: runs in each of the gloo processes (spawned).

Results go back through a queue as nested lists (no shared-memory tensors), keyed by scenario.
"""

from __future__ import annotations

import contextlib
import os
import traceback
import warnings

import torch
from torch import nn

VOCAB, DIM, ROWS, LENGTH, MICROBATCHES = 11, 8, 3, 4, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(VOCAB, DIM),
        nn.Linear(DIM, DIM),
        nn.Tanh(),
        nn.LayerNorm(DIM),
        nn.Linear(DIM, VOCAB),
    )


def microbatch(rank: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s microbatch ``m``: ``ROWS`` sequences; row 0 revisits microbatch m - 1."""
    gen = torch.Generator().manual_seed(1000 * rank + m)
    x = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    y = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    if m > 0:
        px, py = microbatch(rank, m - 1)
        x[0], y[0] = px[0], py[0]
    return x, y


def sequence_losses(model: nn.Module, mb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = mb
    logits = model(x)
    return nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(-1)


def _grads(model: nn.Module) -> dict[str, list]:
    return {n: p.grad.tolist() for n, p in model.named_parameters() if p.grad is not None}


def run_ddp(
    rank: int, sync_every: bool, group=None, bucket_view: bool = False, wrapped: bool = True
) -> dict:
    from proma_accum import ProjectedAccumulator

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(
        model, process_group=group, gradient_as_bucket_view=bucket_view
    )
    # Given the DDP wrapper, the accumulator knows when gradients are synchronised.
    acc = ProjectedAccumulator(ddp if wrapped else model, clamp=0.5)
    with acc:
        for m in range(MICROBATCHES):
            sync = sync_every or m == MICROBATCHES - 1
            ctx = contextlib.nullcontext() if sync else ddp.no_sync()
            with ctx, acc.microbatch(torch.arange(ROWS)):
                x, y = microbatch(rank, m)
                logits = ddp(x)
                loss = nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="sum")
                loss.backward()
    return _grads(model)


def run_fsdp2(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from proma_accum import ProjectedAccumulator

    model = make_model()
    fully_shard(model)
    try:
        acc = ProjectedAccumulator(model, clamp=0.5)
        with acc:
            for m in range(MICROBATCHES):
                with acc.microbatch(torch.arange(ROWS)):
                    sequence_losses(model, microbatch(rank, m)).sum().backward()
        updates = acc.stats()["step"].get("all", {}).get("updates", 0.0)
        return {"updates": updates, "error": None}
    except Exception as exc:  # reported, not raised: the test decides
        return {"updates": 0.0, "error": f"{type(exc).__name__}: {exc}"}


def main(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict = {}
    try:
        out["local"] = run_ddp(rank, sync_every=False)
        out["local_bucket_view"] = run_ddp(rank, sync_every=False, bucket_view=True)
        out["every"] = run_ddp(rank, sync_every=True)
        out["every_unwrapped"] = run_ddp(rank, sync_every=True, wrapped=False)
        # one process per group: DDP over a group of size 1 must be plain PROMA
        solo = [dist.new_group([r]) for r in range(world)]
        out["solo"] = run_ddp(rank, sync_every=True, group=solo[rank])
        out["fsdp2"] = run_fsdp2(rank)
    except Exception:
        out["error"] = traceback.format_exc()
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()
