"""Peak memory measurement.

PyTorch's CPU allocator keeps no statistics, and the resident set size (RSS) of a process is
coarse: it includes the interpreter, the libraries and whatever the C allocator keeps, and it
only reports the high-water mark of the whole process. Two measurements are therefore taken:

* :class:`LiveTensorBytes` (the primary figure): a ``TorchDispatchMode`` that sees every
  tensor created by an ATen operator while it is active (forward, backward, hooks and
  accumulator code alike), counts the bytes of each new storage until that storage is freed,
  and records the peak of the live total. Storages that existed before the mode was entered
  (parameters, and anything allocated earlier) are not counted, nor are scratch buffers that
  a kernel allocates and frees internally. The result is the peak of *extra* tensor memory
  of the measured code.
* :func:`peak_rss_bytes`: ``getrusage`` high-water mark of the (fresh) process.
"""

from __future__ import annotations

import resource
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Track the peak number of bytes held by tensor storages created while active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        if key in self._tracked:
            self._tracked.discard(key)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t._is_view():
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            nbytes = storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
