"""Reuse of the large per-sequence gradient buffers from one microbatch to the next.

The per-sequence gradients of a big tensor (``(k + 1) ×`` the tensor) are formed anew for every
microbatch. glibc serves allocations above 32 MiB with a fresh ``mmap``, so every 4 KiB page of
such a buffer faults on its first write: for the 151 MB of an LM head with 8 sequences that
costs about a third of the batched GEMM that fills it. A :class:`BufferPool` keeps a released
buffer of that size for the next microbatch of the same optimizer step (see
``ProjectedAccumulator`` for when it is emptied), and :func:`new_empty` takes it while the pool
is active. (Transparent huge pages, ``madvise(MADV_HUGEPAGE)``, made the faults cheaper on
average but, on a VM, occasionally 2-3x slower than 4 KiB pages.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

MIN_BYTES = 32 * 2**20  # glibc's largest mmap threshold: larger allocations always fault anew


class BufferPool:
    """Large buffers given back after use, for :func:`new_empty` to hand out again.

    Holds at most one buffer per shape, dtype and device; a request that none matches drops
    the buffers that differ from it in the first dim only (another number of sequences).
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._free)

    def give(self, t: torch.Tensor) -> None:
        """Keep ``t`` (which nothing else may use any more) if it is large and whole.

        CPU only: a GPU caching allocator already reuses the memory without faults.
        """
        if (
            t.device.type == "cpu"
            and t.numel() * t.element_size() >= MIN_BYTES
            and t._base is None
            and t.is_contiguous()
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and not any(_same_kind(t, f) for f in self._free)
        ):
            self._free.append(t)

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        for i, t in enumerate(self._free):
            if t.shape == shape and t.dtype == dtype and t.device == device:
                return self._free.pop(i)
        # The same tensor's buffer for another number of sequences will not be asked for again.
        self._free = [
            t
            for t in self._free
            if t.shape[1:] != shape[1:] or t.dtype != dtype or t.device != device
        ]
        return None

    def clear(self) -> None:
        self._free.clear()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within this context (and thread), :func:`new_empty` takes buffers from the pool."""
        previous = getattr(_ACTIVE, "pool", None)
        _ACTIVE.pool = self
        try:
            yield
        finally:
            _ACTIVE.pool = previous


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


_ACTIVE = threading.local()


def new_empty(like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``like.new_empty(shape, dtype=dtype)``, or inside :meth:`BufferPool.active` a pooled
    buffer of that shape, dtype and device (its contents are arbitrary, as with ``new_empty``).
    """
    dtype = dtype if dtype is not None else like.dtype
    pool: BufferPool | None = getattr(_ACTIVE, "pool", None)
    numel = 1
    for n in shape:
        numel *= n
    if pool is not None and len(pool) and numel * dtype.itemsize >= MIN_BYTES:
        reused = pool.take(tuple(shape), dtype, like.device)
        if reused is not None:
            return reused
    return like.new_empty(shape, dtype=dtype)
