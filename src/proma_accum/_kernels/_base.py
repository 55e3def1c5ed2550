"""The interface every per-layer kernel implements."""

from __future__ import annotations

import torch
from torch import nn

from .._layout import TokenSegments

Rows = slice | torch.Tensor


class Kernel:
    """Per-sequence gradients of one layer kind.

    ``kind`` names the tensor group in statistics. Subclasses implement :meth:`seq_grads`.
    """

    kind: str = "?"
    # GEMM layers whose weight gradient can be formed as the sum of per-sequence gradients
    # (see ``_fused``); they implement ``input_grad``.
    fusable: bool = False

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

    def touched_rows(self, module: nn.Module, role: str, x: torch.Tensor) -> torch.Tensor | None:
        """Sorted indices of the parameter rows that can get gradient, or None for all rows."""
        return None

    def seq_grads(
        self,
        module: nn.Module,
        role: str,
        x: torch.Tensor,
        grad_out: torch.Tensor,
        seg: TokenSegments,
        rows: Rows,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Per-sequence gradients of ``module.<role>[rows]``: ``(k + 1, len(rows), ...)``.

        ``x`` is the saved input, ``grad_out`` the gradient of the layer output, both with the
        token dims given by ``seg``; the result is computed in ``dtype``.
        """
        raise NotImplementedError

    def grad_sum(
        self,
        module: nn.Module,
        role: str,
        x: torch.Tensor,
        grad_out: torch.Tensor,
        seg: TokenSegments,
        rows: Rows,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``seq_grads(...).sum(0)``: this use's gradient of ``module.<role>[rows]`` (padding
        tokens included), ``(len(rows), ...)``; kernels may form it without the split."""
        return self.seq_grads(module, role, x, grad_out, seg, rows, dtype).sum(0)

    def add_seq_grads(
        self,
        total: torch.Tensor,
        module: nn.Module,
        role: str,
        x: torch.Tensor,
        grad_out: torch.Tensor,
        seg: TokenSegments,
        rows: Rows,
    ) -> None:
        """``total += seq_grads(...)``; kernels may add in place without a temporary."""
        total.add_(self.seq_grads(module, role, x, grad_out, seg, rows, total.dtype))


def tokens(t: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    """Flatten all but the last ``features`` dims: ``(N, prod(feature dims))`` in ``dtype``."""
    lead = t.shape[: t.dim() - features] if features else t.shape
    return t.reshape(lead.numel(), -1).to(dtype)
