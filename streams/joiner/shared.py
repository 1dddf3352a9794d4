"""Statistics shared across partitions: T1's ln(dwell) moments and T3's item P10 over every user.

Per-user state is co-partitioned, the global statistics are not. Each partition's pipeline
publishes the dwell contributions of its samples, one *statistics epoch* at a time, on the topic
``joiner.dwell`` (partition = the source partition); every worker reads all of it into a
:class:`RemoteStats` table; each pipeline folds the other partitions' contributions that have
arrived into its own store when it starts labelling an epoch (:class:`SharedStatsView`).

Messages (``encode_message``, little-endian, key = decimal source partition)::

    magic "SRS\\0" | version u8 | source u32 | from_epoch i64 | to_epoch i64 | n u32
    n records (epoch i64, item_id u64, dwell_ms i64, click_ts_ms i64), sorted by epoch

A message says: every contribution of the source's epochs in ``[from_epoch, to_epoch)`` is in it
(an epoch is complete once the source's watermark has passed its end: every sample closing in it
has been labelled). A restarted source publishes again from its last committed ``from_epoch``;
the table keeps only the epochs it has not seen yet, so duplicates are harmless.

>>> pub = StatsPublisher(source=2, epoch_ms=60_000)
>>> pub.add(epoch=0, item_id=7, dwell_ms=9_000, click_ts_ms=10)
>>> pub.publish(watermark_ms=59_998) is None   # epoch 0 not over yet
True
>>> msg = pub.publish(watermark_ms=59_999)
>>> table = RemoteStats(n_sources=3)
>>> table.add(msg), table.complete_before(2), table.take(2, 0, 1)["item_id"].tolist()
(True, 1, [7])
>>> table.add(msg)                              # seen: ignored
False
"""
from __future__ import annotations

import logging
import struct
import threading
from bisect import bisect_left

import numpy as np

from featurestore import DwellStats
from featurestore.store import StoreBatch

logger = logging.getLogger(__name__)

TOPIC_DWELL_STATS = "joiner.dwell"
#: one click's dwell contribution to the shared statistics
CONTRIB = np.dtype([("epoch", "<i8"), ("item_id", "<u8"), ("dwell_ms", "<i8"), ("click_ts_ms", "<i8")])
HEADER_STATS = "stats.applied"

_MAGIC = b"SRS\x00"
_VERSION = 1
_HEAD = struct.Struct("<4sBIqqI")
_STATE_HEAD = struct.Struct("<Bqqqii")  # version, frozen epoch, complete, published_before, n_applied, n_unpublished
_NO_EPOCH = -(2**62)


class SharedStatsError(ValueError):
    """A ``joiner.dwell`` message or a stored shared-statistics state that cannot be decoded."""


def encode_message(source: int, from_epoch: int, to_epoch: int, records: np.ndarray) -> bytes:
    recs = np.ascontiguousarray(records, dtype=CONTRIB)
    return _HEAD.pack(_MAGIC, _VERSION, source, from_epoch, to_epoch, len(recs)) + recs.tobytes()


def decode_message(value: bytes) -> tuple[int, int, int, np.ndarray]:
    """``(source, from_epoch, to_epoch, records)`` of a ``joiner.dwell`` message; every record's
    epoch lies in ``[from_epoch, to_epoch)``, in ascending order (SharedStatsError otherwise)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SharedStatsError("null value" if value is None else f"value of type {type(value).__name__}")
    if len(value) < _HEAD.size:
        raise SharedStatsError(f"truncated message: {len(value)} bytes")
    magic, version, source, lo, hi, n = _HEAD.unpack_from(value, 0)
    if magic != _MAGIC or version != _VERSION:
        raise SharedStatsError(f"bad magic or version: {magic!r} v{version}")
    if len(value) != _HEAD.size + n * CONTRIB.itemsize:
        raise SharedStatsError(f"wrong length {len(value)} for {n} records")
    if not 0 <= lo <= hi:
        raise SharedStatsError(f"epochs [{lo}, {hi}) is not a range of epochs >= 0")
    recs = np.frombuffer(value, dtype=CONTRIB, offset=_HEAD.size, count=n)
    epochs = recs["epoch"]
    if n and (epochs[0] < lo or epochs[-1] >= hi or (n > 1 and bool(np.any(epochs[1:] < epochs[:-1])))):
        raise SharedStatsError(f"record epochs not ascending within [{lo}, {hi})")
    return source, lo, hi, recs


class StatsPublisher:
    """Collects one partition's contributions and cuts them into messages at epoch ends."""

    def __init__(self, source: int, epoch_ms: int, published_before: int = _NO_EPOCH,
                 unpublished: list[tuple[int, int, int, int]] | None = None) -> None:
        self.source, self.epoch_ms = source, epoch_ms
        self.published_before = published_before
        self.unpublished: list[tuple[int, int, int, int]] = unpublished or []

    def add(self, epoch: int, item_id: int, dwell_ms: int, click_ts_ms: int) -> None:
        # an epoch already published cannot take more (only input beyond the lateness bound
        # closes a sample there): it counts in the first open epoch
        self.unpublished.append((max(epoch, self.published_before), item_id, dwell_ms, click_ts_ms))

    def publish(self, watermark_ms: int | None) -> bytes | None:
        """The message for the epochs that ended by ``watermark_ms`` (None: nothing new ended).

        Every sample with close <= the watermark has been labelled, so epoch e is complete once
        the watermark reaches ``(e + 1) * epoch_ms - 1``.
        """
        if watermark_ms is None:
            return None
        before = (watermark_ms + 1) // self.epoch_ms
        if before <= max(self.published_before, 0):
            return None
        done = [r for r in self.unpublished if r[0] < before]
        self.unpublished = [r for r in self.unpublished if r[0] >= before]
        recs = np.array(sorted(done, key=lambda r: r[0]), dtype=CONTRIB)  # stable: label order within an epoch
        lo = self.published_before if self.published_before != _NO_EPOCH else 0
        self.published_before = before
        return encode_message(self.source, lo, before, recs)


class RemoteStats:
    """Every source's published contributions (thread-safe: a feed thread adds, pipelines take).

    ``complete_before(q)``: the contributions of source ``q``'s epochs below it are all here.
    ``prune(q, before)`` drops source ``q``'s epochs below ``before`` (a worker prunes what every
    partition it holds has committed, so the table stays bounded); ``take`` then refuses to go
    below that epoch, and ``reset`` empties the table for a re-read of the topic.

    A local message (``add(..., local=True)``) that starts past ``complete_before(q)`` is held
    (``n_held``) until the messages before it arrive: a partition that moved to this worker
    publishes directly into the table (``JoinerRuntime``) while its previous owner's last
    messages may still be on their way through the feed, and taking the new one would mark the
    epochs in between complete without their contributions (the late messages would then be
    ignored as seen). A message from the topic cannot wait so: a source's messages are
    contiguous in its partition, so one that starts past what was read means records the feed
    will never see (retention removed them while it read). It is taken, and the epochs in
    between are recorded as missing (``n_gaps``, ``missing``). The first message of
    a source after a ``reset`` is taken wherever it starts when it comes from the topic (its
    retention may have removed the ones before it); a local one (``add(..., local=True)``) that
    starts past epoch 0 is held until the feed brings the source's first message, so a slow feed
    at startup cannot make the epochs before it look gone. ``first_epoch(q)`` says where the
    table of q starts, so a reader that needs earlier epochs of q can tell that they are gone
    (``SharedStatsView`` counts and logs it, as it does the epochs ``missing`` reports).
    """

    def __init__(self, n_sources: int) -> None:
        if n_sources < 1:
            raise ValueError(f"n_sources={n_sources!r} must be >= 1")
        self.n_sources = n_sources
        self._lock = threading.Lock()
        self.n_messages = self.n_records = self.n_pruned = self.n_held = self.n_gaps = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything (the counters stay): the caller reads the topic again from its start."""
        with self._lock:
            self._before = [_NO_EPOCH] * self.n_sources
            self._first = [_NO_EPOCH] * self.n_sources
            self._pruned = [_NO_EPOCH] * self.n_sources
            self._epochs: list[list[int]] = [[] for _ in range(self.n_sources)]
            self._chunks: list[list[np.ndarray]] = [[] for _ in range(self.n_sources)]
            self._held: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in range(self.n_sources)]
            self._gaps: list[list[tuple[int, int]]] = [[] for _ in range(self.n_sources)]

    def prune(self, source: int, before: int) -> int:
        """Drop ``source``'s contributions of epochs below ``before``; returns how many."""
        with self._lock:
            if before <= self._pruned[source]:
                return 0
            epochs, chunks = self._epochs[source], self._chunks[source]
            k = bisect_left(epochs, before)
            dropped = sum(len(c) for c in chunks[:k])
            del epochs[:k], chunks[:k]
            self._pruned[source] = before
            self.n_pruned += dropped
            return dropped

    def pruned_before(self, source: int) -> int:
        """The epoch below which ``source``'s contributions were pruned (a very small number if none)."""
        with self._lock:
            return self._pruned[source]

    def add(self, value: bytes, local: bool = False, partition: int | None = None) -> bool:
        """Take one message; False when it held nothing new (a re-publication after a restart).
        A local message past a gap is held until the gap is filled; one read from the topic is
        taken and the gap recorded as missing (see the class docstring).

        ``local``: the message was published by a partition of this worker, not read from the
        topic. It never starts a source's table past epoch 0: older messages of the source may
        still be on their way through the feed, so it is held until the feed's first message of
        the source (at the latest its own copy) arrives. ``partition``: the topic partition the
        message was read from, which must be its source's."""
        source, lo, hi, recs = decode_message(value)
        if not 0 <= source < self.n_sources:
            raise SharedStatsError(f"source={source} outside [0, {self.n_sources})")
        if partition is not None and partition != source:
            raise SharedStatsError(f"source={source} read from partition {partition}")
        with self._lock:
            seen = self._before[source]
            if hi <= seen:
                return False
            if seen != _NO_EPOCH and lo > seen and not local:
                self._gaps[source].append((seen, lo))
                self.n_gaps += 1
                logger.warning("stats_feed_gap source=%d epochs=[%d, %d) (gone from joiner.dwell before they "
                               "were read: retention?)", source, seen, lo)
                self._before[source] = lo
            elif (seen != _NO_EPOCH and lo > seen) or (seen == _NO_EPOCH and local and lo > 0):
                self._held[source].append((lo, hi, recs))
                self.n_held += 1
                logger.info("stats_message_held source=%d epochs=[%d, %d) complete_before=%d", source, lo,
                            hi, seen)
                return True
            if seen == _NO_EPOCH:
                self._first[source] = lo
            self._apply(source, hi, recs)
            held = self._held[source]
            held.sort(key=lambda m: m[0])
            while held and held[0][0] <= self._before[source]:  # what the message made contiguous
                _lo, h, r = held.pop(0)
                if h > self._before[source]:
                    self._apply(source, h, r)
            return True

    def _apply(self, source: int, hi: int, recs: np.ndarray) -> None:
        """Add the epochs of ``recs`` not seen yet and move ``complete_before(source)`` to ``hi``
        (under the lock)."""
        seen = max(self._before[source], self._pruned[source])  # pruned: no partition here needs them
        new = recs[recs["epoch"] >= seen] if seen != _NO_EPOCH else recs
        epochs, chunks = self._epochs[source], self._chunks[source]
        for e in np.unique(new["epoch"]).tolist():
            epochs.append(e)
            chunks.append(new[new["epoch"] == e])
        self._before[source] = hi
        self.n_messages += 1
        self.n_records += len(new)

    def seal(self) -> None:
        """The input has ended (the offline builder): every source is complete."""
        with self._lock:
            self._before = [2**62] * self.n_sources

    def first_epoch(self, source: int) -> int:
        """The first epoch of ``source`` the table was filled from: the ``from_epoch`` of the first
        message taken since the last reset (0 when it was the source's first message ever; a very
        small number before any message). Epochs below it were no longer in the topic when it was
        read, or came from a message taken out of order (neither is in the table)."""
        with self._lock:
            return self._first[source]

    def missing(self, source: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """The ranges of ``source``'s epochs that overlap ``[lo, hi)`` and that the table will never
        hold, in order: below ``first_epoch`` and the gaps the feed found (see the class docstring).
        Each starts at ``lo`` at the earliest and ends where the missing range ends."""
        with self._lock:
            first, gaps = self._first[source], self._gaps[source]
            out = [(lo, first)] if first != _NO_EPOCH and lo < first else []
            out += [(max(a, lo), b) for a, b in gaps if a < hi and b > lo]
        return out

    def complete_before(self, source: int) -> int:
        with self._lock:
            return self._before[source]

    def take(self, source: int, lo: int, hi: int) -> np.ndarray:
        """Contributions of ``source`` with ``lo <= epoch < hi``, in epoch order."""
        with self._lock:
            if lo < self._pruned[source]:
                raise SharedStatsError(f"source {source}: epochs below {self._pruned[source]} were pruned, "
                                       f"asked from {lo} (the table must be read again)")
            epochs, chunks = self._epochs[source], self._chunks[source]
            parts = chunks[bisect_left(epochs, lo):bisect_left(epochs, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=CONTRIB)


def fold_partials(partials: dict[int, DwellStats]) -> DwellStats | None:
    """The shards' partials merged in shard order (a single non-empty one is returned as is, so
    one partition's statistics stay bit-equal to the unshared ones); None when all are empty."""
    out = None
    for _shard, part in sorted(partials.items()):
        if part.ref_ts_ms is None:
            continue
        out = part if out is None else out.merge(part)
    return out


class SharedStatsView:
    """One pipeline's side of the shared statistics: what it publishes and what it has applied.

    ``freeze(tx, epoch, own)`` is called before a run of samples of ``epoch`` is labelled; on a new
    epoch it stages the other sources' contributions of epochs ``< epoch`` that have arrived (item
    sketches and the sources' ln(dwell) partials, under their own shards) and returns the T1
    moments of every shard and the provenance of the run: None when every source was complete
    up to ``epoch``, else ``b"epoch:a_0,...,a_{N-1}"`` where ``a_q`` is the first epoch of source
    q not applied (``epoch`` for the pipeline's own partition).
    """

    def __init__(self, partition: int, remote: RemoteStats | None, epoch_ms: int,
                 partials: dict[int, DwellStats], counters: dict[str, int], raw: bytes | None = None) -> None:
        self.partition, self.remote = partition, remote
        self.partials = partials  # shard -> DwellStats, kept bit-equal to the stored ones
        self._n = counters
        self.applied: dict[int, int] = {}
        self._gaps: dict[int, int] = {}  # source -> the end of the last missing range reported for it
        self.frozen_epoch, self.complete, published, unpublished = _NO_EPOCH, True, _NO_EPOCH, []
        if raw is not None:
            self.frozen_epoch, self.complete, published, self.applied, unpublished = _decode_state(raw)
        self.publisher = StatsPublisher(partition, epoch_ms, published, unpublished)
        self._merged: DwellStats | None = None
        self._provenance: bytes | None = None

    @property
    def enabled(self) -> bool:
        return self.remote is not None

    def freeze(self, tx: StoreBatch, epoch: int, own: DwellStats) -> tuple[DwellStats, bytes | None]:
        if self.remote is None:
            return own, None
        if epoch != self.frozen_epoch or self._merged is None:
            if epoch != self.frozen_epoch:
                self._apply(tx, epoch)
            self.partials[self.partition] = own
            self._merged = fold_partials(self.partials) or own
            self._provenance = None if self.complete else (
                f"{epoch}:" + ",".join(str(epoch if q == self.partition else self.applied.get(q, 0))
                                      for q in range(self.remote.n_sources))).encode()
        return self._merged, self._provenance

    def _apply(self, tx: StoreBatch, epoch: int) -> None:
        remote, complete, n_applied = self.remote, True, 0
        for q in range(remote.n_sources):
            if q == self.partition:
                continue
            lo = self.applied.get(q, 0)
            hi = min(epoch, remote.complete_before(q))
            if hi > lo:
                for a, b in remote.missing(q, lo, hi):
                    # epochs of q not in the table: its reading of joiner.dwell started past them,
                    # or skipped them (the topic's retention removed them): never silently
                    if self._gaps.get(q, _NO_EPOCH) >= b:
                        continue  # reported
                    self._gaps[q] = b
                    self._n["stats_remote_gaps"] = self._n.get("stats_remote_gaps", 0) + 1
                    logger.warning("stats_epochs_missing partition=%d source=%d epochs=[%d, %d) (not in "
                                   "joiner.dwell when it was read: retention?); labelling goes on without "
                                   "them", self.partition, q, a, b)
                recs = remote.take(q, lo, hi)
                part = self.partials.get(q)
                if part is None:
                    part = self.partials[q] = DwellStats.from_config(tx.config.dwell)
                tx.stage_global_dwell(part, shard=q)  # the in-memory partial is the stored one
                for item, dwell_ms, click_ts_ms in zip(recs["item_id"].tolist(), recs["dwell_ms"].tolist(),
                                                       recs["click_ts_ms"].tolist()):
                    tx.add_item_dwell(item, dwell_ms)
                    part.update(dwell_ms, click_ts_ms)
                n_applied += len(recs)
                self.applied[q] = hi
            complete &= self.applied.get(q, 0) >= epoch
        self.frozen_epoch, self.complete = epoch, complete
        n = self._n
        n["stats_epochs"] = n.get("stats_epochs", 0) + 1
        n["stats_epochs_incomplete"] = n.get("stats_epochs_incomplete", 0) + (not complete)
        n["stats_remote_applied"] = n.get("stats_remote_applied", 0) + n_applied

    def needs(self) -> dict[int, int]:
        """Per other source, the first epoch this partition has not applied yet ({} if not shared)."""
        if self.remote is None:
            return {}
        return {q: self.applied.get(q, 0) for q in range(self.remote.n_sources) if q != self.partition}

    def count_samples(self, n_clicked: int) -> None:
        """Clicked samples labelled on the current (frozen) epoch's statistics."""
        if self.remote is not None and not self.complete:
            self._n["stats_samples_incomplete"] = self._n.get("stats_samples_incomplete", 0) + n_clicked

    def to_bytes(self) -> bytes:
        pub = self.publisher
        applied = np.array(sorted(self.applied.items()), dtype="<i8").reshape(-1, 2)
        unpub = np.array(pub.unpublished, dtype=CONTRIB)
        return (_STATE_HEAD.pack(1, self.frozen_epoch, int(self.complete), pub.published_before, len(applied),
                                 len(unpub)) + applied.tobytes() + unpub.tobytes())


def _decode_state(raw: bytes):
    try:
        version, frozen, complete, published, n_applied, n_unpub = _STATE_HEAD.unpack_from(raw, 0)
        pos = _STATE_HEAD.size
        applied = np.frombuffer(raw, dtype="<i8", count=2 * n_applied, offset=pos).reshape(-1, 2)
        pos += applied.nbytes
        unpub = np.frombuffer(raw, dtype=CONTRIB, count=n_unpub, offset=pos)
    except (struct.error, ValueError) as exc:
        raise SharedStatsError(f"shared statistics state: {exc}") from None
    if version != 1 or pos + unpub.nbytes != len(raw):
        raise SharedStatsError(f"shared statistics state: version {version}, {len(raw)} bytes")
    return (frozen, bool(complete), published, {int(q): int(a) for q, a in applied.tolist()},
            [tuple(r) for r in unpub.tolist()])

