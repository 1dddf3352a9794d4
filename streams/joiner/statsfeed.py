"""A worker's reader of ``joiner.dwell``: every partition, from the beginning, into a table.

Not a group member: every worker needs every partition's contributions (any user may read any
item), so the consumer assigns all partitions of the topic itself and commits nothing. It runs
in a daemon thread; pipelines read the :class:`~streams.joiner.shared.RemoteStats` table under
its lock. A message that cannot be decoded is counted (``stats_feed_bad``) and logged, not applied.
The worker prunes the table; ``rewind`` reads the topic again from its start (a partition moved
here needs epochs pruned before, see ``JoinerRuntime``).
"""
from __future__ import annotations

import logging
import threading
import time

from streams.joiner.shared import TOPIC_DWELL_STATS, RemoteStats, SharedStatsError

logger = logging.getLogger(__name__)


class StatsFeed:
    """Consumes ``topic`` (all partitions) into :attr:`table` until :meth:`stop`."""

    def __init__(self, bootstrap: str, topic: str = TOPIC_DWELL_STATS, poll_ms: int = 50,
                 metadata_wait_s: float = 30.0) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topic, self._poll_ms = topic, poll_ms
        # earliest: an offset that retention removed while the feed read resumes at the log start
        # (the table records the epochs skipped), never at the end
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                       auto_offset_reset="earliest")
        deadline = time.monotonic() + metadata_wait_s
        parts = self._consumer.partitions_for_topic(topic)
        while not parts:
            if time.monotonic() > deadline:
                self._consumer.close()
                raise TimeoutError(f"topic {topic} has no partitions after {metadata_wait_s}s")
            time.sleep(0.2)
            self._consumer.topics()  # refresh the metadata
            parts = self._consumer.partitions_for_topic(topic)
        self._tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.table = RemoteStats(len(self._tps))
        self._consumer.assign(self._tps)
        self._consumer.seek_to_beginning()
        self._start_ends = self._consumer.end_offsets(self._tps)
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self.n_bad = 0
        self._rewinds_asked = self._rewinds_done = 0
        self._rewind_lock = threading.Lock()
        self.error: BaseException | None = None  # the worker crashes on it (stale statistics otherwise)
        self._thread = threading.Thread(target=self._run, name="joiner-stats-feed", daemon=True)

    def start(self) -> "StatsFeed":
        self._thread.start()
        return self

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Wait until everything published before the feed started has been read."""
        return self.caught_up.wait(timeout_s)

    def rewind(self) -> int:
        """Ask the feed thread to empty the table and read the topic again; returns a ticket for
        :meth:`wait_rewound`."""
        with self._rewind_lock:
            self._rewinds_asked += 1
            return self._rewinds_asked

    def wait_rewound(self, ticket: int, timeout_s: float) -> bool:
        """Wait until the re-read asked for by ``ticket`` has caught up (False on timeout)."""
        deadline = time.monotonic() + timeout_s
        while not (self._rewinds_done >= ticket and self.caught_up.is_set()):
            if self.error is not None:
                raise RuntimeError(f"joiner.dwell feed failed: {self.error!r}")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def counters(self) -> dict[str, int]:
        return {"stats_feed_messages": self.table.n_messages, "stats_feed_records": self.table.n_records,
                "stats_feed_bad": self.n_bad, "stats_feed_pruned": self.table.n_pruned,
                "stats_feed_held": self.table.n_held, "stats_feed_gaps": self.table.n_gaps,
                "stats_feed_rewinds": self._rewinds_done}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer = self._consumer
        try:
            while not self._stop.is_set():
                if self._rewinds_done < self._rewinds_asked:
                    ticket = self._rewinds_asked
                    self.caught_up.clear()
                    self.table.reset()
                    consumer.seek_to_beginning()
                    self._start_ends = consumer.end_offsets(self._tps)
                    self._rewinds_done = ticket  # after the clear: caught_up is now the re-read's
                    logger.info("stats_feed_rewind topic=%s", self.topic)
                for recs in consumer.poll(timeout_ms=self._poll_ms).values():
                    for r in recs:
                        try:
                            self.table.add(r.value, partition=r.partition)
                        except SharedStatsError as exc:
                            self.n_bad += 1
                            logger.warning("stats_feed_bad partition=%d offset=%d reason=%s", r.partition,
                                           r.offset, exc)
                if not self.caught_up.is_set() and all(
                        consumer.position(tp) >= self._start_ends.get(tp, 0) for tp in self._tps):
                    self.caught_up.set()
                    logger.info("stats_feed_caught_up partitions=%d messages=%d records=%d", len(self._tps),
                                self.table.n_messages, self.table.n_records)
        except Exception as exc:
            self.error = exc
            logger.exception("stats_feed_failed topic=%s", self.topic)
        finally:
            consumer.close()
