"""The feature store's changelog: every committed WriteBatch of partition p, as records on
``joiner-store-changelog`` partition p, so a worker without the store (another host, a lost disk)
restores it instead of re-reading the source topics.

Records: key = the store key, value = its new bytes (None = delete), header ``cl.tag`` = the
writer's random id (u64) and the commit number (u64). The commit record (the store's ``commit``
meta key) comes last in each batch, and after it the writer's *marker*: key ``0xFF | writer id``,
value = the tag. A batch is complete when a marker of its writer with a commit number at least
its own follows it. The topic is created with ``cleanup.policy=compact`` (last value per key):

* a writer's markers share one key, so compaction keeps one per writer (its last, after all its
  complete batches) and the topic stays bounded by the state plus one record per writer;
* completion is therefore known only at a writer's last marker, so a restore reads the range
  twice: first the markers (:class:`ChangelogIndex`), then the records, each applied at once if
  its batch is complete (no batch is held in memory);
* a writer never goes on after a batch it could not finish (the worker crashes), so its marker
  numbers cover exactly its complete batches;
* the records of a batch left unfinished (its writer died mid-batch) are skipped, but under
  compaction such a record, the last of its key, removes the key's committed value below it. So
  the next owner *republishes* the committed value (or a delete) of every key whose last record
  is unfinished, in its first commit after the restore (``unfinished`` of :func:`read_changelog`,
  ``StoreBatch.republish``): from then on the last record of every key is a committed one. The
  window left: compaction of the segment holding the unfinished batch before any owner has opened
  the partition again, and then a restore without the local store (docs/joiner.md, Changelog).

Changelogs written with a marker per batch (key ``0xFF | tag``, empty value) are still read.

Order per batch: outputs produced and acked -> changelog records and marker produced and acked ->
the local WriteBatch (with the changelog position after the marker, ``changelog.next``, as local
bookkeeping). So the changelog is never behind the store; it may be one batch ahead (a crash after
the changelog acks), which a restore applies: that batch's outputs were acked before it.

>>> log = [(b"k1", b"v1", make_tag(7, 3)), (b"k2", b"v2", make_tag(8, 3)),   # writer 8 died mid-batch
...        (marker_key(7), make_tag(7, 3), make_tag(7, 3))]
>>> index = ChangelogIndex()
>>> for k, v, t in log: index.add(k, v, t)
>>> replay = ChangelogReplay(index)
>>> for k, v, t in log: replay.add(k, v, t)
>>> replay.take(), replay.n_commits, replay.unfinished
([(b'k1', b'v1')], 1, {b'k2'})
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

TOPIC_STORE_CHANGELOG = "joiner-store-changelog"
HEADER_TAG = "cl.tag"
#: local-only meta: the changelog offset after this store's last commit
CHANGELOG_NEXT_META = b"changelog.next"
_MARKER = b"\xff"
_TAG = struct.Struct(">QQ")
_WRITER = struct.Struct(">Q")


def make_tag(writer_id: int, commit_seq: int) -> bytes:
    return _TAG.pack(writer_id, commit_seq)


def parse_tag(tag: bytes) -> tuple[int, int]:
    """``(writer id, commit number)`` of a tag."""
    if len(tag) != _TAG.size:
        raise ValueError(f"changelog tag of {len(tag)} bytes, expected {_TAG.size}")
    return _TAG.unpack(tag)


def marker_key(writer_id: int) -> bytes:
    """The key of ``writer_id``'s markers (its value: the tag of the batch it completes)."""
    return _MARKER + _WRITER.pack(writer_id)


class ChangelogIndex:
    """The first pass of a restore: per writer, the highest commit number a marker completes."""

    def __init__(self) -> None:
        self.complete_up_to: dict[int, int] = {}
        self._legacy: set[bytes] = set()  # tags of per-batch markers (older changelogs)

    def add(self, key: bytes, value: bytes | None, tag: bytes | None) -> None:
        if not key.startswith(_MARKER):
            return
        if len(key) == 1 + _TAG.size:  # an older changelog's marker: key 0xFF | tag
            self._legacy.add(key[1:])
            return
        if len(key) != 1 + _WRITER.size or value is None:
            raise ValueError(f"changelog marker {key!r} -> {value!r} is malformed")
        writer, seq = parse_tag(value)
        if writer != _WRITER.unpack_from(key, 1)[0]:
            raise ValueError(f"changelog marker of writer {_WRITER.unpack_from(key, 1)[0]} names writer {writer}")
        if seq > self.complete_up_to.get(writer, -1):
            self.complete_up_to[writer] = seq

    def complete(self, tag: bytes) -> bool:
        writer, seq = parse_tag(tag)
        return seq <= self.complete_up_to.get(writer, -1) or tag in self._legacy


class ChangelogReplay:
    """The second pass: the records of complete batches in order (:meth:`take`), and the keys
    whose last record so far belongs to an unfinished batch (:attr:`unfinished`)."""

    def __init__(self, index: ChangelogIndex) -> None:
        self.index = index
        self.committed: list[tuple[bytes, bytes | None]] = []
        self.unfinished: set[bytes] = set()
        self.n_skipped = 0
        self._complete: dict[bytes, bool] = {}  # per tag read: is its batch complete

    @property
    def n_commits(self) -> int:
        """Complete batches with at least one record read (compaction may have emptied others)."""
        return sum(self._complete.values())

    def add(self, key: bytes, value: bytes | None, tag: bytes | None) -> None:
        if key.startswith(_MARKER):
            return
        if tag is None:
            raise ValueError(f"changelog record {key!r} has no {HEADER_TAG} header")
        complete = self._complete.get(tag)
        if complete is None:  # once per batch, not per record
            complete = self._complete[tag] = self.index.complete(tag)
        if complete:
            self.committed.append((key, value))
            self.unfinished.discard(key)
        else:
            self.unfinished.add(key)
            self.n_skipped += 1

    def take(self) -> list[tuple[bytes, bytes | None]]:
        out, self.committed = self.committed, []
        return out


@dataclass
class RestoreResult:
    """What :func:`read_changelog` did: the changelog end it read to, the complete batches and
    records applied, and the keys whose last record belongs to an unfinished batch (the next
    commit republishes their committed values)."""

    end: int
    n_commits: int = 0
    n_records: int = 0
    unfinished: set[bytes] = field(default_factory=set)


def replay_changelog(read_range: Callable[[], Iterable[list[tuple[bytes, bytes | None, bytes | None]]]],
                     apply: Callable[[list[tuple[bytes, bytes | None]]], object], end: int,
                     log_name: str = "changelog") -> RestoreResult:
    """The two passes of a restore over ``read_range()`` (a fresh iterator of record chunks,
    ``(key, value, tag)``, each call from the same start): the markers, then the complete
    batches' records to ``apply`` (a chunk at a time, in order)."""
    index = ChangelogIndex()
    for chunk in read_range():
        for key, value, tag in chunk:
            index.add(key, value, tag)
    replay, n_records = ChangelogReplay(index), 0
    for chunk in read_range():
        for key, value, tag in chunk:
            replay.add(key, value, tag)
        done = replay.take()
        if done:
            apply(done)
            n_records += len(done)
    if replay.n_skipped:
        logger.warning("changelog_unfinished %s records=%d keys_to_republish=%d (a writer stopped mid-batch: "
                       "skipped)", log_name, replay.n_skipped, len(replay.unfinished))
    return RestoreResult(end, replay.n_commits, n_records, replay.unfinished)


def read_changelog(reader, partition: int, from_offset: int, apply, topic: str = TOPIC_STORE_CHANGELOG,
                   timeout_s: float = 120.0) -> RestoreResult:
    """Replay ``topic[partition]`` from ``from_offset`` to its current end (:func:`replay_changelog`:
    the range is read twice, each pass within ``timeout_s``) through ``reader``, a
    :class:`streams.joiner.readback.PartitionReader`. Blocking (kafka-python): run it in an executor.

    A store that already holds state (``from_offset > 0``) can only be brought forward by a range
    that compaction has not touched: compaction drops the records a later one of the same key
    superseded and, once ``delete.retention.ms`` has passed, the tombstones themselves, so a delete
    this store never saw could be gone and its key would live on here. Every offset of the
    changelog holds a record (its producer is not transactional), so compaction shows as an offset
    without one: :class:`ChangelogCompacted` is raised then, from the first pass, before anything is
    applied (the caller rebuilds the store from offset 0). A restore from 0 reads the compacted log
    as the state it is."""
    with reader.partition(topic, partition) as rng:
        end = rng.end_offset()
        if end <= from_offset:
            return RestoreResult(end)

        def read_range():
            expected = from_offset
            for recs in rng.records(from_offset, end, timeout_s):
                if from_offset > 0 and recs:
                    if recs[0].offset != expected or recs[-1].offset != expected + len(recs) - 1:
                        raise ChangelogCompacted(partition, from_offset, _first_missing(recs, expected))
                    expected += len(recs)
                yield [(r.key, r.value, dict(r.headers or ()).get(HEADER_TAG)) for r in recs]
            if from_offset > 0 and expected != end:
                raise ChangelogCompacted(partition, from_offset, expected)

        return replay_changelog(read_range, apply, end, f"partition={partition}")


class ChangelogCompacted(Exception):
    """The changelog past a store's position has an offset without a record (compaction ran
    there): bringing the store forward could miss deletes (:func:`read_changelog`)."""

    def __init__(self, partition: int, from_offset: int, missing_at: int) -> None:
        super().__init__(f"changelog partition {partition}: offset {missing_at} (past {from_offset}) holds no "
                         "record: compacted")
        self.partition, self.from_offset, self.missing_at = partition, from_offset, missing_at


def _first_missing(recs, expected: int) -> int:
    for r in recs:
        if r.offset != expected:
            return expected
        expected += 1
    return expected
