"""Which DeepSpeed setups keep the running gradient in ``p.grad``, and a clear refusal of the rest.

PROMA takes the running gradient of a parameter out of ``p.grad`` when the next microbatch's
gradient arrives. Under DeepSpeed that holds for:

* ZeRO-1 (``DeepSpeedZeroOptimizer`` without gradient partitioning): gradients accumulate in
  ``p.grad`` and are reduced at the gradient-accumulation boundary only, so each rank runs
  single-process PROMA and the boundary reduction averages the ranks (as DDP under
  ``no_sync``);
* stage 0 with a plain torch optimizer (fp32): likewise, DeepSpeed all-reduces at the boundary.

It does not hold, and the accumulator would silently become plain accumulation, for:

* ZeRO-2: after every backward the gradient is moved into the optimizer's partitioned
  buffers (``all_grad_tensors``) and ``p.grad`` is set to ``None``;
* ZeRO-3: parameters are partitioned (``ds_id``); layers see gathered copies;
* ZeRO-1 with a gradient-accumulation dtype other than the model's (``data_types.
  grad_accum_dtype``): the running gradient lives in ``param.grad_accum``;
* DeepSpeed's ``BF16_Optimizer`` (bf16 with fp32 gradient accumulation, at stage 0 or 1),
  which moves each microbatch's gradient into fp32 buffers and empties ``p.grad``, and its
  fp16 wrappers.

Those are refused here with ``NotImplementedError``. DeepSpeed is never imported: a model can
only be a DeepSpeed engine if the program already imported it. Checked against DeepSpeed
0.19.8 (``runtime/zero/stage_1_and_2.py``, ``runtime/bf16_optimizer.py``).
"""

from __future__ import annotations

import sys

from torch import nn

_USE_INSTEAD = (
    "Use ZeRO-1 (zero_optimization.stage=1, grad_accum_dtype equal to the model dtype) or "
    "FSDP2 (see the docs' DeepSpeed page)."
)


def _is_engine(model: nn.Module) -> bool:
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def refuse_unsupported_deepspeed(model: nn.Module) -> None:
    """Raise if ``model`` is (or is inside) a DeepSpeed engine whose running gradient does not
    stay in ``p.grad`` between microbatches; return quietly otherwise."""
    if not _is_engine(model):
        params = list(model.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            raise NotImplementedError(
                "model's parameters are partitioned by DeepSpeed ZeRO-3: the layers compute "
                "with gathered copies and the running gradient lives in DeepSpeed's partitions, "
                f"not in p.grad, so PROMA cannot project it. {_USE_INSTEAD}"
            )
        if any(hasattr(p, "grad_accum") and hasattr(p, "param_idx_in_group") for p in params):
            raise ValueError(
                "model is the inner module of a DeepSpeed ZeRO engine: pass the engine that "
                "deepspeed.initialize returned, so that the accumulator can check its ZeRO "
                "stage (under ZeRO-2 p.grad is emptied after every backward)"
            )
        return
    stage = int(model.zero_optimization_stage())
    optimizer = model.optimizer
    if stage >= 2:
        where = (
            "the optimizer's partitioned buffers (p.grad is None after every backward)"
            if stage == 2
            else "DeepSpeed's parameter partitions"
        )
        raise NotImplementedError(
            f"DeepSpeed ZeRO-{stage} is not supported: between microbatches the running "
            f"gradient lives in {where}, so PROMA would silently accumulate plainly. "
            f"{_USE_INSTEAD}"
        )
    name = type(optimizer).__name__
    if stage == 1 and name == "DeepSpeedZeroOptimizer":
        if getattr(optimizer, "use_grad_accum_attribute", False):
            raise NotImplementedError(
                "DeepSpeed ZeRO-1 with a gradient-accumulation dtype other than the model's "
                "(data_types.grad_accum_dtype) keeps the running gradient in param.grad_accum, "
                f"not p.grad. {_USE_INSTEAD}"
            )
        return
    if stage == 0 and not type(optimizer).__module__.startswith("deepspeed."):
        return  # a plain torch optimizer: DeepSpeed all-reduces p.grad at the boundary
    # BF16_Optimizer (bf16 with fp32 gradient accumulation, also chosen for ZeRO-1) moves each
    # microbatch's gradient into fp32 buffers and empties p.grad; FP16_Optimizer rescales.
    raise NotImplementedError(
        f"DeepSpeed stage {stage} with {name} keeps the running gradient outside p.grad "
        f"between microbatches, so PROMA would silently accumulate plainly. {_USE_INSTEAD}"
    )
