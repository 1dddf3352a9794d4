"""Per-partition runtime state of the faust worker, faust-free: event-time alignment of the four
topics, source offsets, output de-duplication after a crash.

:class:`TopicAligner` merges one partition's four topics into one event-time ordered sequence,
``(ts_ms, topic rank, offset)``, the order the replay and ``iter_events`` use. A topic with
nothing buffered blocks the merge unless it is *caught up* (the consumer holds everything the
broker has for it), as Kafka Streams waits on an empty partition; so the join sees the same
sequence whatever the fetcher's interleaving of the topics. An undecodable message enters its
topic's queue as a dead letter and leaves (to the DLQ) when it reaches the head.

:class:`OutputLedger` remembers, per output topic, the end offset of this partition's outputs as
of the last commit; after a crash the outputs found past it (produced, but the commit covering
their inputs was lost) are suppressed once each when the replay of those inputs emits them again
(samples by their id, other outputs by their bytes).
"""
from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from streams.contracts import EVENT_TOPICS, Event
from streams.samples import TOPIC_SAMPLES

_RANK = {t: i for i, t in enumerate(EVENT_TOPICS)}


@dataclass(slots=True)
class Entry:
    """One consumed message: the decoded event (None: a dead letter), its offset and a handle
    (the faust event to ack)."""

    topic: str
    offset: int
    event: Event | None
    handle: Any = None
    key: bytes | None = None
    value: bytes | None = None
    reason: str = ""


class TopicAligner:
    """Event-time merge of one partition's topics (see the module docstring)."""

    def __init__(self, next_offsets: dict[str, int], topics: Iterable[str] = EVENT_TOPICS) -> None:
        self.topics = tuple(topics)
        self._queues: dict[str, deque[Entry]] = {t: deque() for t in self.topics}
        self._next = {t: next_offsets.get(t, 0) for t in self.topics}  # next offset to receive

    ADDED, SEEN, HELD, GAP = "added", "seen", "held", "gap"

    def add(self, entry: Entry) -> str:
        """Queue ``entry`` (ADDED). SEEN: its offset was released already (its state is committed:
        ack it, drop it). HELD: another copy of an entry still queued (e.g. fetched again after a
        seek): drop it without an ack, since the queued copy is acked when it is released.
        GAP: it lies past the next expected offset (the consumer must seek back; drop it)."""
        nxt = self._next[entry.topic]
        if entry.offset < nxt:
            q = self._queues[entry.topic]
            return self.HELD if q and entry.offset >= q[0].offset else self.SEEN
        if entry.offset > nxt:
            return self.GAP
        self._queues[entry.topic].append(entry)
        self._next[entry.topic] = entry.offset + 1
        return self.ADDED

    def skip_to(self, topic: str, offset: int) -> None:
        """Expect ``topic``'s next entry at ``offset`` (past the next expected one): the offsets
        between hold no records (see ``JoinerRuntime.handle``)."""
        if offset < self._next[topic]:
            raise ValueError(f"skip_to({topic!r}, {offset}) is behind the next expected offset {self._next[topic]}")
        self._next[topic] = offset

    def queued(self, topic: str) -> int:
        """Entries of ``topic`` waiting to be released."""
        return len(self._queues[topic])

    def next_received(self, topic: str) -> int:
        return self._next[topic]

    def buffered(self) -> int:
        return sum(map(len, self._queues.values()))

    def release(self, caught_up: Callable[[str, int], bool], force: bool = False) -> list[Entry]:
        """Entries in merge order while no empty topic blocks (``force``: release everything).

        ``caught_up`` is asked at most once per topic per call (a topic's queue that empties
        during the call cannot receive anything before the call returns).
        """
        queues, out = self._queues, []
        known: dict[str, bool] = {}

        def done(t: str) -> bool:
            if force:
                return True
            v = known.get(t)
            if v is None:
                v = known[t] = caught_up(t, self._next[t])
            return v

        def head(i: int, t: str) -> tuple:  # (merge key, position, topic) of topic t's first entry
            e = queues[t][0]
            return (-1 if e.event is None else e.event.ts_ms, _RANK.get(t, 9), e.offset), i, t

        heads = []
        for i, t in enumerate(self.topics):
            if queues[t]:
                heads.append(head(i, t))
            elif not done(t):
                return out
        heapq.heapify(heads)
        while heads:
            _key, i, t = heads[0]
            q = queues[t]
            out.append(q.popleft())
            if q:
                heapq.heapreplace(heads, head(i, t))
            else:
                heapq.heappop(heads)
                if not done(t):
                    return out
        return out

    def next_offsets(self) -> dict[str, int]:
        """Per topic, the first offset not yet released: where to resume after a restart."""
        return {t: (q[0].offset if q else self._next[t]) for t, q in self._queues.items()}

    def drop(self) -> list[Entry]:
        """Forget everything buffered (the partition was revoked); returns what was dropped."""
        out = [e for q in self._queues.values() for e in q]
        for q in self._queues.values():
            q.clear()
        return out


def _identity(topic: str, value: bytes) -> bytes:
    """What makes an output the same one again: a sample's id (bytes 8..16, the impression id),
    since its T1/T3 bits may change with the shared statistics that had arrived; other outputs'
    bytes."""
    return value[8:16] if topic == TOPIC_SAMPLES else value


class OutputLedger:
    """Output end offsets per topic (committed with the state) and the suppression of re-sends.

    A sample is suppressed by its id: a re-labelled sample may differ from the one produced before
    a crash in the rules that read shared statistics, and the first one stands.
    """

    META_PREFIX = b"out."

    def __init__(self) -> None:
        self.end_offsets: dict[str, int] = {}
        self._suppress: Counter[tuple[str, bytes]] = Counter()

    def suppress(self, found: Iterable[tuple[str, bytes]]) -> None:
        """Outputs found in the topics past the committed end offsets (produced before a crash)."""
        self._suppress.update((t, _identity(t, v)) for t, v in found)

    def should_send(self, topic: str, value: bytes) -> bool:
        k = (topic, _identity(topic, value))
        if self._suppress.get(k, 0) > 0:
            self._suppress[k] -= 1
            return False
        return True

    @property
    def n_suppressed_left(self) -> int:
        return sum(self._suppress.values())

    def record(self, topic: str, next_offset: int) -> None:
        if next_offset > self.end_offsets.get(topic, 0):
            self.end_offsets[topic] = next_offset

    def meta(self) -> dict[bytes, bytes]:
        return {self.META_PREFIX + t.encode(): str(o).encode() for t, o in self.end_offsets.items()}

    @classmethod
    def meta_name(cls, topic: str) -> bytes:
        return cls.META_PREFIX + topic.encode()
