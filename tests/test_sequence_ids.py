"""Tests for proma_accum.sequence_ids (layout helpers)."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proma_accum import sequence_ids as sid

settings.register_profile("proma_seq_ids", max_examples=60, deadline=None)
settings.load_profile("proma_seq_ids")

lengths_st = st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=8)


def _positions_from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None, :]


def _cu_from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


@st.composite
def masks(draw, min_rows=1):
    b = draw(st.integers(min_value=min_rows, max_value=6))
    t = draw(st.integers(min_value=1, max_value=9))
    bits = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    return torch.tensor(bits, dtype=torch.bool).reshape(b, t)


def test_doctests():
    failures, tried = doctest.testmod(sid, verbose=False)
    assert tried >= 4
    assert failures == 0


# ---------------------------------------------------------------- from_attention_mask


@given(masks())
def test_attention_mask_row_index_and_padding(mask):
    for m in (mask, mask.long(), mask.int(), mask.float()):
        ids = sid.from_attention_mask(m)
        assert ids.dtype == torch.int64 and ids.shape == mask.shape
        assert (ids[~mask] == -1).all()
        rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)
        assert torch.equal(ids[mask], rows[mask])


@given(masks())
def test_remove_padding_is_packed_attention_mask(mask):
    """Packing the per-row ids of real tokens row-major gives the remove-padding ids."""
    packed = sid.from_remove_padding(mask)
    assert packed.shape == (1, int(mask.sum()))
    assert torch.equal(packed[0], sid.from_attention_mask(mask)[mask])
    expected = torch.repeat_interleave(torch.arange(mask.shape[0]), mask.sum(-1))
    assert torch.equal(packed[0], expected)


@given(masks(), st.integers(min_value=0, max_value=5))
def test_remove_padding_total_len_pads_with_minus_one(mask, extra):
    nnz = int(mask.sum())
    ids = sid.from_remove_padding(mask, total_len=nnz + extra)
    assert ids.shape == (1, nnz + extra)
    assert (ids[0, nnz:] == -1).all()
    assert torch.equal(ids[:, :nnz], sid.from_remove_padding(mask))


# ---------------------------------------------- cu_seqlens <-> position_ids round trips


@given(lengths_st)
def test_cu_seqlens_and_position_ids_agree(lengths):
    from_cu = sid.from_cu_seqlens(_cu_from_lengths(lengths))
    from_pos = sid.from_position_ids(_positions_from_lengths(lengths))
    assert torch.equal(from_cu, from_pos)
    assert from_cu.shape == (1, sum(lengths))
    # sequence i has exactly lengths[i] tokens
    assert torch.bincount(from_cu[0]).tolist() == lengths


@given(lengths_st)
def test_position_ids_recover_cu_seqlens(lengths):
    ids = sid.from_position_ids(_positions_from_lengths(lengths))[0]
    counts = torch.bincount(ids)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    assert torch.equal(cu, _cu_from_lengths(lengths))


@given(masks())
def test_remove_padding_matches_cu_seqlens_and_positions(mask):
    lengths = mask.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    packed = sid.from_remove_padding(mask)
    assert torch.equal(packed, sid.from_cu_seqlens(cu))
    nonempty = [int(n) for n in lengths if n > 0]
    if nonempty:
        # position ids lose the ids of empty rows: compare after renumbering
        from_pos = sid.from_position_ids(_positions_from_lengths(nonempty))
        rows = torch.nonzero(lengths > 0).flatten()
        assert torch.equal(rows[from_pos], packed)


@given(st.lists(lengths_st, min_size=1, max_size=4), st.integers(min_value=0, max_value=4))
def test_position_ids_multi_row_ids_unique_and_consecutive(rows, pad):
    """Several packed rows (right-padded): ids are unique across rows, consecutive from 0."""
    width = max(sum(r) for r in rows) + pad
    pos = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        p = _positions_from_lengths(r)[0]
        pos[b, : p.numel()] = p
        mask[b, : p.numel()] = True
    ids = sid.from_position_ids(pos, attention_mask=mask)
    assert (ids[~mask] == -1).all()
    n_seq = sum(len(r) for r in rows)
    assert sorted(set(ids[mask].tolist())) == list(range(n_seq))
    # row by row, ids equal those of cu_seqlens shifted by the sequences of earlier rows
    offset = 0
    for b, r in enumerate(rows):
        row_ids = ids[b, mask[b]]
        assert torch.equal(row_ids, sid.from_cu_seqlens(_cu_from_lengths(r))[0] + offset)
        offset += len(r)
    # no row shares an id with another row
    for b in range(len(rows)):
        for c in range(b + 1, len(rows)):
            assert not set(ids[b, mask[b]].tolist()) & set(ids[c, mask[c]].tolist())


def test_position_ids_row_start_always_starts_sequence():
    # a row may begin mid-sequence (e.g. sequence-parallel slices): that is a new id
    ids = sid.from_position_ids(torch.tensor([[3, 4, 0, 1], [5, 0, 1, 2]]))
    assert ids.tolist() == [[0, 0, 1, 1], [2, 3, 3, 3]]


def test_position_ids_padding_only_sequences_dropped():
    pos = torch.tensor([[0, 1, 0, 0, 1]])
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    assert sid.from_position_ids(pos, mask).tolist() == [[0, 0, -1, 1, 1]]


@given(lengths_st, st.integers(min_value=0, max_value=5))
def test_cu_seqlens_total_len(lengths, extra):
    total = sum(lengths) + extra
    ids = sid.from_cu_seqlens(_cu_from_lengths(lengths), total_len=total)
    assert ids.shape == (1, total)
    assert (ids[0, sum(lengths) :] == -1).all()


def test_cu_seqlens_empty_sequences_keep_indices():
    ids = sid.from_cu_seqlens(torch.tensor([0, 2, 2, 3]))
    assert ids.tolist() == [[0, 0, 2]]


def test_cu_seqlens_from_nested_offsets():
    nt = torch.nested.nested_tensor([torch.arange(3), torch.arange(2)], layout=torch.jagged)
    assert sid.from_cu_seqlens(nt.offsets()).tolist() == [[0, 0, 0, 1, 1]]


def test_device_and_dtype_preserved():
    mask = torch.tensor([[1, 0]], dtype=torch.int32)
    for out in (
        sid.from_attention_mask(mask),
        sid.from_remove_padding(mask),
        sid.from_position_ids(torch.tensor([[0, 1]], dtype=torch.int32)),
        sid.from_cu_seqlens(torch.tensor([0, 1], dtype=torch.int32)),
    ):
        assert out.dtype == torch.int64
        assert out.device == mask.device


def test_empty_inputs():
    assert sid.from_attention_mask(torch.zeros(0, 3, dtype=torch.bool)).shape == (0, 3)
    assert sid.from_position_ids(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    assert sid.from_cu_seqlens(torch.tensor([0])).shape == (1, 0)
    assert sid.from_remove_padding(torch.zeros(2, 3, dtype=torch.long)).shape == (1, 0)


# ---------------------------------------------------------------- negative controls


@given(lengths_st.filter(lambda xs: len(xs) > 1))
def test_negative_control_plain_arange_is_one_sequence(lengths):
    """Treating a packed row as one sequence (ignoring restarts) disagrees."""
    cu_ids = sid.from_cu_seqlens(_cu_from_lengths(lengths))
    one_seq = sid.from_position_ids(torch.arange(sum(lengths))[None, :])
    assert not torch.equal(cu_ids, one_seq)
    assert (one_seq == 0).all()


@given(masks(min_rows=2))
def test_negative_control_padded_ids_differ_from_packed(mask):
    """The (B, T) padded ids are not the packed ids unless nothing is padded and B == 1."""
    if bool(mask.all()):
        return
    assert sid.from_attention_mask(mask).shape != sid.from_remove_padding(mask).shape


@pytest.mark.parametrize(
    ("fn", "arg", "exc", "name"),
    [
        (sid.from_attention_mask, [[1, 0]], TypeError, "attention_mask"),
        (sid.from_attention_mask, torch.full((2, 2), 0.5), ValueError, "attention_mask"),
        (
            sid.from_attention_mask,
            torch.ones(2, 2, dtype=torch.cfloat),
            TypeError,
            "attention_mask",
        ),
        (sid.from_attention_mask, torch.ones(2, dtype=torch.long), ValueError, "attention_mask"),
        (sid.from_attention_mask, torch.tensor([[0, 2]]), ValueError, "attention_mask"),
        (sid.from_remove_padding, torch.tensor([[1, -1]]), ValueError, "attention_mask"),
        (
            sid.from_remove_padding,
            torch.ones(1, 2, 3, dtype=torch.long),
            ValueError,
            "attention_mask",
        ),
        (sid.from_position_ids, torch.arange(4), ValueError, "position_ids"),
        (sid.from_position_ids, torch.tensor([[0.0, 1.0]]), TypeError, "position_ids"),
        (sid.from_position_ids, torch.tensor([[0, 1, 3]]), ValueError, "position_ids"),
        (sid.from_position_ids, torch.tensor([[0, 1, 1]]), ValueError, "position_ids"),
        (sid.from_position_ids, torch.tensor([[0, -1]]), ValueError, "position_ids"),
        (sid.from_cu_seqlens, torch.tensor([1, 3]), ValueError, "cu_seqlens"),
        (sid.from_cu_seqlens, torch.tensor([0, 3, 2]), ValueError, "cu_seqlens"),
        (sid.from_cu_seqlens, torch.tensor([[0, 3]]), ValueError, "cu_seqlens"),
        (sid.from_cu_seqlens, torch.tensor([], dtype=torch.long), ValueError, "cu_seqlens"),
        (sid.from_cu_seqlens, (0, 3), TypeError, "cu_seqlens"),
    ],
)
def test_bad_input_names_argument(fn, arg, exc, name):
    with pytest.raises(exc, match=name):
        fn(arg)


def test_bad_total_len():
    with pytest.raises(ValueError, match="total_len"):
        sid.from_cu_seqlens(torch.tensor([0, 3]), total_len=2)
    with pytest.raises(TypeError, match="total_len"):
        sid.from_cu_seqlens(torch.tensor([0, 3]), total_len=3.0)
    with pytest.raises(ValueError, match="total_len"):
        sid.from_remove_padding(torch.ones(2, 2, dtype=torch.long), total_len=3)


def test_bad_mask_for_position_ids():
    with pytest.raises(ValueError, match="attention_mask"):
        sid.from_position_ids(
            torch.tensor([[0, 1]]), attention_mask=torch.ones(1, 3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="attention_mask"):
        sid.from_position_ids(torch.tensor([[0, 1]]), attention_mask=torch.tensor([[1, 3]]))


def test_padding_not_checked_for_positions():
    # padding tokens may carry any position (HF fills left padding with 1)
    pos = torch.tensor([[1, 1, 0, 1, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert sid.from_position_ids(pos, mask).tolist() == [[-1, -1, 0, 0, 0]]


# ---------------------------------------------------------------- an attention mask as seq_ids


def _microbatch_warnings(seq_ids: torch.Tensor) -> list[warnings.WarningMessage]:
    """Run one microbatch of a tiny model with ``seq_ids`` and return the warnings raised."""
    from proma_accum import ProjectedAccumulator

    torch.manual_seed(0)
    b, t = seq_ids.shape[0], 5
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    tokens = torch.randint(0, 10, (b, t))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ProjectedAccumulator(model) as acc, acc.microbatch(seq_ids):
            model(tokens).sum().backward()
    return [w for w in caught if "attention mask" in str(w.message)]


def test_an_attention_mask_passed_as_seq_ids_warns_at_the_callers_line():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    caught = _microbatch_warnings(mask)
    assert len(caught) == 1
    assert "from_attention_mask" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the `with acc.microbatch(...)` line
    # all ones (no padding) is the same mistake: four rows named as one sequence
    assert len(_microbatch_warnings(torch.ones(4, 5, dtype=torch.long))) == 1


@pytest.mark.parametrize(
    "seq_ids",
    [
        sid.from_attention_mask(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1] * 5, [0] * 5])),
        torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),  # two rows: may well be two sequences
        torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]]),  # packed, three ids
        torch.tensor([[0, 0, 0, 0, -1], [1, 1, 1, 1, 1], [0, 0, 1, 1, -1]]),  # padding present
    ],
    ids=["from_attention_mask", "two-rows", "three-ids", "padded"],
)
def test_seq_ids_that_are_not_a_mask_do_not_warn(seq_ids):
    assert _microbatch_warnings(seq_ids) == []
