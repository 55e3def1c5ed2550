"""Sequence ids for common batch layouts.

Every helper returns an ``int64`` tensor that can be passed to
``ProjectedAccumulator.microbatch(seq_ids)``. A non-negative entry is the id of the
sequence that a token (or row) belongs to; ``-1`` marks padding, which belongs to no
sequence. When the microbatch is given ``advantages``, they are indexed by these ids.

Layouts covered:

* padded rows, one sequence per row (``attention_mask`` of shape ``(B, T)``):
  :func:`from_attention_mask`;
* packed rows, several sequences per row, ``position_ids`` restarting at 0 for each
  sequence: :func:`from_position_ids`;
* flash-attention style packing described by cumulative sequence lengths:
  :func:`from_cu_seqlens`;
* VeRL's remove-padding layout (the tokens of ``B`` padded rows packed into one
  ``(1, nnz)`` row): :func:`from_remove_padding`.

All helpers keep the device of their input and never synchronise with it more than
needed for validation.
"""

from __future__ import annotations

import torch

__all__ = [
    "from_attention_mask",
    "from_cu_seqlens",
    "from_position_ids",
    "from_remove_padding",
]


def _check_tensor(
    x: object, name: str, *, ndim: int | None = None, allow_float: bool = False
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or (x.is_floating_point() and not allow_float):
        raise TypeError(f"{name} must be an integer or bool tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _check_mask(attention_mask: object, name: str = "attention_mask") -> torch.Tensor:
    mask = _check_tensor(attention_mask, name, ndim=2, allow_float=True)
    if mask.dtype != torch.bool:
        if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must contain only 0 and 1")
        mask = mask != 0
    return mask


def from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token ids for padded rows holding one sequence each.

    Args:
        attention_mask: ``(B, T)`` tensor of 0/1 (bool, integer or float); 1 marks a
            real token.
            Left, right or mixed padding are all fine.

    Returns:
        ``(B, T)`` int64 tensor: the row index ``b`` on real tokens of row ``b`` and
        ``-1`` on padding. A row without real tokens is all ``-1``.

    Example:
        >>> import torch
        >>> from proma_accum.sequence_ids import from_attention_mask
        >>> from_attention_mask(torch.tensor([[0, 1, 1], [1, 1, 0]]))
        tensor([[-1,  0,  0],
                [ 1,  1, -1]])
    """
    mask = _check_mask(attention_mask)
    rows = torch.arange(mask.shape[0], device=mask.device, dtype=torch.int64)
    ids = rows[:, None].expand(mask.shape)
    return torch.where(mask, ids, torch.full_like(ids, -1))


def from_position_ids(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token ids for packed rows (several sequences per row).

    A new sequence starts at the beginning of every row and wherever the position
    restarts at 0. Within a sequence the position must grow by exactly 1 per token.
    Ids are unique across the whole tensor and consecutive from 0, in row-major order
    of the sequences' first tokens.

    Args:
        position_ids: ``(B, T)`` integer tensor of non-negative positions.
        attention_mask: optional ``(B, T)`` 0/1 tensor; tokens where it is 0 get ``-1``
            and are not checked. Sequences made only of padding get no id.

    Returns:
        ``(B, T)`` int64 tensor of sequence ids (``-1`` on padding).

    Raises:
        ValueError: if the shape is wrong, a position is negative, or a position is
            neither 0 nor the previous token's position plus 1.

    Example:
        >>> import torch
        >>> from proma_accum.sequence_ids import from_position_ids
        >>> from_position_ids(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 0, 1]]))
        tensor([[0, 0, 0, 1, 1],
                [2, 2, 3, 4, 4]])
    """
    pos = _check_tensor(position_ids, "position_ids", ndim=2).to(torch.int64)
    mask = None
    if attention_mask is not None:
        mask = _check_mask(attention_mask)
        if mask.shape != pos.shape:
            raise ValueError(
                f"attention_mask must have the shape of position_ids {tuple(pos.shape)}, "
                f"got {tuple(mask.shape)}"
            )
    if pos.numel() == 0:
        return torch.empty(pos.shape, dtype=torch.int64, device=pos.device)
    real = mask if mask is not None else torch.ones_like(pos, dtype=torch.bool)
    if bool((pos[real] < 0).any()):
        raise ValueError("position_ids must be non-negative on real tokens")
    starts = pos == 0
    starts[:, 0] = True
    # Within a row, a token that does not start a sequence continues the previous one.
    cont = ~starts[:, 1:] & real[:, 1:] & real[:, :-1]
    bad = cont & (pos[:, 1:] != pos[:, :-1] + 1)
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            "position_ids must restart at 0 for each sequence and grow by 1 within it; "
            f"row {b}, column {t + 1}: {int(pos[b, t + 1])} follows {int(pos[b, t])}"
        )
    raw = torch.cumsum(starts.reshape(-1).to(torch.int64), 0) - 1
    raw = raw.reshape(pos.shape)
    if mask is None:
        return raw
    # Renumber so that ids stay consecutive once padding-only sequences are dropped.
    n_raw = int(raw[-1, -1]) + 1
    present = torch.zeros(n_raw, dtype=torch.bool, device=pos.device)
    present[raw[mask]] = True
    new_id = torch.cumsum(present.to(torch.int64), 0) - 1
    return torch.where(mask, new_id[raw], torch.full_like(raw, -1))


def from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """Per-token ids for one packed row described by cumulative sequence lengths.

    Sequence ``i`` occupies tokens ``cu_seqlens[i]:cu_seqlens[i + 1]`` and gets id ``i``
    (so advantages of shape ``(len(cu_seqlens) - 1,)`` are indexed directly). Empty
    sequences are allowed; their id does not occur. This is also the layout of a jagged
    ``torch.nested`` tensor: pass ``nested.offsets()``.

    Args:
        cu_seqlens: 1-D integer tensor ``[0, l_0, l_0 + l_1, ...]``, non-decreasing.
        total_len: optional row length ``>= cu_seqlens[-1]``; the tail after the last
            sequence (padding added e.g. for sequence parallelism) gets ``-1``.

    Returns:
        ``(1, total_len)`` int64 tensor (``total_len`` defaults to ``cu_seqlens[-1]``).

    Example:
        >>> import torch
        >>> from proma_accum.sequence_ids import from_cu_seqlens
        >>> from_cu_seqlens(torch.tensor([0, 2, 5]), total_len=6)
        tensor([[ 0,  0,  1,  1,  1, -1]])
    """
    cu = _check_tensor(cu_seqlens, "cu_seqlens", ndim=1).to(torch.int64)
    if cu.numel() == 0:
        raise ValueError("cu_seqlens must have at least one entry (a leading 0)")
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    nnz = int(cu[-1])
    if total_len is None:
        total_len = nnz
    elif isinstance(total_len, bool) or not isinstance(total_len, int):
        raise TypeError(f"total_len must be an int or None, got {type(total_len).__name__}")
    elif total_len < nnz:
        raise ValueError(f"total_len ({total_len}) must be >= cu_seqlens[-1] ({nnz})")
    ids = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu.device, dtype=torch.int64), lengths
    )
    pad = torch.full((total_len - nnz,), -1, dtype=torch.int64, device=cu.device)
    return torch.cat([ids, pad])[None, :]


def from_remove_padding(attention_mask: torch.Tensor, total_len: int | None = None) -> torch.Tensor:
    """Per-token ids for VeRL's remove-padding layout.

    With ``use_remove_padding`` the real tokens of ``B`` padded rows are packed, in
    row-major order, into one ``(1, nnz)`` row (``nnz = attention_mask.sum()``). The id of
    a packed token is the index of the row it came from, so per-row advantages of shape
    ``(B,)`` are indexed directly.

    Args:
        attention_mask: ``(B, T)`` 0/1 tensor of the padded batch (before unpadding).
        total_len: optional length of the packed row if it was padded after packing
            (e.g. to a multiple of the sequence-parallel size); the tail gets ``-1``.

    Returns:
        ``(1, total_len)`` int64 tensor equal to
        ``repeat_interleave(arange(B), attention_mask.sum(-1))`` followed by the padding.

    Example:
        >>> import torch
        >>> from proma_accum.sequence_ids import from_remove_padding
        >>> from_remove_padding(torch.tensor([[0, 1, 1], [1, 1, 1]]))
        tensor([[0, 0, 1, 1, 1]])
    """
    mask = _check_mask(attention_mask)
    lengths = mask.sum(-1, dtype=torch.int64)
    cu = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    return from_cu_seqlens(cu, total_len=total_len)
