"""Large buffers for per-sequence gradients, backed by transparent huge pages where possible.

The per-sequence gradients of a big tensor (``(k + 1) ×`` the tensor) are allocated anew for
every microbatch. glibc serves allocations above 32 MiB with a fresh ``mmap``, so every 4 KiB
page of such a buffer faults on its first write: for the 151 MB of an LM head with 8 sequences
that costs several times the write itself. With ``madvise(MADV_HUGEPAGE)`` (the advice PyTorch
gives its own allocations when ``THP_MEM_ALLOC_ENABLE=1``) the kernel maps 2 MiB pages instead,
where transparent huge pages are enabled (``always`` or ``madvise``). The advice only changes
how pages are mapped, never the contents; where it is not available nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch

_HUGE_PAGE = 2**21
MIN_BYTES = 32 * 2**20  # glibc's largest mmap threshold: larger allocations always fault anew
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def new_empty(like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``like.new_empty(shape, dtype=dtype)``; a large CPU buffer gets huge-page advice."""
    out = like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= MIN_BYTES:
        madvise = _madvise()
        if madvise is not None:
            start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
            stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if stop > start:
                madvise(start, stop - start, _MADV_HUGEPAGE)  # advice: a failure changes nothing
    return out
