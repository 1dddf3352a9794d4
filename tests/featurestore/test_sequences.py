"""Bounded sequences: point-in-time reads against a reference that keeps every entry."""
from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from featurestore.sequences import UserSequence

EVENTS = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 10**6), st.integers(-1, 50)),
                  max_size=80)


def reference_before(events, ts_ms, n):
    """All events ever added, stably sorted by ts (ties in arrival order); last n with ts < ts_ms."""
    ordered = sorted(events, key=lambda e: e[0])
    return [e for e in ordered if e[0] < ts_ms][-n:] if n else []


def as_rows(s):
    return list(zip(s.ts_ms.tolist(), s.item_ids.tolist(), s.categories.tolist()))


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, capacity=st.integers(1, 20), query=st.integers(0, 210), n=st.integers(0, 20))
def test_before_never_returns_ts_at_or_after_query(events, capacity, query, n):
    seq = UserSequence(capacity)
    for ts, item, cat in events:
        seq.add(item, cat, ts)
    got = seq.before(query, n)
    assert len(got) <= min(n, capacity)
    assert all(t < query for t in got.ts_ms.tolist())
    assert got.ts_ms.tolist() == sorted(got.ts_ms.tolist())


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, capacity=st.integers(1, 20), query=st.integers(0, 210), n=st.integers(0, 20))
def test_before_is_exact_within_the_out_of_order_bound(events, capacity, query, n):
    """Exact whenever at most capacity - n added entries are at or after the query time."""
    assume(n <= capacity)
    assume(sum(1 for e in events if e[0] >= query) <= capacity - n)
    seq = UserSequence(capacity)
    for ts, item, cat in events:
        seq.add(item, cat, ts)
    assert as_rows(seq.before(query, n)) == reference_before(events, query, n)


@settings(max_examples=200, deadline=None)
@given(events=EVENTS, capacity=st.integers(1, 20))
def test_keeps_the_greatest_capacity_entries_whatever_the_arrival_order(events, capacity):
    seq = UserSequence(capacity)
    for ts, item, cat in events:
        seq.add(item, cat, ts)
    expected = sorted(events, key=lambda e: e[0])[-capacity:]
    assert as_rows(seq.latest(capacity)) == expected
    assert len(seq) == min(len(events), capacity)
    assert seq.n_dropped == len(events) - len(seq)


@settings(max_examples=100, deadline=None)
@given(events=EVENTS, capacity=st.integers(1, 20), smaller=st.integers(1, 20))
def test_bytes_round_trip_and_shrinking_capacity(events, capacity, smaller):
    seq = UserSequence(capacity)
    for ts, item, cat in events:
        seq.add(item, cat, ts)
    back = UserSequence.from_bytes(seq.to_bytes(), capacity)
    assert as_rows(back.latest(capacity)) == as_rows(seq.latest(capacity))
    assert back.n_dropped == seq.n_dropped
    shrunk = UserSequence.from_bytes(seq.to_bytes(), smaller)
    assert as_rows(shrunk.latest(smaller)) == as_rows(seq.latest(smaller))


def test_last_T_of_a_long_in_order_stream():
    seq = UserSequence(capacity=128)
    for i in range(1000):
        seq.add(item_id=i, category=i % 7, ts_ms=1_000 * i)
    got = seq.before(1_000 * 999, n=100)
    assert got.item_ids.tolist() == list(range(899, 999))
    items, cats, mask = got.padded(120)
    assert mask.sum() == 100 and not mask[:20].any() and items[-1] == 998 and cats[-1] == 998 % 7


@pytest.mark.parametrize("bad", [dict(ts_ms=-1), ])
def test_rejects_negative_time(bad):
    with pytest.raises(ValueError):
        UserSequence(4).add(1, 1, **bad)
