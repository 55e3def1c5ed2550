"""Large per-sequence gradient buffers get huge-page advice (Linux); contents are unaffected."""

from __future__ import annotations

import sys

import pytest
import torch

from proma_accum import _memory


def test_large_buffers_are_advised_in_whole_huge_pages(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "_madvise", lambda: lambda *a: calls.append(a) or 0)
    like = torch.zeros(1)
    small = _memory.new_empty(like, 4, 1000)
    assert small.shape == (4, 1000) and not calls
    big = _memory.new_empty(like, 3, _memory.MIN_BYTES // 8, dtype=torch.float64)
    assert big.dtype == torch.float64 and big.shape == (3, _memory.MIN_BYTES // 8)
    ((start, length, advice),) = calls
    assert advice == 14  # MADV_HUGEPAGE
    assert start % 2**21 == 0 and length % 2**21 == 0 and length > 0
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + 3 * _memory.MIN_BYTES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages: Linux")
def test_advised_buffer_is_backed_by_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge page support")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are disabled")
    buf = _memory.new_empty(torch.zeros(1), _memory.MIN_BYTES // 4)
    buf.fill_(1.0)
    address = -(-buf.data_ptr() // 2**21) * 2**21  # the advised part starts here
    huge_kb = None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                huge_kb = int(line.split()[1])
    assert huge_kb is not None and huge_kb > 0
    assert torch.all(buf == 1.0)
