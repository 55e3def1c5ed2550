"""PROMA (Projected Microbatch Accumulation) for any PyTorch training loop.

While gradients are accumulated over microbatches, each parameter tensor's running gradient is
projected orthogonally to the span of the current microbatch's per-sequence gradients (clamped),
then the microbatch gradient is added — layer by layer, during the backward pass.

Where things live (public modules first):

* :class:`ProjectedAccumulator` (``_accumulator``): the facade — settings, the hook lifecycle,
  the ``microbatch()`` context (all-or-nothing, the data-parallel world) and the parameter hook;
  the open microbatch's state is in ``_microbatch``, the optimizer pass-through in
  ``_optimizer``.
* :mod:`proma_accum.kernels`: the public registry of per-layer kernels (``register``), the one
  argument they take (``LayerUse``) and helpers for writing one; the built-in kernels, one small
  file per layer kind, are in ``_kernels/``.
* :mod:`proma_accum.sequence_ids`: ``seq_ids`` for common batch layouts;
  :mod:`proma_accum.testing`: the brute-force reference the fast path is tested against;
  :mod:`proma_accum.integrations`: TRL and Hugging Face Trainer.
* ``_proma``: the algorithm, as the note's figures 1 and 3 (coefficients from the Gram matrix,
  the clamp); ``_numerics``: norms, the normalised Gram, the rank cut; ``_update``: one
  projected tensor's update in a microbatch (its layer calls, whether to check, then
  ``_proma``); ``_compiled``: ``compile=True``, the update as ``torch.compile``'d code.
* ``_coverage``: which tensors are projected, through which layers, and why others are not.
* ``_capture``: what a layer records in the forward (one ``Capture`` per call) and the fused
  path's decision; ``_fused``: the autograd Function of the fused path.
* ``_seq_grads``: one tensor's per-sequence gradients — chunk plan, forming, the Gram pass and
  the float32/float64 precision policy; ``_consistency``: the check that they sum to autograd's
  gradient, with its tolerance policy.
* ``_workspace``: per-sequence gradient buffers (allocation, byte meter, CPU buffer reuse).
* ``_distributed``: DDP and FSDP2 — where a running gradient lives, and every torch private read.
* ``_hooks``: every hook attached to the user's model, and their removal.
* ``_autograd``: what the autograd engine tells the hooks (graph tasks, ``AccumulateGrad``
  nodes, the user's tensor hooks, global module hooks), and every torch private read there.
* ``_layout``: ``seq_ids`` and ``advantages`` validation, token segments; ``_settings``:
  constructor validation; ``_stats``: diagnostics.
"""

from ._accumulator import ProjectedAccumulator
from ._consistency import IncompleteSequenceDataError
from ._layout import ShapeMismatchError
from ._microbatch import MicrobatchFailedError

__version__ = "0.1.0"

__all__ = [
    "IncompleteSequenceDataError",
    "MicrobatchFailedError",
    "ProjectedAccumulator",
    "ShapeMismatchError",
    "__version__",
]
