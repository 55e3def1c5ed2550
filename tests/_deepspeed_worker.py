"""Worker for tests/test_deepspeed.py: DeepSpeed on CPU (gloo), one spawned process per rank.

The model, microbatches and per-sequence losses are tests/_distributed_worker's. The training
loop is OpenRLHF's: per microbatch ``engine.backward(loss)`` then ``engine.step()`` (a no-op
before the gradient-accumulation boundary). Gradients are read with DeepSpeed's public
``safe_get_full_grad`` after the boundary backward, before the optimizer step.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
from _distributed_worker import MICROBATCHES, ROWS, make_model, microbatch, sequence_losses


def _config(stage: int, **zero: Any) -> dict:
    return {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": MICROBATCHES,
        "zero_optimization": {"stage": stage, **zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _initialize(config: dict):
    import deepspeed

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def run(rank: int, stage: int, proma: bool) -> dict:
    """Accumulate MICROBATCHES microbatches; return the (averaged, 1/GAS-scaled) gradients."""
    from deepspeed.utils import safe_get_full_grad

    from proma_accum import ProjectedAccumulator

    engine = _initialize(_config(stage))
    acc = ProjectedAccumulator(engine, clamp=0.5) if proma else None
    grads: dict[str, list] = {}
    with acc if acc is not None else _null():
        for m in range(MICROBATCHES):
            ctx = acc.microbatch(torch.arange(ROWS)) if acc is not None else _null()
            with ctx:
                engine.backward(sequence_losses(engine, microbatch(rank, m)).sum())
            if m == MICROBATCHES - 1:
                assert engine.is_gradient_accumulation_boundary()
                for name, p in engine.module.named_parameters():
                    grads[name] = safe_get_full_grad(p).double().tolist()
            engine.step()
    out: dict = {"grads": grads}
    if acc is not None:
        out["steps"] = acc.stats(flat=True)["proma/steps"]
        out["updates"] = acc.stats(flat=True)["proma/step/all/updates"]
    return out


def _null():
    import contextlib

    return contextlib.nullcontext()


def grad_after_backward(stage: int) -> bool:
    """Whether ``p.grad`` still holds the gradient after a non-boundary ``engine.backward``."""
    engine = _initialize(_config(stage))
    engine.backward(sequence_losses(engine, microbatch(0, 0)).sum())
    return all(p.grad is not None for p in engine.module.parameters())


def refusal(stage: int, inner: bool = False, extra: dict | None = None) -> str | None:
    """The error ``ProjectedAccumulator`` raises for this setup (None if it accepts it)."""
    from proma_accum import ProjectedAccumulator

    engine = _initialize({**_config(stage), **(extra or {})})
    try:
        ProjectedAccumulator(engine.module if inner else engine, clamp=0.5)
    except (NotImplementedError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def main(rank: int, world: int, port: int, queue: Any, scenarios: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    results: dict = {}
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        for sc in scenarios:
            if sc["kind"] == "run":
                results[sc["name"]] = run(rank, sc["stage"], sc["proma"])
            elif sc["kind"] == "grad_after_backward":
                results[sc["name"]] = grad_after_backward(sc["stage"])
            else:
                results[sc["name"]] = refusal(sc["stage"], **sc.get("options", {}))
    except BaseException:
        results["error"] = traceback.format_exc()
    finally:
        queue.put((rank, results))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
