"""``nn.Embedding``: ``y_t = W[id_t]``.

``g_s(W)[v] = Σ_{t ∈ s, id_t = v} b_t``: a sequence's gradient lives only on the rows of the ids it
contains, so the kernel works on the rows that occur in the microbatch (``touched_rows``). Tokens
equal to ``padding_idx`` get no gradient, as in ``torch.nn.functional.embedding``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register
from ._base import Kernel, LayerUse, Rows, tokens


@register(nn.Embedding)
class EmbeddingKernel(Kernel):
    kind = "embedding"

    def unsupported(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "nn.Embedding with max_norm renormalises the weight in place during forward"
        if module.scale_grad_by_freq:
            return "nn.Embedding with scale_grad_by_freq rescales by batch-wide id counts"
        if module.sparse:
            return "nn.Embedding with sparse=True produces sparse gradients"
        return None

    def lead_shape(self, module: nn.Module, x: torch.Tensor) -> torch.Size:
        return x.shape

    def touched_rows(self, use: LayerUse) -> torch.Tensor | None:
        # ``padding_idx`` may be among them: its tokens are masked out (``_positions``), so its
        # row stays zero. (Filtering it here would cost a host synchronisation.)
        return torch.unique(use.x)

    def seq_grads(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        n_rows = _row_index(rows, use.module, use.x.device).numel()
        grad_out = use.grad_out
        total = grad_out.new_zeros(use.num_sequences + 1, n_rows, grad_out.shape[-1], dtype=dtype)
        self.add_seq_grads(total, use, rows)
        return total

    def add_seq_grads(self, total: torch.Tensor, use: LayerUse, rows: Rows) -> None:
        ids = use.x.reshape(-1)
        b = tokens(use.grad_out, 1, total.dtype)
        rows = _row_index(rows, use.module, ids.device)
        n_rows = rows.numel()
        pos, keep = _positions(rows, ids, use.module)
        seg = use.seg
        k = seg.num_sequences
        seq = torch.where(seg.token_seq >= 0, seg.token_seq, k)
        flat = total.view((k + 1) * n_rows, -1)  # rows of (sequence, embedding row)
        # Tokens that do not contribute add zeros (masking instead of selecting them keeps the
        # shapes fixed: no host synchronisation).
        if n_rows:
            flat.index_add_(0, seq * n_rows + pos, torch.where(keep[:, None], b, 0.0))

    def grad_sum(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        """``Σ_t b_t`` into row ``id_t``: the plain embedding gradient on ``rows``."""
        ids = use.x.reshape(-1)
        rows = _row_index(rows, use.module, ids.device)
        pos, keep = _positions(rows, ids, use.module)
        b = tokens(use.grad_out, 1, dtype)
        total = b.new_zeros(rows.numel(), b.shape[-1])
        if rows.numel():
            total.index_add_(0, pos, torch.where(keep[:, None], b, 0.0))
        return total


def _positions(
    rows: torch.Tensor, ids: torch.Tensor, module: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, keep)``: each token's index into the sorted ``rows``, and whether the token
    contributes (its id is among ``rows`` and is not ``padding_idx``)."""
    n_rows = rows.numel()
    pos = torch.searchsorted(rows, ids).clamp_(max=max(n_rows - 1, 0))
    keep = rows[pos] == ids if n_rows else torch.zeros_like(ids, dtype=torch.bool)
    if module.padding_idx is not None:
        keep &= ids != module.padding_idx
    return pos, keep


def _row_index(rows: Rows, module: nn.Module, device: torch.device) -> torch.Tensor:
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(module.num_embeddings)
        return torch.arange(start, stop, device=device)
    return rows
