"""``nn.Embedding``: ``y_t = W[id_t]``.

``g_s(W)[v] = Σ_{t ∈ s, id_t = v} b_t``: a sequence's gradient lives only on the rows of the ids it
contains, so the kernel works on the rows that occur in the microbatch (``touched_rows``). Tokens
equal to ``padding_idx`` get no gradient, as in ``torch.nn.functional.embedding``.

Subclasses of ``nn.Embedding`` (:func:`subclass_kernel`) are judged by their ``forward``: one that
does not override it computes ``nn.Embedding``'s math and gets this kernel; one whose forward is
compiled from the same code as a known scaled form, ``super().forward(ids) * self.embed_scale``
(transformers' ``*ScaledWordEmbedding``: Gemma, Gemma 2/3, BART, ...), gets
:class:`ScaledEmbeddingKernel`, ``g_s(W)[v] = c Σ_{t ∈ s, id_t = v} b_t``; any other override is
refused with its reason (a subclass is never silently treated as its base).
"""

from __future__ import annotations

import torch
from torch import nn

from . import register
from ._base import Kernel, LayerUse, Rows, tokens


def _code_key(fn: object) -> tuple | None:
    """What identifies a function's code: bytecode, names, constants and local names."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return (code.co_code, code.co_names, code.co_consts, code.co_varnames, code.co_freevars)


@register(nn.Embedding)
class EmbeddingKernel(Kernel):
    kind = "embedding"
    low_precision_accumulation = True

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

    def token_grads(self, use: LayerUse, dtype: torch.dtype) -> torch.Tensor:
        """``(N, d)``: the gradient reaching each token's embedding row (the output gradient)."""
        return tokens(use.grad_out, 1, dtype)

    def add_seq_grads(self, total: torch.Tensor, use: LayerUse, rows: Rows) -> None:
        ids = use.x.reshape(-1)
        b = self.token_grads(use, total.dtype)
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

    def contribution_norm_sum(self, use: LayerUse) -> torch.Tensor:
        """``Σ_t ‖b_t‖`` over the tokens that contribute (not ``padding_idx``)."""
        norms = torch.linalg.vector_norm(self.token_grads(use, torch.float32), dim=1)
        if use.module.padding_idx is not None:
            norms = norms * (use.x.reshape(-1) != use.module.padding_idx)
        return norms.sum(dtype=torch.float64)

    def grad_sum(self, use: LayerUse, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
        """``Σ_t b_t`` into row ``id_t``: the plain embedding gradient on ``rows``."""
        ids = use.x.reshape(-1)
        rows = _row_index(rows, use.module, ids.device)
        pos, keep = _positions(rows, ids, use.module)
        b = self.token_grads(use, dtype)
        total = b.new_zeros(rows.numel(), b.shape[-1])
        if rows.numel():
            total.index_add_(0, pos, torch.where(keep[:, None], b, 0.0))
        return total


class _ScaledByBuffer(nn.Embedding):
    """Reference code of transformers' scaled embeddings (Gemma's): compared, never called."""

    def forward(self, input_ids: torch.Tensor):  # type: ignore[override]
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class _ScaledByAttribute(nn.Embedding):
    """Reference code of transformers' scaled embeddings (BART's): compared, never called."""

    def forward(self, input_ids: torch.Tensor):  # type: ignore[override]
        return super().forward(input_ids) * self.embed_scale


_SCALED_FORMS = {_code_key(_ScaledByBuffer.forward), _code_key(_ScaledByAttribute.forward)}


class ScaledEmbeddingKernel(EmbeddingKernel):
    """``y_t = c · W[id_t]`` with ``c = module.embed_scale`` (in the weight's dtype, as the
    forward multiplies): the embedding kernel with output gradients scaled by ``c``."""

    kind = "embedding"

    def unsupported(self, module: nn.Module) -> str | None:
        if _code_key(type(module).forward) not in _SCALED_FORMS:
            return (
                f"{type(module).__name__} subclasses nn.Embedding with a forward that is neither "
                "nn.Embedding's nor `super().forward(ids) * self.embed_scale`"
            )
        return super().unsupported(module)

    def token_grads(self, use: LayerUse, dtype: torch.dtype) -> torch.Tensor:
        module = use.module
        scale = module.embed_scale
        if not isinstance(scale, torch.Tensor):  # a float: rounded on the host, no device copy
            scale = float(torch.tensor(scale, dtype=module.weight.dtype))
        else:
            scale = scale.to(use.grad_out.device, module.weight.dtype)
        # The forward multiplies in W's dtype.
        scale = scale.to(dtype) if isinstance(scale, torch.Tensor) else scale
        return super().token_grads(use, dtype) * scale


_EMBEDDING = EmbeddingKernel()
_SCALED = ScaledEmbeddingKernel()


def subclass_kernel(cls: type) -> Kernel | None:
    """The kernel of an ``nn.Embedding`` subclass without a registered one (module docstring),
    else None."""
    if not issubclass(cls, nn.Embedding):
        return None
    if cls.forward is nn.Embedding.forward:
        return _EMBEDDING
    return _SCALED  # refuses, with its reason, any forward that is not a known scaled form


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
