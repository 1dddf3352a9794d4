"""Key encoder: round trips, byte order equals numeric order, prefixes are contiguous ranges."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import KeyEncodingError, keys
from featurestore.keys import CounterKind, Family, SequenceKind

U64 = st.integers(0, keys.U64_MAX)
U32 = st.integers(0, keys.U32_MAX)
TOPIC = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789._-", min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(user_id=U64, kind=st.sampled_from(SequenceKind), counter=st.sampled_from(CounterKind),
       item_id=U64, shard=U32, topic=TOPIC, partition=U32)
def test_round_trips(user_id, kind, counter, item_id, shard, topic, partition):
    assert keys.decode_key(keys.user_sequence_key(user_id, kind)) == (
        Family.USER_SEQUENCE, (user_id, kind))
    assert keys.decode_key(keys.user_counter_key(user_id, counter)) == (
        Family.USER_COUNTER, (user_id, counter))
    assert keys.decode_key(keys.item_sketch_key(item_id)) == (Family.ITEM_SKETCH, (item_id,))
    assert keys.decode_key(keys.item_counts_key(item_id)) == (Family.ITEM_COUNTS, (item_id,))
    assert keys.decode_key(keys.global_dwell_key(shard)) == (Family.GLOBAL_DWELL, (shard,))
    assert keys.decode_key(keys.offset_key(topic, partition)) == (Family.OFFSET, (topic, partition))
    for kind in keys.JoinStateKind:
        assert keys.decode_key(keys.join_state_key(kind, item_id)) == (Family.JOIN_STATE, (kind, item_id))


@settings(max_examples=200, deadline=None)
@given(a=U64, b=U64, ka=st.sampled_from(SequenceKind), kb=st.sampled_from(SequenceKind))
def test_byte_order_is_numeric_order(a, b, ka, kb):
    assert (keys.item_sketch_key(a) < keys.item_sketch_key(b)) == (a < b)
    assert (keys.user_sequence_key(a, ka) < keys.user_sequence_key(b, kb)) == ((a, ka) < (b, kb))


@settings(max_examples=200, deadline=None)
@given(user_id=U64, other=U64, kind=st.sampled_from(SequenceKind))
def test_user_prefix_range_holds_exactly_that_users_sequences(user_id, other, kind):
    lo, hi = keys.prefix_range(keys.user_prefix(user_id))
    inside = lo <= keys.user_sequence_key(other, kind) and (hi is None or keys.user_sequence_key(other, kind) < hi)
    assert inside == (user_id == other)


@settings(max_examples=100, deadline=None)
@given(t1=TOPIC, t2=TOPIC, p=U32)
def test_topic_prefix_does_not_capture_other_topics(t1, t2, p):
    key = keys.offset_key(t2, p)
    assert key.startswith(keys.topic_prefix(t1)) == (t1 == t2)


def test_families_do_not_overlap():
    prefixes = {keys.family_prefix(f) for f in Family}
    assert len(prefixes) == len(Family)
    built = [keys.meta_key(b"commit"), keys.offset_key("a", 0), keys.user_sequence_key(0, 1),
             keys.user_counter_key(0, 1), keys.item_sketch_key(0), keys.item_counts_key(0),
             keys.global_dwell_key(0), keys.join_state_key(keys.JoinStateKind.HEADER)]
    assert [keys.decode_key(k)[0] for k in built] == list(Family)


@pytest.mark.parametrize("call", [
    lambda: keys.item_sketch_key(2**64), lambda: keys.user_sequence_key(-1, 1),
    lambda: keys.user_sequence_key(1, 9), lambda: keys.offset_key("bad topic", 0),
    lambda: keys.offset_key("t", -1), lambda: keys.item_counts_key(True),
    lambda: keys.decode_key(b""), lambda: keys.decode_key(b"\x7f"),
    lambda: keys.decode_key(keys.item_sketch_key(1)[:-1]), lambda: keys.meta_key(b""),
])
def test_rejects_bad_fields(call):
    with pytest.raises((KeyEncodingError, ValueError)):
        call()


def test_prefix_range_all_ff():
    assert keys.prefix_range(b"\xff\xff") == (b"\xff\xff", None)
    assert keys.prefix_range(b"\x10\x00\xff") == (b"\x10\x00\xff", b"\x10\x01")
