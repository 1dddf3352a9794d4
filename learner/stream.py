"""The ``samples`` topic -> decoded minibatches with the offsets behind them, on a background thread.

:class:`SampleStream` owns one kafka-python ``KafkaConsumer`` in a consumer group (no auto-commit).
A background thread polls up to ``batch_size`` records, decodes them with the sample contract's
batch decoder (:func:`learner.data.decode_columns` -> :func:`learner.data.batch_from_columns`),
pins the tensors when CUDA is present and puts a :class:`StreamBatch` into a bounded queue. Each
batch carries, per partition, the offset just past its last record: the learner adds it to its
trained position only after the batch is trained. Rows that break the contract are routed to
``samples.dlq`` (when a dead-letter router is given), counted and skipped; their offsets still move.

Offsets: the trainer's checkpoint is authoritative, the group's committed offsets follow it.

* ``set_positions`` gives the stream the learner's trained position (restored from a checkpoint,
  then updated at every checkpoint). When partitions are assigned, each one with a known position
  is sought there; the others start at the group's committed offset (``unknown="committed"``, no
  checkpoint yet) or at the beginning (``unknown="earliest"``: the restored lineage never trained
  them, so whatever the group committed is not ours to trust).
* Rebalance: kafka-python calls ``on_partitions_revoked`` before giving partitions up. The listener
  puts a :class:`RebalanceBarrier` behind the queued batches and waits: the learner trains what was
  queued, checkpoints and replies with its offsets; the listener then commits them for the revoked
  partitions and returns. Nothing polled is lost, and a member that takes a partition over starts
  exactly where this one's durable checkpoint stops.
* ``request_commit`` (after a durable checkpoint) commits on the polling thread between polls.

The listener runs on kafka-python's IO thread and blocks it (heartbeats included) while the learner
checkpoints; ``rebalance_timeout_s`` bounds the wait and must stay below the session timeout.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from learner import LearnerError
from learner.config import require_positive
from learner.batch import SampleBatch
from learner.data import batch_from_columns, decode_columns
from streams.samples import TOPIC_SAMPLES

logger = logging.getLogger(__name__)


class StreamError(LearnerError):
    """The sample stream's consumer thread failed or a rebalance checkpoint did not finish in time."""


@dataclass(frozen=True)
class StreamConfig:
    """One consumer-group member reading ``topic``.

    ``poll_timeout_ms`` >= 1000: kafka-python 3.0 can lose a JoinGroup/SyncGroup answer when a poll
    times out while a rejoin is in flight. ``fetch_max_wait_ms`` bounds how long the broker holds a
    fetch for new data (freshness). ``prefetch`` decoded batches wait in the queue: each one adds a
    training step to the time a sample waits, so one (decoding overlaps training) keeps samples
    fresh; records not yet polled coalesce into the next, fuller batch instead.
    ``rebalance_timeout_s``: longest wait for the learner's checkpoint when partitions are revoked.
    """

    bootstrap: str
    group_id: str = "streamrec-learner"
    topic: str = TOPIC_SAMPLES
    client_id: str = "streamrec-learner"
    batch_size: int = 256
    seq_len: int = 100
    prefetch: int = 1
    poll_timeout_ms: int = 1000
    fetch_max_wait_ms: int = 100
    session_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 300_000
    rebalance_timeout_s: float = 20.0
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("bootstrap='' (need host:port[,host:port])")
        if not self.group_id:
            raise ValueError("group_id='' (the learner always consumes in a group)")
        require_positive(self, "batch_size", "seq_len", "prefetch", "fetch_max_wait_ms", "heartbeat_interval_ms")
        if self.poll_timeout_ms < 1000:
            raise ValueError(f"poll_timeout_ms={self.poll_timeout_ms!r} < 1000 (kafka-python can lose a "
                             "group join with shorter poll timeouts)")
        if not 0 < self.rebalance_timeout_s < self.session_timeout_ms / 1000:
            raise ValueError(f"rebalance_timeout_s={self.rebalance_timeout_s!r} must be > 0 and below "
                             f"session_timeout_ms={self.session_timeout_ms!r}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(f"heartbeat_interval_ms={self.heartbeat_interval_ms!r} must be below "
                             f"session_timeout_ms={self.session_timeout_ms!r}")


@dataclass
class StreamBatch:
    """One decoded minibatch and where it came from.

    ``next_offsets``: partition -> offset just past this batch's last record of that partition;
    ``partitions`` / ``offsets`` / ``timestamps_ms``: per good row (B,), the record's partition,
    offset and producer timestamp; ``n_messages`` counts every record, ``n_rejected`` those that
    broke the sample contract (not in ``batch``).
    """

    batch: SampleBatch
    next_offsets: dict[int, int]
    partitions: np.ndarray       # (B,) int32
    offsets: np.ndarray          # (B,) int64
    timestamps_ms: np.ndarray    # (B,) int64
    n_messages: int
    n_rejected: int


@dataclass
class RebalanceBarrier:
    """Partitions are about to be revoked (or were lost): checkpoint, then :meth:`reply`."""

    partitions: frozenset[int]
    lost: bool = False
    offsets: dict[int, int] | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def reply(self, offsets: Mapping[int, int]) -> None:
        """The learner's trained offsets once its checkpoint is durable."""
        self.offsets = dict(offsets)
        self._done.set()

    def wait(self, timeout_s: float, stop: threading.Event) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self._done.wait(0.05):
            if stop.is_set() or time.monotonic() > deadline:
                return False
        return True


def source_key(topic: str, partition: int) -> str:
    """Checkpoint / ModelVersion key of a partition.

    >>> source_key("samples", 2)
    'samples/2'
    """
    return f"{topic}/{partition}"


def to_source_offsets(topic: str, offsets: Mapping[int, int]) -> dict[str, int]:
    return {source_key(topic, p): int(o) for p, o in sorted(offsets.items())}


def from_source_offsets(topic: str, source_offsets: Mapping[str, int]) -> dict[int, int]:
    """The partitions of ``topic`` in checkpoint ``source_offsets`` (other keys are ignored).

    >>> from_source_offsets("samples", {"samples/0": 5, "samples/2": 7, "offset_bytes": 9})
    {0: 5, 2: 7}
    """
    out: dict[int, int] = {}
    for key, value in source_offsets.items():
        name, sep, part = key.rpartition("/")
        if sep and name == topic and part.isdigit():
            out[int(part)] = int(value)
    return out


class SampleStream:
    """Consumer-group reader of the samples topic (see the module docstring).

    ``get(timeout_s)`` -> :class:`StreamBatch`, :class:`RebalanceBarrier` or None (nothing yet);
    an error of the polling thread is raised there. ``router`` (a ``streams.dlq.DeadLetterRouter``)
    receives rejected records. ``consumer_options`` are extra ``KafkaConsumer`` keyword arguments.
    """

    def __init__(self, cfg: StreamConfig, router: Any | None = None, consumer_options: Mapping[str, Any] | None = None):
        self.cfg = cfg
        self.router = router
        self.consumer_options = dict(consumer_options or {})
        self.unknown = "committed"
        self.n_messages = 0
        self.n_rejected = 0
        self.n_commits = 0
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._positions: dict[int, int] = {}
        self._pending_commit: dict[int, int] | None = None
        self._final_commit: dict[int, int] | None = None
        self._highwater: dict[int, int] = {}
        self._starts: dict[int, int] = {}       # see start_positions
        self._delivered: set[int] = set()       # partitions polled from since their assignment
        self._assignment: frozenset[int] = frozenset()
        self._closing = False
        self._consumer = None
        self._thread: threading.Thread | None = None

    # ---- called by the learner -------------------------------------------------------------

    def set_positions(self, offsets: Mapping[int, int], unknown: str | None = None) -> None:
        """Trained position per partition; ``unknown``: "committed" or "earliest" for the others."""
        if unknown is not None:
            if unknown not in ("committed", "earliest"):
                raise ValueError(f"unknown={unknown!r} must be 'committed' or 'earliest'")
            self.unknown = unknown
        with self._lock:
            self._positions.update({int(p): int(o) for p, o in offsets.items()})

    def start_positions(self) -> dict[int, int]:
        """Where each assigned partition without a trained position started (the group's committed
        offset, with ``unknown="committed"``), noted before anything was polled from it. The learner
        checkpoints these for partitions it has not trained yet: otherwise a restart would read a
        partition that stayed idle since the first start from its beginning."""
        with self._lock:
            return dict(self._starts)

    def request_commit(self, offsets: Mapping[int, int]) -> None:
        """Commit ``offsets`` to the group (on the polling thread, before its next poll)."""
        with self._lock:
            self._pending_commit = dict(offsets)

    def start(self) -> None:
        if self._thread is not None:
            raise LearnerError("a SampleStream starts once")
        self._thread = threading.Thread(target=self._run, name="sample-stream", daemon=True)
        self._thread.start()

    def get(self, timeout_s: float = 0.2) -> StreamBatch | RebalanceBarrier | None:
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise StreamError(f"sample stream failed: {item!r}") from item
        return item

    def highwater(self) -> dict[int, int]:
        """Last known end offset per assigned partition (from fetch responses)."""
        with self._lock:
            return dict(self._highwater)

    def assignment(self) -> frozenset[int]:
        with self._lock:
            return self._assignment

    def close(self, final_offsets: Mapping[int, int] | None = None, timeout_s: float = 30.0) -> None:
        """Stop polling; commit ``final_offsets`` (the last checkpoint's), leave the group."""
        with self._lock:
            self._final_commit = dict(final_offsets) if final_offsets is not None else None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                logger.warning("sample stream thread still running after close timeout_s=%.1f", timeout_s)

    # ---- the polling thread ----------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.cfg
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=cfg.bootstrap.split(","), group_id=cfg.group_id, client_id=cfg.client_id,
                enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=cfg.batch_size,
                fetch_max_wait_ms=cfg.fetch_max_wait_ms, session_timeout_ms=cfg.session_timeout_ms,
                heartbeat_interval_ms=cfg.heartbeat_interval_ms, max_poll_interval_ms=cfg.max_poll_interval_ms,
                **self.consumer_options)
        except BaseException as exc:
            self._put(exc)
            return
        self._consumer = consumer
        try:
            if not self._wait_for_topic(consumer):
                return
            consumer.subscribe([cfg.topic], listener=_Listener(self))
            while not self._stop.is_set():
                self._commit_pending(consumer)
                records = consumer.poll(timeout_ms=cfg.poll_timeout_ms)
                self._note_highwater(consumer)
                self._note_starts(consumer, {tp.partition for tp in records})
                if records:
                    self._put(self._decode(records))
        except BaseException as exc:  # handed to the learner, which re-raises it
            self._put(exc)
        finally:
            self._shutdown(consumer)

    def _wait_for_topic(self, consumer, recheck_s: float = 1.0, warn_every_s: float = 30.0) -> bool:
        """Subscribe only to a topic that exists: a subscription's metadata requests would
        auto-create a mistyped topic (kafka-python 3.0 does not pass ``allow_auto_create_topics`` on
        to them) and the learner would then wait on it forever. Asking for every topic's metadata
        creates nothing. Warns while the topic is missing; False when stopped first."""
        topic, next_warn = self.cfg.topic, 0.0
        while not self._stop.is_set():
            if consumer.partitions_for_topic(topic):
                if next_warn:
                    logger.info("stream topic=%s now exists; subscribing", topic)
                return True
            now = time.monotonic()
            if now >= next_warn:
                logger.warning("stream topic=%s is not on the cluster at %s; waiting for it to be created "
                               "(check --topic if it should already exist)", topic, self.cfg.bootstrap)
                next_warn = now + warn_every_s
            self._stop.wait(recheck_s)
        return False

    def _shutdown(self, consumer) -> None:
        with self._lock:
            final = self._final_commit
            self._closing = True
        try:
            if final is not None:
                self._commit(consumer, final, "final")
        finally:
            consumer.close(autocommit=False)
            logger.info("stream closed group=%s topic=%s", self.cfg.group_id, self.cfg.topic)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _commit_pending(self, consumer) -> None:
        with self._lock:
            pending, self._pending_commit = self._pending_commit, None
        if pending:
            self._commit(consumer, pending, "checkpoint")

    def _commit(self, consumer, offsets: Mapping[int, int], why: str) -> None:
        owned = {tp.partition for tp in consumer.assignment()}
        todo = {TopicPartition(self.cfg.topic, p): OffsetAndMetadata(o, "", -1)
                for p, o in offsets.items() if p in owned}
        if not todo:
            return
        try:
            consumer.commit(offsets=todo)
            self.n_commits += 1
            logger.debug("offsets committed why=%s offsets=%s", why, {tp.partition: m.offset for tp, m in todo.items()})
        except KafkaError as exc:  # the checkpoint holds the offsets; the group's copy catches up later
            logger.warning("offset commit failed why=%s error=%r", why, exc)

    def _note_starts(self, consumer, polled: set[int]) -> None:
        """Note the position of each partition that has no trained position and nothing polled yet
        (so its position is still where it started)."""
        with self._lock:
            self._delivered |= polled
            if self.unknown != "committed":
                return
            todo = [p for p in self._assignment
                    if p not in self._positions and p not in self._starts and p not in self._delivered]
        for p in todo:
            pos = consumer.position(TopicPartition(self.cfg.topic, p), timeout_ms=1000)
            if pos is not None:
                with self._lock:
                    self._starts[p] = pos

    def _note_highwater(self, consumer) -> None:
        marks = {}
        assigned = consumer.assignment()
        for tp in assigned:
            hw = consumer.highwater(tp)
            if hw is not None:
                marks[tp.partition] = hw
        with self._lock:
            self._highwater = marks
            self._assignment = frozenset(tp.partition for tp in assigned)

    def _decode(self, records: Mapping[Any, list]) -> StreamBatch:
        recs = [r for tp in sorted(records, key=lambda tp: tp.partition) for r in records[tp]]
        cols = decode_columns([r.value or b"" for r in recs], self.cfg.seq_len)
        keep = np.ones(len(recs), dtype=bool)
        for index, reason in cols.errors:
            keep[index] = False
            rec = recs[index]
            if self.router is not None:
                self.router.route_record(rec, reason)
            logger.debug("sample rejected partition=%d offset=%d reason=%r", rec.partition, rec.offset, reason)
        batch = batch_from_columns(cols)
        if self.cfg.pin_memory:
            batch = batch.pin_memory()
        good = [r for r, k in zip(recs, keep) if k]
        next_offsets: dict[int, int] = {}
        for r in recs:
            next_offsets[r.partition] = r.offset + 1
        self.n_messages += len(recs)
        self.n_rejected += len(cols.errors)
        return StreamBatch(
            batch=batch, next_offsets=next_offsets,
            partitions=np.fromiter((r.partition for r in good), dtype=np.int32, count=len(good)),   # (B,)
            offsets=np.fromiter((r.offset for r in good), dtype=np.int64, count=len(good)),         # (B,)
            timestamps_ms=np.fromiter((r.timestamp for r in good), dtype=np.int64, count=len(good)),  # (B,)
            n_messages=len(recs), n_rejected=len(cols.errors))

    # ---- rebalance callbacks (kafka-python's IO thread) -------------------------------------

    def _on_revoked(self, revoked, lost: bool) -> None:
        parts = frozenset(tp.partition for tp in revoked if tp.topic == self.cfg.topic)
        with self._lock:
            closing = self._closing
        if not parts or closing or self._stop.is_set():
            return
        logger.info("revoke partitions=%s lost=%s group=%s: checkpoint first", sorted(parts), lost, self.cfg.group_id)
        barrier = RebalanceBarrier(parts, lost=lost)
        self._put(barrier)
        if not barrier.wait(self.cfg.rebalance_timeout_s, self._stop):
            if self._stop.is_set():
                return
            raise StreamError(f"rebalance checkpoint not done within rebalance_timeout_s={self.cfg.rebalance_timeout_s}")
        offsets = {p: o for p, o in (barrier.offsets or {}).items() if p in parts}
        self.set_positions(barrier.offsets or {})
        if lost or not offsets or self._consumer is None:
            return
        todo = {TopicPartition(self.cfg.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}

        def done(_offsets, result) -> None:
            if isinstance(result, Exception):
                logger.warning("revoke commit failed offsets=%s error=%r", offsets, result)
            else:
                self.n_commits += 1
                logger.info("revoke commit offsets=%s", offsets)

        # the IO thread cannot block on a commit; the request is queued ahead of the JoinGroup
        self._consumer.commit_async(offsets=todo, callback=done)

    def _on_assigned(self, assigned) -> None:
        mine = sorted((tp for tp in assigned if tp.topic == self.cfg.topic), key=lambda tp: tp.partition)
        with self._lock:
            positions = dict(self._positions)
        sought, reset = {}, []
        for tp in mine:
            if tp.partition in positions:
                self._consumer.seek(tp, positions[tp.partition])
                sought[tp.partition] = positions[tp.partition]
            elif self.unknown == "earliest":
                reset.append(tp)
        if reset:
            self._consumer.seek_to_beginning(*reset)
        with self._lock:
            self._assignment = frozenset(tp.partition for tp in mine)
            self._delivered -= self._assignment          # started afresh: noted again if still untrained
            for p in self._assignment:
                self._starts.pop(p, None)
        logger.info("assign partitions=%s seek=%s from_beginning=%s group=%s", [tp.partition for tp in mine],
                    sought, [tp.partition for tp in reset], self.cfg.group_id)


def use_compiled_crc32c() -> bool:
    """Let kafka-python check record-batch CRCs with aiokafka's compiled CRC-32C.

    Without the optional ``crc32c`` package kafka-python computes CRC-32C in pure Python (about
    6 MB/s here), which caps a consumer of 2 KB samples near 2,400 records/s; the compiled one
    (about 200 MB/s) keeps the checks and lifts the cap more than tenfold. Process-wide; the
    result is the same checksum. Returns True when the compiled implementation is in use.
    """
    import kafka.record.default_records as default_records
    import kafka.record.util as record_util

    if getattr(record_util, "crc32c_c", None) is not None:
        return True                                   # kafka-python found a C implementation itself
    try:
        from aiokafka.record._crecords import crc32c_cython
    except ImportError:
        return False
    if crc32c_cython(b"123456789") != 0xE3069283:     # the CRC-32C check value
        return False
    default_records.calc_crc32c = lambda memview: crc32c_cython(memview)
    return True


class _Listener(ConsumerRebalanceListener):
    """Forwards kafka-python's rebalance callbacks to the stream."""

    def __init__(self, stream: SampleStream):
        self.stream = stream

    def on_partitions_revoked(self, revoked):
        self.stream._on_revoked(revoked, lost=False)

    def on_partitions_lost(self, lost):
        self.stream._on_revoked(lost, lost=True)

    def on_partitions_assigned(self, assigned):
        self.stream._on_assigned(assigned)


__all__ = ["RebalanceBarrier", "use_compiled_crc32c", "SampleStream", "StreamBatch", "StreamConfig", "StreamError",
           "from_source_offsets", "source_key", "to_source_offsets"]
