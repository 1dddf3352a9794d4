"""The feature store's changelog: every committed WriteBatch of partition p, as records on
``joiner-store-changelog`` partition p, so a worker without the store (another host, a lost disk)
restores it instead of re-reading the source topics.

Records: key = the store key, value = its new bytes (None = delete), header ``cl.tag`` = the
writer's random id (u64) and the commit number (u64). The commit record (the store's ``commit``
meta key) comes last in each batch, and after it a *marker*, key ``0xFF | tag``, value empty: a
batch is complete when its marker is there. The marker keys are unique, so compaction (the topic
is created with ``cleanup.policy=compact``: last value per store key) never removes one, and a
restore can tell a complete batch from the records of a writer that crashed mid-batch. Our
embedded broker keeps compacted topics whole, which is correct, only larger.

Order per batch: outputs produced and acked -> changelog records and marker produced and acked ->
the local WriteBatch (with the changelog position after the marker, ``changelog.next``, as local
bookkeeping). So the changelog is never behind the store; it may be one batch ahead (a crash after
the changelog acks), which a restore applies: that batch's outputs were acked before it.

>>> tag = make_tag(7, 3)
>>> r = ChangelogReplay()
>>> r.add(b"k1", b"v1", tag); r.add(b"k2", b"v2", make_tag(8, 3))   # a second writer's stray record
>>> r.add(marker_key(tag), b"", tag)
>>> r.committed, r.n_commits, len(r.pending)
([(b'k1', b'v1')], 1, 1)
"""
from __future__ import annotations

import logging
import struct
import time

logger = logging.getLogger(__name__)

TOPIC_STORE_CHANGELOG = "joiner-store-changelog"
HEADER_TAG = "cl.tag"
#: local-only meta: the changelog offset after this store's last commit
CHANGELOG_NEXT_META = b"changelog.next"
_MARKER = b"\xff"
_TAG = struct.Struct(">QQ")


def make_tag(writer_id: int, commit_seq: int) -> bytes:
    return _TAG.pack(writer_id, commit_seq)


def marker_key(tag: bytes) -> bytes:
    return _MARKER + tag


class ChangelogReplay:
    """Collects changelog records in order; :attr:`committed` holds those of complete batches."""

    def __init__(self) -> None:
        self.pending: dict[bytes, list[tuple[bytes, bytes | None]]] = {}
        self.committed: list[tuple[bytes, bytes | None]] = []
        self.n_commits = 0

    def add(self, key: bytes, value: bytes | None, tag: bytes | None) -> None:
        if key.startswith(_MARKER):
            batch = self.pending.pop(key[1:], [])
            self.committed += batch
            self.n_commits += 1
            return
        if tag is None:
            raise ValueError(f"changelog record {key!r} has no {HEADER_TAG} header")
        self.pending.setdefault(tag, []).append((key, value))

    def take(self) -> list[tuple[bytes, bytes | None]]:
        out, self.committed = self.committed, []
        return out


def read_changelog(bootstrap: str, partition: int, from_offset: int, apply, topic: str = TOPIC_STORE_CHANGELOG,
                   timeout_s: float = 120.0) -> tuple[int, int, int]:
    """Replay ``topic[partition]`` from ``from_offset`` to its current end, passing the records of
    complete batches to ``apply(changes)`` (in order, a chunk at a time); returns ``(end offset,
    batches applied, records applied)``. Blocking (kafka-python): run it in an executor."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, partition)
        end = consumer.end_offsets([tp]).get(tp, 0)
        if end <= from_offset:
            return end, 0, 0
        consumer.assign([tp])
        consumer.seek(tp, from_offset)
        replay, n_records = ChangelogReplay(), 0
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"restoring {topic}[{partition}] from {from_offset} to {end}")
            for recs in consumer.poll(timeout_ms=200, max_records=5000).values():
                for r in recs:
                    if r.offset < end:
                        replay.add(r.key, r.value, dict(r.headers or ()).get(HEADER_TAG))
            chunk = replay.take()
            if chunk:
                apply(chunk)
                n_records += len(chunk)
        if replay.pending:
            logger.warning("changelog_incomplete_batches partition=%d n=%d (a writer stopped mid-batch; ignored)",
                           partition, len(replay.pending))
        return end, replay.n_commits, n_records
    finally:
        consumer.close()
