"""Per-layer kernels: the public extension point for covering your own layer kinds.

A kernel turns what a layer saw in one microbatch — its input and the gradient of its output,
with the sequence each token belongs to — into the per-sequence gradients of its parameters,
``(k + 1, *parameter.shape)``: row ``i < k`` is sequence ``i``'s gradient, row ``k`` the part
of tokens that belong to no sequence (``seq_ids == -1``). Register one for a module type with
:func:`register`; the accumulator then projects that type's parameters. Built-in kernels cover
``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, transformers' ``Conv1D``,
several RMSNorm classes and the sparse MoE blocks of Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE and
GraniteMoE; convolutions and group/instance norms are covered through Opacus's per-sample
gradients when each row is one sequence.

Lookup is by exact type (a subclass may compute something else): register subclasses
explicitly. Without a registered kernel, two kinds are judged by structure: ``nn.Embedding``
subclasses by their ``forward`` (``_kernels/embedding``), and norm-like modules — own parameters
all 1-D, no submodules, a one-argument forward — by differentiating their own forward token by
token (``_kernels/token_wise``). A registered kernel takes precedence (the ``Scale`` layer below
would be covered by structure too; its kernel is the cheaper analytic form).

Every kernel's result is checked against autograd's gradient before it is used (their sum must
match), so a wrong kernel raises :class:`proma_accum.IncompleteSequenceDataError`
instead of projecting silently wrong directions.

Example — a layer that scales its input feature-wise, ``y_t = w ⊙ x_t``, so that
``g_s(w) = Σ_{t ∈ s} b_t ⊙ x_t``::

    import torch
    from proma_accum import kernels

    class Scale(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * self.weight

    @kernels.register(Scale)
    class ScaleKernel(kernels.Kernel):
        kind = "scale"  # the group name in acc.stats()

        def seq_grads(self, use, rows, dtype):
            b = kernels.tokens(use.grad_out, 1, dtype)  # (N, d) output gradients
            x = kernels.tokens(use.x, 1, dtype)  # (N, d) inputs
            return kernels.segment_sum(b * x, use.seg)[:, rows]  # (k + 1, d)
"""

from ._kernels import Kernel, LayerUse, kernel_for, register
from ._kernels._base import Rows, tokens
from ._kernels.linear import outer_by_sequence
from ._layout import TokenSegments, segment, segment_sum

__all__ = [
    "Kernel",
    "LayerUse",
    "Rows",
    "TokenSegments",
    "kernel_for",
    "outer_by_sequence",
    "register",
    "segment",
    "segment_sum",
    "tokens",
]
