"""Where per-sequence gradient buffers come from, and how many bytes of them are alive.

A :class:`Workspace` is the one store for per-sequence gradient memory of an accumulator: it
allocates the buffers (:meth:`Workspace.empty`), meters the bytes alive (live and peak, for
``stats()["peak_seq_grad_bytes"]``) and, on CPU, keeps the largest released buffer for the next
microbatch of the same optimizer step. It is passed explicitly to whatever allocates.

Why keep a buffer (CPU only): the per-sequence gradients of a big tensor (``(k + 1) ×`` the
tensor) are formed anew for every microbatch. glibc serves allocations above 32 MiB with a
fresh ``mmap``, so every 4 KiB page of such a buffer faults on its first write: for the 151 MB
of an LM head with 8 sequences that costs about a third of the batched GEMM that fills it.
(Transparent huge pages, ``madvise(MADV_HUGEPAGE)``, made the faults cheaper on average but,
on a VM, occasionally 2-3x slower than 4 KiB pages.) A GPU's caching allocator already reuses
memory without faults, so nothing is kept there.
"""

from __future__ import annotations

import torch

MIN_BYTES = 32 * 2**20  # glibc's largest mmap threshold: larger allocations always fault anew


class Workspace:
    """Allocates, meters and (CPU only) reuses per-sequence gradient buffers.

    Holds at most one kept buffer per shape, dtype and device; a request that none matches
    drops the kept buffers that differ from it in the first dim only (another number of
    sequences). ``live`` and ``peak`` count the bytes between :meth:`formed` and
    :meth:`released`.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self.live = 0
        self.peak = 0

    # ------------------------------------------------------------------ metering
    def formed(self, t: torch.Tensor) -> None:
        """Count ``t``'s bytes as alive."""
        self.live += t.numel() * t.element_size()
        self.peak = max(self.peak, self.live)

    def released(self, t: torch.Tensor, keep: bool = False) -> None:
        """Stop counting ``t``; with ``keep``, ``t`` (used by nobody else) may be kept for reuse."""
        self.live -= t.numel() * t.element_size()
        if keep:
            self._keep(t)

    def reset_meter(self) -> None:
        self.live = 0
        self.peak = 0

    # ------------------------------------------------------------------ buffers
    def __len__(self) -> int:
        """Number of buffers kept for reuse."""
        return len(self._free)

    def empty(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialised tensor: a kept buffer of this shape, dtype and device, or a new one."""
        numel = 1
        for n in shape:
            numel *= n
        if self._free and numel * dtype.itemsize >= MIN_BYTES:
            reused = self._take(tuple(shape), dtype, device)
            if reused is not None:
                return reused
        return torch.empty(shape, dtype=dtype, device=device)

    def clear(self) -> None:
        """Drop every kept buffer (a step starts or ends, or the accumulator detaches)."""
        self._free.clear()

    def _keep(self, t: torch.Tensor) -> None:
        if (
            t.device.type == "cpu"  # CPU only: see the module docstring
            and t.numel() * t.element_size() >= MIN_BYTES
            and t._base is None
            and t.is_contiguous()
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and not any(_same_kind(t, f) for f in self._free)
        ):
            self._free.append(t)

    def _take(
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


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
