"""One reader for the worker's blocking reads of its own topics: the output topics read back on a
partition's open (``JoinerRuntime``'s ``read_back``) and the store changelog replayed into a
store (``streams.joiner.changelog.read_changelog``).

A partition's open reads 12 ranges (11 output topics and the changelog). With a new kafka-python
client for each, every read paid a bootstrap and a first metadata round: about 0.1 s each, 1.3 s
per partition before it could join a single event, on every start and every rebalance, for each
partition the worker takes. :class:`PartitionReader` keeps one client (no group, no commits) for
the worker's life and assigns it one partition per read. kafka-python also spaces its metadata
requests about 0.1 s apart, and a topic the client has no metadata for waits for one: the reader
asks for every topic it will read in one request when it creates its client.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class PartitionReader:
    """Blocking reads of ``[from_offset, end)`` of one topic partition at a time, through one
    kafka-python consumer created on first use. Thread-safe: reads are serialised (the runtime opens
    one partition at a time anyway). ``close()`` closes the client; a later read opens a new one."""

    def __init__(self, bootstrap: str, topics: Iterable[str] = (), client_id: str = "streamrec-joiner-reader") -> None:
        self.bootstrap = bootstrap
        self.topics = tuple(topics)  # read later: their metadata is fetched with the client
        self.client_id = client_id
        self._consumer: Any = None
        self._lock = threading.Lock()
        self.n_clients = 0  # clients created (one unless closed and used again)

    def _client(self) -> Any:
        if self._consumer is None:
            from kafka import KafkaConsumer, TopicPartition
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, client_id=self.client_id,
                                     group_id=None, enable_auto_commit=False,
                                     auto_offset_reset="earliest")  # a seek below the log start
            try:
                if self.topics:  # one metadata round for all of them (see the module docstring)
                    tps = [TopicPartition(t, 0) for t in self.topics]
                    consumer.assign(tps)
                    consumer.end_offsets(tps)
                    consumer.unsubscribe()
            except BaseException:
                consumer.close(autocommit=False)
                raise
            self._consumer = consumer
            self.n_clients += 1
        return self._consumer

    @contextmanager
    def partition(self, topic: str, partition: int) -> Iterator[_Range]:
        """Hold the client for reads of ``topic[partition]`` (see :class:`_Range`)."""
        from kafka import TopicPartition
        with self._lock:
            consumer = self._client()
            tp = TopicPartition(topic, partition)
            try:
                yield _Range(consumer, tp)
            except BaseException:
                # the client may be mid-request: a fresh one for the next read
                self._close_locked()
                raise
            else:
                if consumer.assignment():
                    consumer.unsubscribe()  # no fetches for this partition while the client waits

    def read_values(self, topic: str, partition: int, from_offset: int, timeout_s: float = 60.0) -> list[bytes]:
        """The values of ``topic[partition]`` from ``from_offset`` to its current end."""
        with self.partition(topic, partition) as rng:
            end = rng.end_offset()
            values: list[bytes] = []
            for recs in rng.records(from_offset, end, timeout_s):
                values += [r.value for r in recs]
            return values

    def partitions(self, topic: str) -> list[int]:
        """``topic``'s partitions, ascending."""
        with self._lock:
            return sorted(self._client().partitions_for_topic(topic) or ())

    def first_offset(self, topic: str, partition: int, offset: int, timeout_s: float = 30.0) -> int:
        """The offset of the first record at or after ``offset`` in ``topic[partition]``: ``offset``
        itself unless records below it are gone (deleted by retention, removed by compaction) or
        the offsets hold no records (transaction markers); the partition's end when no record
        follows ``offset`` (``offset`` when it lies at or past the end)."""
        with self.partition(topic, partition) as rng:
            return rng.first_offset(offset, timeout_s)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close(autocommit=False)


class _Range:
    """The held client, for one partition: its end offset and its records in a range."""

    def __init__(self, consumer: Any, tp: Any) -> None:
        self._consumer, self.tp = consumer, tp

    def end_offset(self) -> int:
        return self._consumer.end_offsets([self.tp]).get(self.tp, 0)

    def first_offset(self, offset: int, timeout_s: float) -> int:
        """See :meth:`PartitionReader.first_offset`."""
        end = self.end_offset()
        if offset >= end:
            return offset
        for recs in self.records(offset, end, timeout_s, max_records=1):
            if recs:
                return recs[0].offset
        return end

    def records(self, from_offset: int, end: int, timeout_s: float, max_records: int = 5000) -> Iterator[list[Any]]:
        """The records of ``[from_offset, end)``, a poll's worth at a time (kafka-python
        ``ConsumerRecord``); raises ``TimeoutError`` when they are not all read within ``timeout_s``.
        Can be called again for the same or another range."""
        if end <= from_offset:
            return
        consumer, tp = self._consumer, self.tp
        if consumer.assignment() != {tp}:
            consumer.assign([tp])
        consumer.seek(tp, from_offset)
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {tp.topic}[{tp.partition}] from {from_offset} to {end}")
            for recs in consumer.poll(timeout_ms=200, max_records=max_records).values():
                yield [r for r in recs if r.offset < end]


__all__ = ["PartitionReader"]
