"""Dead-letter routing: a message that breaks its contract goes to ``<topic>.dlq``, never nowhere.

The dead letter keeps the original key and the original bytes as its value; headers say why and
where it came from (``reason``, ``source.topic``, ``source.partition``, ``source.offset``,
``source.timestamp_ms``, ``dlq.ts_ms``), and a counter per ``(topic, reason code)`` moves.

Call :meth:`DeadLetterRouter.flush` before committing the source offsets, so that a dead letter
cannot be lost between the commit and the broker acknowledging it.

>>> class ListProducer:
...     def __init__(self):
...         self.sent = []
...     def send(self, topic, value=None, key=None, headers=None):
...         self.sent.append((topic, key, value, dict(headers)))
>>> producer = ListProducer()
>>> router = DeadLetterRouter(producer, now_ms=lambda: 1000)
>>> router.route(topic="clicks", partition=0, offset=5, key=b"42", value=b"junk",
...              reason="bad_magic: 0x6a (expected 0x5a)")
>>> topic, key, value, headers = producer.sent[0]
>>> topic, key, value, headers["reason"], headers["source.offset"]
('clicks.dlq', b'42', b'junk', b'bad_magic: 0x6a (expected 0x5a)', b'5')
>>> router.counts()
{('clicks', 'bad_magic'): 1}
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from streams.contracts import decode_batch, kind_of, record_dtype

logger = logging.getLogger(__name__)

DLQ_SUFFIX = ".dlq"


def dlq_topic(topic: str) -> str:
    """Dead-letter topic of ``topic``.

    >>> dlq_topic("impressions")
    'impressions.dlq'
    """
    if not topic or topic.endswith(DLQ_SUFFIX):
        raise ValueError(f"topic={topic!r} cannot have a dead-letter topic")
    return topic + DLQ_SUFFIX


def is_dlq_topic(topic: str) -> bool:
    return topic.endswith(DLQ_SUFFIX) and len(topic) > len(DLQ_SUFFIX)


class Producer(Protocol):
    """What the router needs of a producer (kafka-python's ``KafkaProducer`` fits)."""

    def send(self, topic: str, value: Any = None, key: Any = None, headers: Any = None) -> Any: ...


class SourceRecord(Protocol):
    """What :func:`decode_or_route` needs of a consumed record (kafka-python's ``ConsumerRecord``)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter read back from a ``.dlq`` topic."""

    reason: str
    source_topic: str
    source_partition: int
    source_offset: int
    source_timestamp_ms: int
    dlq_ts_ms: int
    key: bytes | None
    value: bytes | None

    @classmethod
    def from_record(cls, record: Any) -> DeadLetter:
        """Parse a consumed ``.dlq`` record; raise ``ValueError`` naming a missing, null (Kafka
        allows null header values) or malformed header, so that a reader can show it and go on."""
        headers = {k: v for k, v in (record.headers or [])}
        where = f"dead letter at offset={record.offset}"

        def header(name: str, default: bytes | None = None) -> bytes:
            value = headers.get(name, default)
            if value is None:
                raise ValueError(f"{where} {'has a null' if name in headers else 'lacks'} header {name!r}")
            return value

        def text(name: str) -> str:
            value = header(name)
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where} has header {name!r}={value!r}, not utf-8 text") from None

        def integer(name: str, default: bytes | None = None) -> int:
            value = header(name, default)
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{where} has header {name!r}={value!r}, not an integer") from None

        return cls(
            reason=text("reason"),
            source_topic=text("source.topic"),
            source_partition=integer("source.partition"),
            source_offset=integer("source.offset"),
            source_timestamp_ms=integer("source.timestamp_ms", b"-1"),
            dlq_ts_ms=integer("dlq.ts_ms", b"-1"),
            key=record.key,
            value=record.value,
        )


class DeadLetterError(RuntimeError):
    """Dead letters that did not reach their topic."""


class DeadLetterRouter:
    """Sends undecodable messages to their dead-letter topic and counts them per topic and reason."""

    def __init__(self, producer: Producer, *, now_ms: Callable[[], int] | None = None) -> None:
        self._producer = producer
        self._now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self._counts: Counter[tuple[str, str]] = Counter()
        self._pending: list[Any] = []  # send results not yet checked by flush()

    def route(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        timestamp_ms: int = -1,
    ) -> None:
        """Send one message, unchanged, to ``dlq_topic(topic)`` with headers saying why."""
        headers = [
            ("reason", reason.encode("utf-8")),
            ("source.topic", topic.encode("utf-8")),
            ("source.partition", str(partition).encode("ascii")),
            ("source.offset", str(offset).encode("ascii")),
            ("source.timestamp_ms", str(timestamp_ms).encode("ascii")),
            ("dlq.ts_ms", str(self._now_ms()).encode("ascii")),
        ]
        sent = self._producer.send(dlq_topic(topic), value=value, key=key, headers=headers)
        if sent is not None:
            self._pending.append(sent)
        self._counts[(topic, reason.split(":", 1)[0])] += 1

    def route_record(self, record: SourceRecord, reason: str) -> None:
        """Route a consumed record."""
        self.route(
            topic=record.topic, partition=record.partition, offset=record.offset,
            key=record.key, value=record.value, reason=reason,
            timestamp_ms=getattr(record, "timestamp", -1),
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """Dead letters sent so far, per ``(source topic, reason code)``."""
        return dict(self._counts)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every dead letter is acknowledged (call before committing source offsets).
        Raises :class:`DeadLetterError` when one was not (its send failed: expired, refused), so
        that the caller does not commit past its source record."""
        # the sends to check are taken first: a letter routed (on another thread) while the
        # producer flushes is checked by the next flush, not dropped unchecked by this one
        pending, self._pending = self._pending, []
        flush = getattr(self._producer, "flush", None)
        try:
            if flush is not None:
                flush(timeout=timeout_s)
        finally:
            unfinished = [sent for sent in pending if not getattr(sent, "is_done", True)]
            if unfinished:  # flush timed out: check them next time
                self._pending[:0] = unfinished
        failures = [sent for sent in pending if getattr(sent, "failed", lambda: False)()]
        if failures:
            raise DeadLetterError(f"{len(failures)} of {len(pending)} dead letters were not acknowledged, "
                                  f"first error: {getattr(failures[0], 'exception', None)!r}")


def decode_or_route(
    records: Sequence[SourceRecord], router: DeadLetterRouter, kind: type | None = None
) -> np.ndarray:
    """Decode records of one topic into ``record_dtype(kind)`` rows; route every failure.

    ``kind`` defaults to the event type of the records' topic; pass it when ``records`` may be empty.
    Good rows keep their input order.
    """
    if not records:
        if kind is None:
            raise ValueError("records=[] and kind=None: cannot tell which record dtype to return")
        return np.empty(0, dtype=record_dtype(kind))
    topic = records[0].topic
    for r in records:
        if r.topic != topic:
            raise ValueError(f"records mix topics {topic!r} and {r.topic!r}; decode one topic per call")
    if kind is None:
        kind = kind_of(topic)
    batch = decode_batch([r.value for r in records], kind)
    for i, reason in batch.errors:
        router.route_record(records[i], reason)
    if batch.errors:
        logger.debug("dead_lettered topic=%s n=%d of=%d", topic, len(batch.errors), len(records))
    return batch.records
