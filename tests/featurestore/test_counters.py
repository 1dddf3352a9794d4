"""Windowed event-time counters against a direct computation over every event."""
from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from featurestore.counters import WindowedCounter

DAY = 86_400_000
HOUR = 3_600_000


def direct(events, ts_ms, bucket_ms, window_buckets):
    hi = ts_ms // bucket_ms
    return sum(n for t, n in events if hi - window_buckets <= t // bucket_ms <= hi)


@st.composite
def late_bounded_stream(draw):
    """Events whose lateness relative to the newest event so far stays within late_buckets."""
    bucket_ms = draw(st.sampled_from([HOUR, DAY, 1000]))
    window = draw(st.integers(1, 10))
    late = draw(st.integers(0, 4))
    events, newest = [], 0
    for _ in range(draw(st.integers(0, 60))):
        if draw(st.booleans()):
            newest += draw(st.integers(0, 3 * bucket_ms))
            ts = newest
        else:
            floor = max(0, (newest // bucket_ms - late) * bucket_ms)
            ts = draw(st.integers(floor, newest))
        events.append((ts, draw(st.integers(1, 3))))
    return bucket_ms, window, late, events


@settings(max_examples=300, deadline=None)
@given(case=late_bounded_stream(), probe=st.integers(0, 10))
def test_windowed_count_matches_direct_computation(case, probe):
    bucket_ms, window, late, events = case
    c = WindowedCounter(bucket_ms, window, late)
    for ts, n in events:
        c.add(ts, n)
    assert c.n_dropped == 0
    newest = max((t for t, _ in events), default=0)
    # every query whose window lies inside the retained range is exact
    for back in range(0, late + 1):
        q = max(0, newest - back * bucket_ms - probe * (bucket_ms // 11))
        if q // bucket_ms >= newest // bucket_ms - late:
            assert c.count(q) == direct(events, q, bucket_ms, window)
    assert c.latest_count() == (direct(events, newest, bucket_ms, window) if events else 0)


@settings(max_examples=200, deadline=None)
@given(ts=st.lists(st.one_of(st.integers(0, 30 * DAY), st.integers(0, 30).map(lambda h: h * HOUR)), max_size=80),
       query=st.one_of(st.integers(0, 31 * DAY), st.integers(7 * 24, 7 * 24 + 30).map(lambda h: h * HOUR + 1)))
@example(ts=[0], query=7 * DAY)                            # the window's oldest instant is counted
@example(ts=[3 * DAY + 29 * 60_000], query=10 * DAY + 30 * 60_000)  # in the bucket below the 168
def test_seven_day_window_brackets_the_exact_trailing_count(ts, query):
    """Hourly buckets over 168 h: the count covers [q - 7d, q] and overshoots by < 1 h each side."""
    c = WindowedCounter(HOUR, 168, late_buckets=10**4)  # retain everything: isolate the window rule
    for t in ts:
        c.add(t)
    exact = sum(1 for t in ts if query - 7 * DAY <= t <= query)
    loose = sum(1 for t in ts if query - 7 * DAY - HOUR < t < query + HOUR)
    assert exact <= c.count(query) <= loose


def test_too_late_events_are_counted_as_dropped_and_round_trip():
    c = WindowedCounter(DAY, 7, late_buckets=1)
    c.add(20 * DAY)
    c.add(11 * DAY)             # bucket 11 = 20 - 9: outside window (7 + 1 buckets) + lateness
    c.add(12 * DAY, n=2)        # bucket 12 = 20 - 8: kept (late bucket)
    assert c.n_dropped == 1 and c.count(20 * DAY) == 1 and c.count(19 * DAY) == 2
    back = WindowedCounter.from_bytes(c.to_bytes(), DAY, 7, 1)
    assert (back.count(19 * DAY), back.n_dropped, back.newest_ts_ms) == (2, 1, 20 * DAY)
    empty = WindowedCounter.from_bytes(WindowedCounter(DAY, 7).to_bytes(), DAY, 7)
    assert empty.latest_count() == 0 and empty.newest_ts_ms is None
