"""Value codecs: round trips and loud failures on bad bytes."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import CodecError, codecs


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1),
                               st.integers(-1, 2**31 - 1)), max_size=50),
       dropped=st.integers(0, 2**32 - 1))
def test_sequence_round_trip(rows, dropped):
    ts, items, cats = (list(c) for c in zip(*rows)) if rows else ([], [], [])
    data = codecs.encode_sequence(ts, items, cats, dropped)
    assert len(data) == 7 + 20 * len(rows)
    dts, ditems, dcats, ddropped = codecs.decode_sequence(data)
    assert (dts.tolist(), ditems.tolist(), dcats.tolist(), ddropped) == (ts, items, cats, dropped)


@settings(max_examples=100, deadline=None)
@given(buckets=st.dictionaries(st.integers(0, 2**40), st.integers(0, 2**32 - 1), max_size=30),
       newest=st.integers(-1, 2**40))
def test_counter_round_trip(buckets, newest):
    ks = sorted(buckets)
    data = codecs.encode_counter(ks, [buckets[k] for k in ks], newest, 3)
    b, c, n, d = codecs.decode_counter(data)
    assert dict(zip(b.tolist(), c.tolist())) == buckets and (n, d) == (newest, 3)


def test_fixed_records_round_trip():
    assert codecs.decode_offset(codecs.encode_offset(2**62)) == 2**62
    assert codecs.decode_commit(codecs.encode_commit(5, 1_700_000_000_000, 42)) == (5, 1_700_000_000_000, 42)
    assert codecs.decode_item_counts(codecs.encode_item_counts([1, 2, 3, 4])) == (1, 2, 3, 4)
    assert codecs.decode_dwell_stats(codecs.encode_dwell_stats(0.0, -1, 1.5, 2.0, 0.25, 9)) == (
        0.0, -1, 1.5, 2.0, 0.25, 9)


@pytest.mark.parametrize("data,decoder,code", [
    (b"", codecs.decode_offset, "bad_length"),
    (b"\x02" + b"\x00" * 8, codecs.decode_offset, "unknown_version"),
    (codecs.encode_sequence([1], [2], [3], 0)[:-1], codecs.decode_sequence, "bad_length"),
    (codecs.encode_counter([1], [2], 1, 0) + b"\x00", codecs.decode_counter, "bad_length"),
    (b"\x01\x00", codecs.decode_sequence, "bad_length"),
    (b"\x09abc", codecs.decode_sketch, "unknown_version"),
])
def test_bad_bytes_raise_codec_error(data, decoder, code):
    with pytest.raises(CodecError, match=code):
        decoder(data)


def test_ragged_columns_rejected():
    with pytest.raises(CodecError):
        codecs.encode_sequence([1, 2], [1], [1, 2], 0)
