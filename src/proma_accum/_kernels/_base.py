"""The interface every per-layer kernel implements, and the one argument its methods take."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._layout import TokenSegments
from .._workspace import Workspace

Rows = slice | torch.Tensor


@dataclass(frozen=True)
class LayerUse:
    """One use of a layer's parameter in a microbatch: everything its kernel needs.

    Attributes:
        module: the layer (under FSDP2, the module whose parameters are unsharded copies).
        role: the parameter's attribute name on ``module`` (``"weight"``, ``"bias"``, ...).
        x: the layer's saved input, as the layer multiplied it (the autocast dtype applied),
            with token dims ``seg`` describes (``lead_shape``) before the feature dim(s).
        grad_out: the gradient of the layer's output, same token dims.
        seg: which sequence each token belongs to (``seg.token_seq: (N,)``, ``-1`` for none).
        workspace: where per-sequence gradient buffers come from (:meth:`empty`).
    """

    module: nn.Module
    role: str
    x: torch.Tensor
    grad_out: torch.Tensor
    seg: TokenSegments
    workspace: Workspace

    @property
    def num_sequences(self) -> int:
        return self.seg.num_sequences

    def empty(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised buffer on the output gradient's device, from the workspace."""
        return self.workspace.empty(tuple(shape), dtype, self.grad_out.device)


class Kernel:
    """Per-sequence gradients of one layer kind.

    ``kind`` names the tensor group in statistics. Subclasses implement :meth:`seq_grads`.
    """

    kind: str = "?"
    # GEMM layers whose weight gradient can be formed as the sum of per-sequence gradients
    # (see ``_fused``); they implement ``input_grad``.
    fusable: bool = False
    # Kernels that need one sequence per input row (``seq_ids`` of shape ``(B,)``): with
    # per-token ids their tensors are accumulated plainly in that microbatch.
    rows_only: bool = False
    # Whether torch's own backward for this layer kind accumulates the parameter gradient over
    # tokens in the parameter's dtype (measured on CPU: LayerNorm and Embedding do; Linear,
    # Conv1D and RMSNorm accumulate in float32), or rounds per-token intermediates to it where
    # the kernel recomputes them in float32 (MoE blocks). Autograd's half-precision gradient
    # then differs by up to ~u · Σ_t ‖c_t‖ (``contribution_norm_sum``), which the check allows.
    low_precision_accumulation: bool = False
    # Whether the layer forms each token's contribution to the parameter's gradient in the
    # parameter's half dtype and sums the rounded contributions in float32 (the RMSNorms'
    # ``w ⊙ x̂``): autograd's gradient then differs by about u · (Σ_t ‖c_t‖²)^½
    # (``contribution_sq_norm_sum``), which the check allows.
    per_token_rounding: bool = False

    def input_grad(
        self, module: nn.Module, grad_out: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def roles(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The module's own parameters this kernel covers, by attribute name."""
        return {
            name: p
            for name in ("weight", "bias")
            if isinstance(p := getattr(module, name, None), nn.Parameter)
        }

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module's parameters cannot be covered, or None."""
        return None

    def saved_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The forward input to keep: the first positional tensor, else the first tensor kwarg."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                return value
        raise TypeError("the layer was called without a tensor input")

    def lead_shape(self, module: nn.Module, x: torch.Tensor) -> torch.Size:
        """Shape of the token dims of input ``x`` (everything before the feature dim)."""
        return x.shape[:-1]

    def touched_rows(self, use: LayerUse) -> torch.Tensor | None:
        """Sorted indices of the parameter rows that can get gradient, or None for all rows."""
        return None

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        """Per-sequence gradients of ``use.module.<use.role>[rows]``: ``(k + 1, len(rows), ...)``.

        Row ``i < k`` is sequence ``i``'s gradient, row ``k`` the part of the tokens that belong
        to no sequence (``seg.token_seq == -1``); computed in ``dtype``.
        """
        raise NotImplementedError

    def grad_sum(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        """``seq_grads(...).sum(0)``: this use's gradient of ``module.<role>[rows]`` (padding
        tokens included), ``(len(rows), ...)``; kernels may form it without the split."""
        return self.seq_grads(use, rows, dtype).sum(0)

    def contribution_norm_sum(self, use: LayerUse) -> torch.Tensor:
        """``Σ_t ‖c_t‖``: the norms of each token's contribution ``c_t`` to the parameter's
        gradient, summed (a 0-d float64 tensor); the scale of a low-precision accumulation's
        rounding error. Needed by kernels with ``low_precision_accumulation``."""
        raise NotImplementedError

    def contribution_sq_norm_sum(self, use: LayerUse) -> torch.Tensor:
        """``Σ_t ‖c_t‖²`` (a 0-d float64 tensor): the scale of per-token rounding errors.
        Needed by kernels with ``per_token_rounding``."""
        raise NotImplementedError

    def add_seq_grads(self, total: torch.Tensor, use: LayerUse, rows: Rows) -> None:
        """``total += seq_grads(use, rows, total.dtype)``; kernels may add in place."""
        total.add_(self.seq_grads(use, rows, total.dtype))


def tokens(t: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    """Flatten all but the last ``features`` dims: ``(N, prod(feature dims))`` in ``dtype``."""
    lead = t.shape[: t.dim() - features] if features else t.shape
    return t.reshape(lead.numel(), -1).to(dtype)
