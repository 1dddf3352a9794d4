"""Sample contract: round trips, batch == per-message, padding/truncation, precise reasons, leakage."""
from __future__ import annotations

import doctest
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streams.contracts as contracts
import streams.samples as samples_module
from streams.contracts import Click, ContractError
from streams.samples import (
    FIXED_BYTES,
    SEQUENCE_KINDS,
    Sample,
    Snapshot,
    decode,
    decode_batch,
    encode,
    snapshot_is_point_in_time,
)

I64 = st.integers(0, 2**63 - 1)
CAT = st.integers(-1, 2**31 - 1)


@st.composite
def snapshots(draw, max_len: int = 12) -> Snapshot:
    kw = {}
    for kind in SEQUENCE_KINDS:
        n = draw(st.integers(0, max_len))
        kw[f"{kind}_items"] = tuple(draw(st.lists(I64, min_size=n, max_size=n)))
        kw[f"{kind}_cats"] = tuple(draw(st.lists(CAT, min_size=n, max_size=n)))
    empty = not any(kw[f"{k}_items"] for k in SEQUENCE_KINDS)
    newest = -1 if empty else draw(st.integers(0, 2**40))
    return Snapshot(**kw, newest_ts_ms=newest)


@st.composite
def samples(draw, max_len: int = 12) -> Sample:
    snap = draw(snapshots(max_len))
    ts = draw(st.integers(snap.newest_ts_ms + 1, 2**62))
    clicked = draw(st.booleans())
    return Sample(
        impression_id=draw(I64), ts_ms=ts, user_id=draw(I64), item_id=draw(I64),
        label_ts_ms=draw(st.integers(ts + 1, 2**63 - 1)), activeness=draw(st.integers(0, 8)),
        age_group=draw(st.integers(-1, 127)), item_duration_ms=draw(st.integers(0, 2**32 - 1)),
        item_category=draw(CAT), user_group=draw(st.integers(0, 2**31 - 1)), clicked=clicked,
        dwell_ms=draw(st.integers(-1, 2**31 - 1)), valid_read=clicked and draw(st.booleans()),
        rules=draw(st.integers(0, 255)),
        ndt_weight=draw(st.floats(allow_nan=False, allow_infinity=False, width=32)),
        liked=draw(st.booleans()), disliked=draw(st.booleans()), early=draw(st.booleans()), snapshot=snap)


def expected_matrix(sample_list, kind, t):
    """Plain reference for one sequence: left-aligned, newest t kept, zero padded."""
    items = np.zeros((len(sample_list), t), dtype=np.int64)
    cats = np.zeros((len(sample_list), t), dtype=np.int32)
    lengths = np.zeros(len(sample_list), dtype=np.int32)
    for b, s in enumerate(sample_list):
        its, cs = s.snapshot.sequence(kind)
        its, cs = its[max(0, len(its) - t):], cs[max(0, len(cs) - t):]
        items[b, :len(its)] = its
        cats[b, :len(cs)] = cs
        lengths[b] = len(its)
    return items, cats, lengths


def test_doctests_run_and_pass():
    result = doctest.testmod(samples_module)
    assert result.attempted >= 6 and result.failed == 0


@settings(max_examples=150, deadline=None)
@given(samples())
def test_round_trip(sample):
    value = encode(sample)
    assert len(value) % 8 == 0
    counts = [len(sample.snapshot.sequence(k)[0]) for k in SEQUENCE_KINDS]
    assert len(value) == FIXED_BYTES + sum(12 * n + 4 * (n % 2) for n in counts)
    assert decode(value) == sample


@settings(max_examples=60, deadline=None)
@given(st.lists(samples(), max_size=20), st.sampled_from([None, 1, 3, 16]), st.booleans())
def test_batch_equals_per_message(sample_list, seq_len, zero_padding):
    values = [encode(s) for s in sample_list]
    cols = decode_batch(values, seq_len=seq_len, zero_padding=zero_padding)
    assert cols.errors == [] and cols.index.tolist() == list(range(len(values)))
    decoded = [decode(v) for v in values]
    assert decoded == sample_list
    for name in ("impression_id", "ts_ms", "user_id", "item_id", "label_ts_ms", "activeness", "age_group",
                 "item_duration_ms", "item_category", "user_group", "clicked", "dwell_ms", "valid_read",
                 "rules", "liked", "disliked", "early"):
        assert cols.column(name).tolist() == [getattr(s, name) for s in decoded], name
    assert cols.column("ndt_weight").tolist() == [s.ndt_weight for s in decoded]
    assert cols.column("snapshot_ts_ms").tolist() == [s.snapshot.newest_ts_ms for s in decoded]
    longest = max([len(s.snapshot.sequence(k)[0]) for s in decoded for k in SEQUENCE_KINDS], default=0)
    t = seq_len if seq_len is not None else max(1, longest)
    for kind in SEQUENCE_KINDS:
        items, cats, lengths = expected_matrix(decoded, kind, t)
        got = cols.seq[kind]
        assert got.items.shape == (len(values), t) and got.items.dtype == np.int64
        assert got.cats.dtype == np.int32
        assert got.lengths.tolist() == lengths.tolist()
        mask = got.mask
        if zero_padding:
            assert np.array_equal(got.items, items) and np.array_equal(got.cats, cats)
        else:
            assert np.array_equal(got.items[mask], items[mask]) and np.array_equal(got.cats[mask], cats[mask])


BASE = Sample(impression_id=7, ts_ms=1_000, user_id=42, item_id=9, label_ts_ms=2_000, clicked=True,
              dwell_ms=12_000, valid_read=True, rules=9, ndt_weight=0.25,
              snapshot=Snapshot(click_items=(3, 5, 8), click_cats=(1, 1, 2), like_items=(5,), like_cats=(1,),
                                newest_ts_ms=900))


def patched(offset: int, fmt: str, value) -> bytes:
    raw = bytearray(encode(BASE))
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


MALFORMED = [
    (None, "empty: null value"),
    ("text", "not_bytes: str"),
    (b"", "empty: 0 bytes"),
    (b"\x00" + encode(BASE)[1:], "bad_magic: 0x00 (expected 0x5a)"),
    (b"\x5a\x01", "truncated: 2 bytes < 3-byte header"),
    (patched(1, "<B", 9), "unknown_version: 9 (known: [1])"),
    (contracts.encode(Click(1, 10, 5, 42, 9)), "wrong_type: 2 where sample (16) expected"),
    (encode(BASE)[:80], "truncated: 80 bytes < 88-byte fixed part"),
    (encode(BASE)[:-8], "wrong_length: 136 bytes; the counts need 144"),
    (encode(BASE) + bytes(8), "wrong_length: 152 bytes; the counts need 144"),
    (patched(76, "<H", 4), "wrong_length: 144 bytes; the counts need 152"),
    (patched(3, "<B", 0x40), "invalid_field: reserved bits set (flags=0x40)"),
    (patched(7, "<B", 1), "invalid_field: reserved bits set (flags=0x03)"),
    (patched(5, "<B", 9), "invalid_field: activeness=9 outside [0, 8]"),
    (patched(64, "<i", -2), "invalid_field: dwell_ms=-2 outside [-1, 2147483647]"),
    (patched(68, "<f", float("nan")), "invalid_field: ndt_weight=nan is not a finite number"),
    (patched(24, "<q", 1_000), "invalid_field: label_ts_ms=1000 <= ts_ms=1000"),
    (patched(3, "<B", 2), "invalid_field: valid_read=True but clicked=False"),
    (patched(32, "<q", 1_000), "leakage: snapshot newest_ts_ms=1000 >= ts_ms=1000"),
    (patched(32, "<q", -1), "invalid_field: newest_ts_ms=-1 but the snapshot has entries"),
]


@pytest.mark.parametrize("value,reason", MALFORMED)
def test_malformed_reasons(value, reason):
    with pytest.raises(ContractError) as info:
        decode(value)
    assert info.value.reason == reason


def test_batch_reports_the_same_reasons_in_place():
    good = encode(BASE)
    values = [good]
    for value, _reason in MALFORMED:
        values += [value, good]
    cols = decode_batch(values, seq_len=4)
    assert cols.errors == [(2 * i + 1, reason) for i, (_v, reason) in enumerate(MALFORMED)]
    assert cols.index.tolist() == list(range(0, len(values), 2))
    assert cols.seq["click"].items.tolist() == [[3, 5, 8, 0]] * len(cols)
    assert cols.column("valid_read").all() and cols.column("impression_id").tolist() == [7] * len(cols)


def test_event_decoder_rejects_samples():
    with pytest.raises(ContractError) as info:
        contracts.decode(encode(BASE))
    assert info.value.code == "unknown_type"


def test_truncation_keeps_newest_entries():
    cols = decode_batch([encode(BASE)], seq_len=2)
    assert cols.seq["click"].items.tolist() == [[5, 8]]
    assert cols.seq["click"].cats.tolist() == [[1, 2]]
    assert cols.seq["like"].items.tolist() == [[5, 0]] and cols.seq["unclick"].lengths.tolist() == [0]


def test_empty_batch():
    cols = decode_batch([], seq_len=5)
    assert len(cols) == 0 and cols.seq["click"].items.shape == (0, 5) and cols.errors == []


def test_constructor_rejects_leakage_and_inconsistent_labels():
    with pytest.raises(ValueError, match="leakage"):
        Sample(1, 1_000, 1, 1, 2_000, snapshot=Snapshot(click_items=(1,), click_cats=(1,), newest_ts_ms=1_000))
    with pytest.raises(ValueError, match="label_ts_ms"):
        Sample(1, 1_000, 1, 1, 1_000)
    with pytest.raises(ValueError, match="clicked=False"):
        Sample(1, 1_000, 1, 1, 2_000, valid_read=True)
    with pytest.raises(ValueError, match="2 items but 1 categories"):
        Snapshot(click_items=(1, 2), click_cats=(1,), newest_ts_ms=5)
    with pytest.raises(ValueError, match="item_id=-1"):
        Sample(1, 1_000, 1, -1, 2_000)


def test_point_in_time_check():
    assert snapshot_is_point_in_time(BASE)
    assert snapshot_is_point_in_time(BASE, entry_ts_ms=[100, 500, 900, 900])
    assert not snapshot_is_point_in_time(BASE, entry_ts_ms=[100, 1_000])  # at the impression: leak
    assert not snapshot_is_point_in_time(BASE, entry_ts_ms=[950])  # newer than the declared newest
    assert not snapshot_is_point_in_time(BASE, entry_ts_ms=[900], own_outcome_ts_ms=[900])  # own outcome


def fixed_rows(sample_list) -> np.ndarray:
    fixed = np.zeros(len(sample_list), dtype=samples_module.FIXED_DTYPE)
    for i, s in enumerate(sample_list):
        for name in ("impression_id", "ts_ms", "user_id", "item_id", "label_ts_ms", "activeness", "age_group",
                     "item_duration_ms", "item_category", "user_group", "dwell_ms", "rules", "ndt_weight", "flags"):
            fixed[name][i] = getattr(s, name)
    return fixed


@settings(max_examples=60, deadline=None)
@given(st.lists(samples(), max_size=15))
def test_encode_batch_equals_per_message(sample_list):
    values = samples_module.encode_batch(fixed_rows(sample_list), [s.snapshot for s in sample_list])
    assert values == [encode(s) for s in sample_list]


def test_encode_batch_rejects_bad_rows_with_the_decode_reason():
    fixed = fixed_rows([BASE, BASE])
    fixed["label_ts_ms"][1] = BASE.ts_ms
    with pytest.raises(ValueError, match="row 1: invalid_field: label_ts_ms=1000 <= ts_ms=1000"):
        samples_module.encode_batch(fixed, [BASE.snapshot, BASE.snapshot])
    late_snapshot = Snapshot(click_items=(1,), click_cats=(1,), newest_ts_ms=BASE.ts_ms)
    with pytest.raises(ValueError, match="row 0: leakage"):
        samples_module.encode_batch(fixed_rows([BASE]), [late_snapshot])


def test_snapshot_rejects_non_integers_and_out_of_range_ids():
    with pytest.raises(ValueError, match="1.5 is not an integer"):
        Snapshot(click_items=(1.5,), click_cats=(1,), newest_ts_ms=1)
    with pytest.raises(ValueError, match="-1 outside"):
        Snapshot(click_items=(-1,), click_cats=(1,), newest_ts_ms=1)
    with pytest.raises(ValueError, match="-2 outside"):
        Snapshot(click_items=(1,), click_cats=(-2,), newest_ts_ms=1)


def test_prechecked_snapshot_equals_the_checked_one():
    """The joiner's hot path builds snapshots without re-validation; the result must be the very
    snapshot the checked constructor builds (same fields, same order)."""
    import dataclasses

    from streams.samples import _SEQUENCE_FIELDS, Snapshot

    assert tuple(f.name for f in dataclasses.fields(Snapshot)) == (*_SEQUENCE_FIELDS, "newest_ts_ms")
    parts = [(1, 2), (5, -1), (3,), (7,), (), (), (9,), (0,)]
    checked = Snapshot(*parts, newest_ts_ms=42)
    assert Snapshot.prechecked(parts, 42) == checked
