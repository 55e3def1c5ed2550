"""One projected tensor's update in one microbatch: from the parameter hook to ``_proma``.

:func:`update_tensor` gathers the layer calls that gave the tensor a gradient in this backward,
decides whether the consistency check must run (and with which tolerance), builds the tensor's
:class:`~proma_accum._seq_grads.TensorSequenceGradients` and runs
:func:`~proma_accum._proma.accumulate_proma` on them.
"""

from __future__ import annotations

import torch
from torch import nn

from ._autograd import graph_task_id, hook_name, tensor_hooks
from ._consistency import Consistency, tolerance
from ._coverage import Coverage
from ._microbatch import MicrobatchState
from ._proma import Projection, UpdateInfo, accumulate_proma
from ._seq_grads import Observer, TensorSequenceGradients
from ._workspace import Workspace


def update_tensor(
    cov: Coverage,
    p: nn.Parameter,
    target: torch.Tensor,
    running: torch.Tensor | None,
    grad: torch.Tensor,
    state: MicrobatchState,
    *,
    projection: Projection,
    clamp: float | None,
    strength: float,
    world: int,
    chunk_bytes: int,
    workspace: Workspace,
    observer: Observer | None,
    compile: bool = False,
) -> tuple[torch.Tensor, UpdateInfo | None]:
    """The new running gradient of projected parameter ``p`` (``target``: the tensor whose
    gradient it is; under FSDP2 the unsharded copy), and the update's diagnostics.

    ``running`` is the running gradient before this microbatch (None: nothing accumulated),
    ``grad`` autograd's gradient of the tensor in this backward.
    """
    name = cov.names[p]
    layers = cov.uses[p]
    captures = [(cap, role) for m, role in layers for cap in state.captures.get(m, ())]
    # The user's hooks on the parameter ran before ours, on autograd's gradient.
    hooks = [hook_name(h) for h in tensor_hooks(target)]
    # Autograd's gradient *is* the sum our fused backward returned when that was the tensor's
    # only use and no hook replaced it: nothing to check then.
    verified = not hooks and any(cap.returned.get(role) is grad for cap, role in captures)
    # Calls whose output got a gradient in this backward (fused: whose backward formed the
    # sequence grads), not in an autograd.grad call before it.
    task = graph_task_id()
    uses = [(cap, role) for cap, role in captures if cap.has_gradient(role, task)]
    if not uses:
        raise RuntimeError(
            f"parameter '{name}' received a gradient in this microbatch but none of its "
            f"layers ({', '.join(cov.layers[m].name for m, _ in layers)}) ran a forward "
            "with grad inside the microbatch context: the weight was used outside its "
            "module (e.g. a fused LM head). Call the module itself, or exclude the "
            "parameter with exclude=[...]."
        )
    check = None
    if not (verified and len(uses) == 1):
        dtypes = [d for cap, _ in captures for d in cap.input_dtypes()]
        lowp = any(cap.layer.kernel.low_precision_accumulation for cap, _ in uses)
        per_token = any(cap.layer.kernel.per_token_rounding for cap, _ in uses)
        tokens = sum(cap.seg.token_seq.numel() for cap, _ in uses)
        limit = tolerance(target.dtype, dtypes, lowp, tokens, target.numel(), per_token)
        observed = [f"gradient hook(s) on the parameter: {', '.join(hooks)}"] if hooks else []
        observed += sorted(
            {
                f"layer '{cap.layer.name}' has {cap.checked_because}"
                for cap, _ in uses
                if cap.checked_because is not None
            }
        )
        check = Consistency(
            name, [type(cap.module).__name__ for cap, _ in uses], limit, observed=observed
        )
        state.checks.append(check)
    seq_grads = TensorSequenceGradients(
        name,
        target,
        uses,
        state.layout.num_sequences,
        grad,
        chunk_bytes=chunk_bytes,
        workspace=workspace,
        check=check,
        observer=observer,
    )
    try:
        return accumulate_proma(
            running,
            grad,
            seq_grads,
            projection=projection,
            clamp=clamp,
            strength=strength,
            advantages=state.advantages,
            world=world,
            compile=compile,
        )
    finally:
        seq_grads.release()
