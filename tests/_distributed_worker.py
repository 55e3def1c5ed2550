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


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a full tensor (all-gathers sharded ones: collective)."""
    return {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}


def run_fsdp2(
    rank: int,
    sync_every: bool,
    mesh=None,
    fail_at: int | None = None,
    mixed: bool = False,
) -> dict:
    """FSDP2 on the blocks and the root. ``fail_at``: that microbatch first fails after its
    backward (the grads must be restored), then runs again. ``mixed``: float64 parameters,
    float32 compute, float64 reduction (FSDP2 keeps the running gradient in float64)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from proma_accum import ProjectedAccumulator

    model = make_model()
    kwargs: dict = {} if mesh is None else {"mesh": mesh}
    if mixed:
        model.double()
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float64
        )
    for block in (model[1], model[4], model):
        fully_shard(block, **kwargs)
    acc = ProjectedAccumulator(model, clamp=0.5)
    out: dict = {"restored": None}
    with acc:
        for m in range(MICROBATCHES):
            model.set_requires_gradient_sync(sync_every or m == MICROBATCHES - 1)
            if m == fail_at:
                before = _full_grads(model)
                with contextlib.suppress(RuntimeError), acc.microbatch(torch.arange(ROWS)):
                    sequence_losses(model, microbatch(rank, m)).sum().backward()
                    raise RuntimeError("fails after the backward")
                if not sync_every:  # the local part is not in p.grad: reduce it to compare
                    model.set_requires_gradient_sync(True)
                after = _full_grads(model)
                out["restored"] = before.keys() == after.keys() and all(
                    torch.equal(before[n], after[n]) for n in before
                )
            with acc.microbatch(torch.arange(ROWS)):
                sequence_losses(model, microbatch(rank, m)).sum().backward()
    out["grads"] = {n: g.tolist() for n, g in _full_grads(model).items()}
    out["updates"] = acc.stats()["step"]["all"]["updates"]
    copies = [
        fp._unsharded_param
        for block in (model[1], model[4], model)
        for group in block._get_fsdp_state()._fsdp_param_groups
        for fp in group.fsdp_params
    ]
    out["hooks_left"] = sum(len(c._backward_hooks or {}) for c in copies)
    out["copies"] = len(copies)
    return out


def run_qwen3_fsdp2_solo(mesh, checkpointing: bool = False, advantages: bool = False) -> dict:
    """A tiny tied-embedding Qwen3 with FSDP2 on every decoder layer and the root, over one
    rank, against the same model without FSDP2: per-tensor relative gradient errors."""
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from proma_accum import ProjectedAccumulator

    cfg = Qwen3Config(
        vocab_size=VOCAB * 3,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
    )
    grads = []
    for sharded in (False, True):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.train()
        if sharded:
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        with ProjectedAccumulator(model, clamp=0.5) as acc:
            for m in range(MICROBATCHES):
                tokens = torch.randint(
                    0, VOCAB * 3, (ROWS, 6), generator=torch.Generator().manual_seed(m)
                )
                adv = torch.linspace(-1.0, 2.0, ROWS) + m if advantages else None
                with acc.microbatch(torch.arange(ROWS), advantages=adv):
                    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
                    loss = nn.functional.cross_entropy(
                        logits.transpose(1, 2), tokens[:, 1:], reduction="sum"
                    )
                    loss.backward()
        grads.append(
            {n: (p.grad.full_tensor() if sharded else p.grad) for n, p in model.named_parameters()}
        )
        updates = acc.stats()["step"]["all"]["updates"]
    plain, fsdp = grads
    return {
        "errors": {n: float((fsdp[n] - plain[n]).norm() / plain[n].norm()) for n in plain},
        "updates": updates,
    }


def run_fsdp1(rank: int) -> str | None:
    """FSDP1 is refused clearly (returns the error)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from proma_accum import ProjectedAccumulator

    model = FullyShardedDataParallel(make_model(), device_id=torch.device("cpu"))
    try:
        ProjectedAccumulator(model)
    except NotImplementedError as exc:
        return str(exc)
    return None


def run_fsdp2_divide_factor(rank: int) -> str | None:
    """A custom FSDP2 gradient divide factor breaks the averaging rule: refused clearly."""
    from torch.distributed.fsdp import fully_shard

    from proma_accum import ProjectedAccumulator

    model = make_model()
    fully_shard(model)
    model.set_gradient_divide_factor(1.0)
    try:
        with ProjectedAccumulator(model) as acc, acc.microbatch(torch.arange(ROWS)):
            sequence_losses(model, microbatch(rank, 0)).sum().backward()
    except ValueError as exc:
        return str(exc)
    return None


def run_tensor_parallel(rank: int, world: int) -> str | None:
    """A DTensor parameter not managed by FSDP2 must be refused (returns the error)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from proma_accum import ProjectedAccumulator

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    model[1].weight = nn.Parameter(distribute_tensor(model[1].weight.detach(), mesh, [Shard(0)]))
    try:
        ProjectedAccumulator(model)
    except NotImplementedError as exc:
        return str(exc)
    return None


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
        out["fsdp2_every"] = run_fsdp2(rank, sync_every=True)
        out["fsdp2_local"] = run_fsdp2(rank, sync_every=False)
        out["fsdp2_every_fail"] = run_fsdp2(rank, sync_every=True, fail_at=1)
        out["fsdp2_mixed_local"] = run_fsdp2(rank, sync_every=False, mixed=True)
        out["fsdp2_mixed_every"] = run_fsdp2(rank, sync_every=True, mixed=True)
        from torch.distributed.device_mesh import DeviceMesh

        out["fsdp2_solo"] = run_fsdp2(
            rank, sync_every=True, mesh=DeviceMesh.from_group(solo[rank], "cpu")
        )
        solo_mesh = DeviceMesh.from_group(solo[rank], "cpu")
        out["qwen3_fsdp2_solo"] = run_qwen3_fsdp2_solo(solo_mesh)
        out["qwen3_fsdp2_solo_ckpt"] = run_qwen3_fsdp2_solo(solo_mesh, checkpointing=True)
        out["qwen3_fsdp2_solo_adv"] = run_qwen3_fsdp2_solo(solo_mesh, advantages=True)
        out["tensor_parallel"] = run_tensor_parallel(rank, world)
        out["fsdp2_divide_factor"] = run_fsdp2_divide_factor(rank)
        out["fsdp1"] = run_fsdp1(rank)
    except Exception:
        out["error"] = traceback.format_exc()
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()
