"""TopicAligner: event-time merge of a partition's topics, and what it says about re-delivered offsets.

The ack rule matters for the group's committed offsets: an offset may be acked only once its
state is in the store (released and committed). A record fetched again while its first copy is
still queued (after a seek, a re-fetch overlaps what the aligner holds) must not be acked, or
faust would commit past the store (seen in a worker whose partitions were positioned while it
held unreleased events).
"""
from __future__ import annotations

from streams.contracts import Click, Impression
from streams.joiner.state import Entry, TopicAligner

TOPICS = ("impressions", "clicks")


def imp(offset: int, ts: int) -> Entry:
    return Entry("impressions", offset, Impression(100 + offset, ts, 1, 2, 500 + offset))


def click(offset: int, ts: int) -> Entry:
    return Entry("clicks", offset, Click(900 + offset, ts, 500 + offset, 1, 2))


def test_merge_is_event_time_ordered_and_waits_for_a_topic_that_is_not_caught_up():
    a = TopicAligner({}, TOPICS)
    for e in (imp(0, 10), imp(1, 30), imp(2, 50)):
        assert a.add(e) == TopicAligner.ADDED
    assert a.release(lambda t, nxt: False) == []          # clicks empty and not caught up: wait
    assert a.add(click(0, 20)) == TopicAligner.ADDED
    out = a.release(lambda t, nxt: False)
    assert [(e.topic, e.offset) for e in out] == [("impressions", 0), ("clicks", 0)]  # then clicks empty again
    out = a.release(lambda t, nxt: t == "clicks")          # clicks caught up: the rest goes
    assert [(e.topic, e.offset) for e in out] == [("impressions", 1), ("impressions", 2)]
    assert a.next_offsets() == {"impressions": 3, "clicks": 1}


def test_a_copy_of_a_queued_entry_is_held_not_seen_and_a_released_one_is_seen():
    a = TopicAligner({"impressions": 5}, TOPICS)
    assert a.add(imp(4, 1)) == TopicAligner.SEEN          # below the store's offset: ack and drop
    for off in range(5, 10):
        assert a.add(imp(off, 10 * off)) == TopicAligner.ADDED
    assert a.add(click(0, 65)) == TopicAligner.ADDED
    released = a.release(lambda t, nxt: False)             # up to the click at ts 65, then clicks block
    assert [e.offset for e in released if e.topic == "impressions"] == [5, 6]
    assert a.next_offsets()["impressions"] == 7            # what the store commits
    assert a.add(imp(6, 60)) == TopicAligner.SEEN          # released (its state commits with this step)
    assert a.add(imp(7, 70)) == TopicAligner.HELD          # its first copy still queued: no ack
    assert a.add(imp(9, 90)) == TopicAligner.HELD
    assert a.add(imp(11, 110)) == TopicAligner.GAP         # past the next expected offset (10)
    assert a.buffered() == 3                               # 7, 8, 9 once each
    assert a.next_received("impressions") == 10
