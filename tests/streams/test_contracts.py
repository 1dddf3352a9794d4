"""Event contracts: round trips, batch == per-message, precise reasons, partitioning by user."""
from __future__ import annotations

import doctest
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2

import streams.contracts as contracts
from streams.contracts import (
    ACTIVENESS_LEVELS,
    EVENT_TOPICS,
    Click,
    ContractError,
    Dwell,
    Feedback,
    FeedbackKind,
    Impression,
    activeness_code,
    decode,
    decode_batch,
    encode,
    encode_batch,
    from_records,
    key_for,
    kind_of,
    record_dtype,
    to_records,
    topic_for,
)

I64 = st.integers(0, 2**63 - 1)
U32 = st.integers(0, 2**32 - 1)
IDS = st.integers(0, 2**63 - 1)

impressions = st.builds(
    Impression, event_id=I64, ts_ms=I64, user_id=IDS, item_id=IDS, impression_id=I64,
    activeness=st.integers(0, len(ACTIVENESS_LEVELS) - 1), age_group=st.integers(-1, 127),
    item_duration_ms=U32, item_category=st.integers(-1, 2**31 - 1),
)
clicks = st.builds(Click, event_id=I64, ts_ms=I64, impression_id=I64, user_id=IDS, item_id=IDS)
dwells = st.builds(
    Dwell, event_id=I64, ts_ms=I64, impression_id=I64, user_id=IDS, item_id=IDS,
    dwell_ms=st.integers(0, 2**31 - 1),
)
feedbacks = st.builds(
    Feedback, event_id=I64, ts_ms=I64, user_id=IDS, item_id=IDS,
    kind=st.sampled_from(list(FeedbackKind)), impression_id=st.none() | I64,
)
STRATEGIES = {Impression: impressions, Click: clicks, Dwell: dwells, Feedback: feedbacks}
EXPECTED_SIZES = {Impression: 53, Click: 43, Dwell: 47, Feedback: 44}

CLICK = Click(event_id=1, ts_ms=1_000, impression_id=7, user_id=42, item_id=9)


def test_doctests_run_and_pass():
    result = doctest.testmod(contracts)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.parametrize("kind", list(STRATEGIES))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_round_trip_each_type(kind, data):
    event = data.draw(STRATEGIES[kind])
    value = encode(event)
    assert len(value) == EXPECTED_SIZES[kind]
    assert decode(value) == event
    assert decode(value, kind) == event
    assert type(decode(value)) is kind
    assert from_records(to_records([event], kind), kind) == [event]


@pytest.mark.parametrize("kind", list(STRATEGIES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_batch_decode_equals_per_message_decode(kind, data):
    """Valid events interleaved with arbitrary bytes and corrupted valid messages."""
    events = data.draw(st.lists(STRATEGIES[kind], max_size=20))
    values = [encode(e) for e in events]
    n_noise = data.draw(st.integers(0, 6))
    for _ in range(n_noise):
        pos = data.draw(st.integers(0, len(values)))
        if events and data.draw(st.booleans()):
            src = bytearray(encode(data.draw(st.sampled_from(events))))
            at = data.draw(st.integers(0, len(src) - 1))
            src[at] = data.draw(st.integers(0, 255))
            values.insert(pos, bytes(src))
        else:
            values.insert(pos, data.draw(st.binary(max_size=60) | st.none()))

    batch = decode_batch(values, kind)
    expected_rows, expected_errors = [], []
    for i, v in enumerate(values):
        try:
            expected_rows.append(decode(v, kind))
        except ContractError as exc:
            expected_errors.append((i, exc.reason))
    assert batch.errors == expected_errors
    assert from_records(batch.records, kind) == expected_rows
    # the joiner's unvalidated path gives the same events, field types included (repr shows them)
    assert [repr(e) for e in from_records(batch.records, kind, checked=True)] == [repr(e) for e in expected_rows]
    assert batch.records.dtype == record_dtype(kind)
    assert sorted(batch.index.tolist() + [i for i, _ in batch.errors]) == list(range(len(values)))


@pytest.mark.parametrize("kind", list(STRATEGIES))
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_encode_batch_matches_encode(kind, data):
    events = data.draw(st.lists(STRATEGIES[kind], max_size=30))
    assert encode_batch(to_records(events, kind), kind) == [encode(e) for e in events]


def _with(value: bytes, at: int, fmt: str, new) -> bytes:
    out = bytearray(value)
    struct.pack_into(fmt, out, at, new)
    return bytes(out)


DWELL_BYTES = encode(Dwell(event_id=1, ts_ms=5, impression_id=2, user_id=3, item_id=4, dwell_ms=100))
FEEDBACK_BYTES = encode(Feedback(event_id=1, ts_ms=5, user_id=3, item_id=4, kind=FeedbackKind.LIKE))
CLICK_BYTES = encode(CLICK)
MALFORMED = {
    "empty": (b"", "empty: 0 bytes"),
    "null": (None, "empty: null value"),
    "truncated_header": (b"\x5a\x01", "truncated: 2 bytes < 3-byte header"),
    "truncated_body": (CLICK_BYTES[:20], "wrong_length: 20 bytes for click v1 (expected 43)"),
    "too_long": (CLICK_BYTES + b"\x00", "wrong_length: 44 bytes for click v1 (expected 43)"),
    "wrong_magic": (b"\x00" + CLICK_BYTES[1:], "bad_magic: 0x00 (expected 0x5a)"),
    "unknown_version": (CLICK_BYTES[:1] + b"\x09" + CLICK_BYTES[2:], "unknown_version: 9 (known: [1])"),
    "unknown_type": (CLICK_BYTES[:2] + b"\x07" + CLICK_BYTES[3:], "unknown_type: 7 (known: 1..4)"),
    "negative_dwell": (_with(DWELL_BYTES, 43, "<i", -5), "invalid_field: dwell_ms=-5 < 0 (dwell v1)"),
    "negative_ts_dwell": (_with(DWELL_BYTES, 11, "<q", -1), "invalid_field: ts_ms=-1 < 0 (dwell v1)"),
    "feedback_kind_0": (_with(FEEDBACK_BYTES, 35, "<B", 0), "invalid_field: kind=0 < 1 (feedback v1)"),
    "feedback_kind_3": (_with(FEEDBACK_BYTES, 35, "<B", 3), "invalid_field: kind=3 > 2 (feedback v1)"),
    "feedback_impression_-2": (
        _with(FEEDBACK_BYTES, 36, "<q", -2), "invalid_field: impression_id=-2 < 0 (feedback v1)"
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_message_gives_precise_reason(name):
    value, reason = MALFORMED[name]
    with pytest.raises(ContractError) as info:
        decode(value)
    assert info.value.reason == reason
    assert info.value.code == reason.split(":")[0]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_batch_puts_only_the_malformed_row_in_errors(name):
    value, reason = MALFORMED[name]
    kind = Dwell if "dwell" in name else Feedback if "feedback" in name else Click
    good = {Dwell: DWELL_BYTES, Feedback: FEEDBACK_BYTES, Click: CLICK_BYTES}[kind]
    batch = decode_batch([good, value, good, good], kind)
    assert batch.errors == [(1, reason)]
    assert batch.index.tolist() == [0, 2, 3]
    assert from_records(batch.records, kind) == [decode(good)] * 3


def test_batch_rejects_a_valid_event_of_another_type():
    batch = decode_batch([CLICK_BYTES, DWELL_BYTES], Click)
    assert batch.errors == [(1, "wrong_type: dwell where click expected")]
    with pytest.raises(ContractError, match="wrong_type"):
        decode(DWELL_BYTES, Click)


def test_empty_batch_has_the_kind_dtype():
    batch = decode_batch([], Impression)
    assert batch.records.dtype == record_dtype(Impression) and len(batch.records) == 0
    assert batch.errors == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Dwell(1, 2, 3, 4, 5, dwell_ms=-1), "dwell_ms=-1 < 0"),
        (lambda: Click(1, -3, 3, 4, 5), "ts_ms=-3 < 0"),
        (lambda: Click(1, 2, 3, 2**63, 5), f"user_id={2**63} > {2**63 - 1}"),
        (lambda: Click(1, 2, 3, True, 5), "user_id=True is not an integer"),
        (lambda: Click(1, 2, 3, "4", 5), "user_id='4' is not an integer"),
        (lambda: Impression(1, 2, 3, 4, 5, activeness=len(ACTIVENESS_LEVELS)), "activeness=9 > 8"),
        (lambda: Impression(1, 2, 3, 4, 5, age_group=-2), "age_group=-2 < -1"),
        (lambda: Feedback(1, 2, 3, 4, kind=3), "kind=3 > 2"),
        (lambda: Feedback(1, 2, 3, 4, kind=1, impression_id=-1), "impression_id=-1 < 0"),
    ],
)
def test_constructor_rejects_bad_values_naming_them(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


def test_constructor_normalises_numpy_ints_and_feedback_kind():
    fb = Feedback(np.int64(1), 2, np.uint32(3), 4, kind=2)
    assert fb.kind is FeedbackKind.DISLIKE and type(fb.event_id) is int and type(fb.user_id) is int
    assert decode(encode(fb)) == fb


def test_encode_batch_rejects_out_of_range_rows():
    records = to_records([CLICK, CLICK], Click)
    records["ts_ms"][1] = -9
    with pytest.raises(ValueError, match=r"row 1: ts_ms=-9 outside"):
        encode_batch(records, Click)


def test_topics_and_kinds_agree():
    samples = {Impression: Impression(1, 2, 3, 4, 5), Click: CLICK, Dwell: decode(DWELL_BYTES),
               Feedback: decode(FEEDBACK_BYTES)}
    assert [topic_for(samples[kind_of(t)]) for t in EVENT_TOPICS] == list(EVENT_TOPICS)
    with pytest.raises(ValueError, match="topic='impressions.dlq'"):
        kind_of("impressions.dlq")


def test_activeness_codes():
    assert [activeness_code(n) for n in ACTIVENESS_LEVELS] == list(range(len(ACTIVENESS_LEVELS)))
    assert ACTIVENESS_LEVELS[0] == "UNKNOWN" and activeness_code("no_such_level") == 0


def _partition(key: bytes, n_partitions: int) -> int:
    # kafka-python's DefaultPartitioner: murmur2 of the serialized key, positive, modulo partitions
    return (murmur2(key) & 0x7FFFFFFF) % n_partitions


@settings(max_examples=100, deadline=None)
@given(user_id=U32, n_partitions=st.integers(1, 64), data=st.data())
def test_all_of_a_users_events_share_a_partition(user_id, n_partitions, data):
    events = [
        data.draw(impressions.map(lambda e: Impression(e.event_id, e.ts_ms, user_id, e.item_id, e.impression_id))),
        data.draw(clicks.map(lambda e: Click(e.event_id, e.ts_ms, e.impression_id, user_id, e.item_id))),
        data.draw(dwells.map(lambda e: Dwell(e.event_id, e.ts_ms, e.impression_id, user_id, e.item_id, 1))),
        data.draw(feedbacks.map(lambda e: Feedback(e.event_id, e.ts_ms, user_id, e.item_id, e.kind))),
    ]
    assert {key_for(e) for e in events} == {str(user_id).encode("ascii")}
    assert len({_partition(key_for(e), n_partitions) for e in events}) == 1


def test_users_spread_over_partitions():
    counts = np.bincount([_partition(key_for(Click(0, 0, 0, u, 0)), 8) for u in range(4000)], minlength=8)
    assert counts.min() > 350, counts  # 500 expected per partition


def test_decode_accepts_bytes_likes_and_names_other_types():
    assert decode(bytearray(CLICK_BYTES)) == CLICK == decode(memoryview(CLICK_BYTES))
    with pytest.raises(ContractError, match="not_bytes: str"):
        decode("Z" * 35)
