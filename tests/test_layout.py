"""Sequence layouts: relabelling by first appearance, and views instead of copies."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proma_accum._layout import SequenceLayout, segment


def test_ids_in_order_of_first_appearance():
    layout = SequenceLayout.from_seq_ids(torch.tensor([[9, 9, 4, -1], [4, 7, 7, 7]]), None)
    assert layout.ids.tolist() == [9, 4, 7]
    assert layout.dense.tolist() == [[0, 0, 1, -1], [1, 2, 2, 2]]


def test_contiguous_equal_length_sequences_are_a_view():
    packed = torch.tensor([[5, 5, 5, 2, 2, 2], [8, 8, 8, 1, 1, 1]])  # arbitrary labels
    seg = SequenceLayout.from_seq_ids(packed, None).token_segments(torch.Size([2, 6, 4]), "x")
    assert seg.rows_view and seg.gather is None
    x = torch.randn(2 * 6 * 4, 3)
    assert segment(x, seg).data_ptr() == x.data_ptr()  # no copy
    rows = SequenceLayout.from_seq_ids(torch.tensor([3, 0, 2]), None)
    assert rows.token_segments(torch.Size([3, 5]), "x").rows_view


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1, 4), min_size=1, max_size=24), st.integers(1, 3))
def test_gathered_segments_hold_each_sequences_tokens(flat_ids, extra):
    ids = torch.tensor(flat_ids)
    layout = SequenceLayout.from_seq_ids(ids[None], None)
    seg = layout.token_segments(torch.Size([1, len(flat_ids), extra]), "x")
    x = torch.randn(len(flat_ids) * extra, 2)
    grouped = segment(x, seg)
    token_seq = layout.dense.reshape(-1, 1).expand(-1, extra).reshape(-1)
    for i in range(layout.num_sequences):
        want = x[token_seq == i].sum(0)
        torch.testing.assert_close(grouped[i].sum(0), want)
