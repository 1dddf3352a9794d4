"""Read whole topics back and summarise them: what `make run` prints after a replay.

Every record is decoded with the topic's contract in batches; a record that does not decode is
counted as a dead letter candidate (the summary reports it, it never stops the read).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from streams.contracts import TOPIC_KINDS, decode_batch

logger = logging.getLogger(__name__)


@dataclass
class TopicSummary:
    topic: str
    n_partitions: int
    n_messages: int = 0
    n_bytes: int = 0
    n_undecodable: int = 0
    n_users: int = 0
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    per_partition: dict[int, int] = field(default_factory=dict)

    def line(self) -> str:
        span = ""
        if self.first_ts_ms is not None and self.last_ts_ms is not None:
            span = f"  event-time span={(self.last_ts_ms - self.first_ts_ms) / 3_600_000:.1f}h"
        parts = " ".join(f"p{p}={n}" for p, n in sorted(self.per_partition.items()))
        users = f"  users={self.n_users}" if self.n_users else ""
        bad = f"  undecodable={self.n_undecodable}" if self.n_undecodable else ""
        return (f"{self.topic:<14} messages={self.n_messages:<8} bytes={self.n_bytes:<9}"
                f" partitions={self.n_partitions} ({parts}){users}{span}{bad}")


def summarize_topics(bootstrap: str, topics: list[str] | None = None,
                     timeout_s: float = 60.0) -> list[TopicSummary]:
    """Consume ``topics`` (default: every topic) from the beginning to their end offsets."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=None, consumer_timeout_ms=1000)
    try:
        names = sorted(topics if topics is not None else consumer.topics())
        return [_summarize(consumer, name, timeout_s) for name in names]
    finally:
        consumer.close()


def _summarize(consumer: KafkaConsumer, topic: str, timeout_s: float) -> TopicSummary:
    partitions = sorted(consumer.partitions_for_topic(topic) or ())
    tps = [TopicPartition(topic, p) for p in partitions]
    summary = TopicSummary(topic, len(partitions))
    if not tps:
        return summary
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    start = consumer.beginning_offsets(tps)
    end = consumer.end_offsets(tps)
    remaining = {tp: end[tp] - start[tp] for tp in tps if end[tp] > start[tp]}
    summary.per_partition = {tp.partition: end[tp] - start[tp] for tp in tps}
    kind = TOPIC_KINDS.get(topic)
    users: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while remaining and time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=500, max_records=50_000)
        for tp, records in polled.items():
            records = [r for r in records if r.offset < end[tp]]
            summary.n_messages += len(records)
            summary.n_bytes += sum(len(r.value or b"") for r in records)
            remaining[tp] = remaining.get(tp, 0) - len(records)
            if remaining[tp] <= 0:
                remaining.pop(tp, None)
            if kind is None or not records:
                continue
            batch = decode_batch([r.value for r in records], kind)
            summary.n_undecodable += len(batch.errors)
            rows = batch.records
            if len(rows):
                users.update(np.unique(rows["user_id"]).tolist())
                lo, hi = int(rows["ts_ms"].min()), int(rows["ts_ms"].max())
                summary.first_ts_ms = lo if summary.first_ts_ms is None else min(summary.first_ts_ms, lo)
                summary.last_ts_ms = hi if summary.last_ts_ms is None else max(summary.last_ts_ms, hi)
    if remaining:
        logger.warning("summary incomplete topic=%s missing=%d", topic, sum(remaining.values()))
    summary.n_users = len(users)
    return summary
