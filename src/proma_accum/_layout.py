"""Which sequence each token of a microbatch belongs to.

A microbatch names its sequences with ``seq_ids``: shape ``(B,)`` (one sequence per row) or
``(B, T)`` (one id per token; several sequences may share a row, and ``-1`` marks tokens that
belong to no sequence). Ids are arbitrary non-negative integers; internally they are relabelled
to ``0 .. k-1`` in order of first appearance (row-major), so results do not depend on the labels,
and sequences stored one after another are contiguous blocks of tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class ShapeMismatchError(ValueError):
    """A hooked layer's input does not line up with the microbatch's ``seq_ids``."""


def warn_if_attention_mask(seq_ids: torch.Tensor, ids: torch.Tensor) -> None:
    """Warn when ``seq_ids`` looks like an attention mask passed by mistake.

    A ``(B, T)`` tensor of only 0 and 1 with ``B > 2`` rows names at most two sequences for
    ``B`` rows, which runs without error but is almost never meant. ``ids`` are the distinct ids
    present; its size is known without a device sync, so the values are read only in that rare
    case.
    """
    if seq_ids.dim() != 2 or seq_ids.shape[0] <= 2 or ids.numel() > 2:
        return
    if not set(ids.tolist()) <= {0, 1} or bool((seq_ids < 0).any()):
        return
    warnings.warn(
        f"seq_ids of shape {tuple(seq_ids.shape)} holds only 0 and 1, so its {seq_ids.shape[0]} "
        "rows are at most 2 sequences: is it an attention mask? For padded rows with one "
        "sequence each pass proma_accum.sequence_ids.from_attention_mask(attention_mask) "
        "(or torch.arange(B) for one id per row).",
        UserWarning,
        stacklevel=5,  # the user's `with acc.microbatch(...)` line
    )


@dataclass
class TokenSegments:
    """Tokens of one input shape grouped by sequence, for segmented (batched) GEMMs.

    ``token_seq``: ``(N,)`` dense sequence index of each flattened token, ``-1`` for none.
    ``gather``: ``(k, L)`` token indices of each sequence, padded with ``N`` (a zero row appended
    by the caller), so that ``cat([X, 0])[gather]`` is ``(k, L, d)``.
    ``rows_view``: when every row is exactly one sequence in order, ``(k, L)`` is just a view of
    the tokens (no gather needed) and this is True.
    """

    num_sequences: int
    token_seq: torch.Tensor
    gather: torch.Tensor | None
    rows_view: bool
    has_padding: bool


@dataclass
class SequenceLayout:
    """A validated ``seq_ids`` tensor and its relabelling to dense indices ``0 .. k-1``.

    Attributes:
        seq_ids: the user's tensor, ``(B,)`` or ``(B, T)``, int64.
        dense: same shape; dense index of each row/token's sequence, ``-1`` for padding.
        ids: ``(k,)`` the distinct ids present, in order of first appearance; ``ids[i]`` is
            dense index ``i`` (the order in which ``projection="gs2"`` visits sequences).
    """

    seq_ids: torch.Tensor
    dense: torch.Tensor
    ids: torch.Tensor
    _segments: dict[tuple[int, ...], TokenSegments] = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        return int(self.ids.numel())

    @classmethod
    def from_seq_ids(cls, seq_ids: object, device: torch.device | None) -> SequenceLayout:
        if not isinstance(seq_ids, torch.Tensor):
            raise TypeError(
                f"seq_ids must be an integer torch.Tensor of shape (B,) or (B, T), "
                f"got {type(seq_ids).__name__}"
            )
        if seq_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"seq_ids must have an integer dtype, got {seq_ids.dtype}")
        if seq_ids.dim() not in (1, 2) or seq_ids.numel() == 0:
            raise ValueError(
                f"seq_ids must have shape (B,) or (B, T) with B, T > 0, got {tuple(seq_ids.shape)}"
            )
        if device is not None and seq_ids.device != device:
            raise ValueError(
                f"seq_ids is on {seq_ids.device} but the model's parameters are on {device}"
            )
        seq_ids = seq_ids.long()
        if bool((seq_ids < -1).any()):
            raise ValueError("seq_ids must be >= -1 (-1 marks padding), got a smaller value")
        valid = seq_ids >= 0
        present = seq_ids[valid]  # row-major order
        by_value, inverse = torch.unique(present, sorted=True, return_inverse=True)
        positions = torch.arange(present.numel(), device=present.device)
        first = torch.full_like(by_value, present.numel()).scatter_reduce_(
            0, inverse, positions, "amin"
        )
        order = torch.argsort(first)  # dense index -> index into by_value
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        dense = torch.full_like(seq_ids, -1)
        dense[valid] = rank[inverse]
        warn_if_attention_mask(seq_ids, by_value)
        return cls(seq_ids=seq_ids, dense=dense, ids=by_value[order])

    def token_segments(self, lead_shape: torch.Size, layer: str) -> TokenSegments:
        """Segments for a layer input whose shape before the feature dim(s) is ``lead_shape``.

        ``lead_shape`` must start with ``seq_ids.shape``; further dims (heads, say) are extra
        tokens of the same sequence.
        """
        key = tuple(lead_shape)
        seg = self._segments.get(key)
        if seg is None:
            seg = self._build_segments(lead_shape, layer)
            self._segments[key] = seg
        return seg

    def _build_segments(self, lead_shape: torch.Size, layer: str) -> TokenSegments:
        ref = tuple(self.seq_ids.shape)
        if tuple(lead_shape[: len(ref)]) != ref:
            hint = ""
            if len(lead_shape) >= 1 and lead_shape[0] == 1 and ref[0] > 1:
                hint = (
                    " The input has a leading dim of 1 shared by every row, so its gradient "
                    "cannot be split by sequence; for position embeddings pass position_ids "
                    "expanded to (B, T), e.g. torch.arange(T).expand(B, T)."
                )
            raise ShapeMismatchError(
                f"layer '{layer}': input leading shape {tuple(lead_shape)} does not start with "
                f"seq_ids shape {ref}.{hint}"
            )
        extra = 1
        for s in lead_shape[len(ref) :]:
            extra *= int(s)
        token_seq = self.dense.reshape(-1, 1).expand(-1, extra).reshape(-1)
        k = self.num_sequences
        has_padding = bool((token_seq < 0).any())
        n = token_seq.numel()
        # Sequences stored one after another with equal lengths (one per row, or packed runs):
        # the tokens are a (k, L) view, no gather needed.
        if not has_padding and k > 0 and n % k == 0:
            expect = torch.arange(k, device=token_seq.device).repeat_interleave(n // k)
            if bool((token_seq == expect).all()):
                return TokenSegments(k, token_seq, None, True, False)
        valid = token_seq >= 0
        counts = torch.bincount(token_seq[valid], minlength=k)
        length = int(counts.max()) if k > 0 else 0
        order = torch.argsort(torch.where(valid, token_seq, k), stable=True)[: int(valid.sum())]
        starts = torch.cumsum(counts, 0) - counts
        seq_of = token_seq[order]
        pos = torch.arange(order.numel(), device=order.device) - starts[seq_of]
        gather = torch.full((k, length), n, dtype=torch.long, device=order.device)
        gather[seq_of, pos] = order
        return TokenSegments(k, token_seq, gather, False, has_padding)


def segment(x: torch.Tensor, seg: TokenSegments) -> torch.Tensor:
    """Group token rows ``x: (N, d)`` by sequence: ``(k, L, d)``, zero-padded."""
    if seg.rows_view:
        return x.view(seg.num_sequences, -1, x.shape[-1])
    assert seg.gather is not None
    n = x.shape[0]
    grouped = x.index_select(0, seg.gather.reshape(-1).clamp(max=n - 1))
    grouped = grouped.view(*seg.gather.shape, x.shape[-1])
    return grouped.masked_fill_((seg.gather == n).unsqueeze(-1), 0)


def padding_tokens(x: torch.Tensor, seg: TokenSegments) -> torch.Tensor:
    """The rows of ``x: (N, d)`` that belong to no sequence: ``(N_pad, d)``."""
    return x[seg.token_seq < 0]


def segment_sum(x: torch.Tensor, seg: TokenSegments) -> torch.Tensor:
    """Per-sequence sums of token rows ``x: (N, d)``: ``(k + 1, d)``; row ``k`` sums padding."""
    k = seg.num_sequences
    if seg.rows_view:
        out = x.new_zeros(k + 1, x.shape[-1])
        out[:k] = x.view(k, -1, x.shape[-1]).sum(1)
        return out
    index = torch.where(seg.token_seq >= 0, seg.token_seq, k)
    return x.new_zeros(k + 1, x.shape[-1]).index_add_(0, index, x)


def dense_advantages(advantages: object, layout: SequenceLayout) -> torch.Tensor | None:
    """Validate ``advantages`` (indexed by sequence id) and return them in dense sequence order:
    ``(k,)`` float64. None stays None (loss mode)."""
    if advantages is None:
        return None
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(
            f"advantages must be a 1-D float torch.Tensor, got {type(advantages).__name__}"
        )
    if not advantages.is_floating_point() or advantages.dim() != 1:
        raise TypeError(
            f"advantages must be a 1-D float tensor, got dtype {advantages.dtype} and "
            f"shape {tuple(advantages.shape)}"
        )
    if advantages.device != layout.ids.device:
        raise ValueError(
            f"advantages is on {advantages.device} but seq_ids is on {layout.ids.device}"
        )
    max_id = int(layout.ids.max()) if layout.num_sequences else -1
    if advantages.numel() <= max_id:
        raise ValueError(
            f"advantages has length {advantages.numel()} but is indexed by sequence id and "
            f"seq_ids contains id {max_id}: need length > {max_id}"
        )
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages must be finite (found nan or inf)")
    return advantages.double()[layout.ids]
