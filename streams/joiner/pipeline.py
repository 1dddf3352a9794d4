"""One partition's joiner, faust-free: events -> JoinCore -> snapshots + statistics -> samples.

The single place where the join is wired; the faust worker (``streams.joiner.app``) and the offline
builder (``streamrec build-samples``) both drive a :class:`JoinerPipeline` per partition, so both
produce the same bytes for the same per-partition event sequence.

Per call to :meth:`JoinerPipeline.process` (one batch: the worker's merged fetches, a ``build-samples``
chunk):

1. ``JoinCore.process`` -> the impressions that closed (in close order), late events, orphans.
2. Closed impressions are cut into runs of one *statistics epoch* (``label_ts_ms //
   stats_epoch_ms``). For each sample of a run, in close order: read the user's four sequences
   strictly before the impression's ts (the snapshot) and the user's clicks in ``[click ts - 7 d,
   click ts)`` (T2) from the open store transaction, merged with the outcomes of the user's
   impressions shown before the sample's close that close after it (later in this call, or still
   pending in the core), then stage that sample's own user updates. Every entry carries the time
   it became known: a click its first click, an unclick the impression's close, a like / dislike
   its first like / dislike. So a snapshot holds exactly what had happened before the impression,
   never its own outcome nor anything later (``streams.joiner.snapshot``).
3. ``label_batch`` judges the run with the global ln(dwell) moments (T1) and item P10 sketches
   (T3) as of the start of its epoch: a run's item and global updates are deferred (and kept in
   the committed state) until a sample of a later epoch is labelled. Since the core closes
   impressions in ``(close, impression_id)`` order whatever the batching, every sample depends
   only on the partition's event sequence, not on how it was cut into batches or commits.
4. :meth:`JoinerPipeline.commit` writes all staged state, the join core's changed records
   (``JoinCore.state_changes``), the counters, the source offsets and caller metadata in ONE
   WriteBatch (``featurestore`` transaction).

Statistics: T1's moments and T3's sketches are fed by the clicks of this partition's users and,
when a :class:`~streams.joiner.shared.RemoteStats` table is given, by the other partitions'
clicks of earlier epochs that have arrived (``streams.joiner.shared``; the pipeline publishes its
own through :attr:`PipelineOutput.stats`). See docs/joiner.md, "Several workers", for the
staleness bound. T2 counts come from the click sequence (exact up to ``max_len`` entries)
plus the first clicks of the impressions that close after the sample (see docs/joiner.md, "Valid
read", for the exact definition and its bound).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from featurestore import DwellStats, FeatureStoreConfig, RocksFeatureStore
from featurestore import keys as fs_keys
from featurestore.store import StoreBatch
from streams.contracts import Event
from streams.joiner.config import DAY_MS, JoinerConfig
from streams.joiner.join import JoinCore
from streams.joiner.records import JoinedImpression, JoinOutput, LateEvent, OrphanEvent
from streams.joiner.shared import HEADER_STATS, RemoteStats, SharedStatsView
from streams.joiner.snapshot import UserSnapshots, stage_user, unsettled_entries
from streams.joiner.stats import DeferredItemStats, FrozenStoreStatistics
from streams.joiner.validread import RULE_T1, RULE_T2, RULE_T3, StatisticsColumns, encode_labelled
from streams.samples import FLAG_CLICKED, FLAG_VALID_READ, Snapshot

logger = logging.getLogger(__name__)

CORE_META = b"joiner.core"  # the whole join core in one blob: stores written before JOIN_STATE records
COUNTERS_META = b"joiner.counters"
DEFERRED_META = b"joiner.deferred"
SHARED_META = b"joiner.shared"


@dataclass(frozen=True)
class PipelineConfig:
    """The join (``joiner``), the store (``store``) and the labelling cadence.

    ``stats_epoch_ms``: T1/T3 statistics are frozen per epoch of label time; a sample closing in
    epoch e is judged on the clicks of samples that closed in earlier epochs (T2 and the snapshot
    are not frozen: they see every outcome before the impression / click, see the module
    docstring). ``t2_window_ms``: the T2 look-back. ``shared_stats``: T1/T3 also use the other
    partitions' clicks (published on ``joiner.dwell``; the offline builder uses all of them);
    False keeps them per partition.
    """

    joiner: JoinerConfig = field(default_factory=JoinerConfig)
    store: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    stats_epoch_ms: int = 60_000
    t2_window_ms: int = 7 * DAY_MS
    shared_stats: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.shared_stats, bool):
            raise ValueError(f"shared_stats={self.shared_stats!r} is not a bool")
        for name in ("stats_epoch_ms", "t2_window_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.store.sequences.max_len < self.joiner.seq_len:
            raise ValueError(f"store sequences.max_len={self.store.sequences.max_len} < joiner "
                             f"seq_len={self.joiner.seq_len}: snapshots would be cut short")


@dataclass
class PipelineOutput:
    """What one call produced: encoded samples (with their Kafka keys and headers: the
    ``stats.applied`` provenance of samples judged on incomplete shared statistics, else None),
    late events, orphans, and the ``joiner.dwell`` messages to publish (shared statistics)."""

    samples: list[bytes] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)
    orphans: list[OrphanEvent] = field(default_factory=list)
    headers: list[list[tuple[str, bytes]] | None] = field(default_factory=list)
    stats: list[bytes] = field(default_factory=list)

    def extend(self, other: PipelineOutput) -> None:
        self.samples += other.samples
        self.keys += other.keys
        self.late += other.late
        self.orphans += other.orphans
        self.headers += other.headers
        self.stats += other.stats


def _stage_meta(tx: StoreBatch, name: bytes, value: bytes | None) -> None:
    tx.put_raw(fs_keys.meta_key(name), value)


class JoinerPipeline:
    """The joiner of one source partition over its own :class:`RocksFeatureStore`.

    The store must be this pipeline's alone (one writer per path). State found in the store (a
    previous run's commit) is restored: the core from its records, the counters, the offsets.
    ``remote``: the other partitions' published statistics (None: this partition's only).
    """

    def __init__(self, partition: int, store: RocksFeatureStore, config: PipelineConfig,
                 remote: RemoteStats | None = None) -> None:
        self.partition = partition
        self.store = store
        self.config = config
        core = JoinCore.from_state(store._scan(fs_keys.family_prefix(fs_keys.Family.JOIN_STATE)), config.joiner)
        self._legacy_core = False  # True: the core came from a CORE_META blob, rewritten as records next commit
        self.republish_staged = False  # True: the open transaction republishes keys (see republish)
        if core is None and (blob := self.meta(CORE_META)) is not None:
            core = JoinCore.from_bytes(blob, config.joiner)
            core.touch_all()
            self._legacy_core = True
        restored = core is not None
        self.core = core if restored else JoinCore(config.joiner)
        raw = self.meta(COUNTERS_META)
        self._n: dict[str, int] = {} if raw is None else json.loads(raw)
        # this partition's partial of the global ln(dwell) moments, kept bit-equal to the stored one
        (raw,) = store._get_many([fs_keys.global_dwell_key(partition)])
        dcfg = config.store.dwell
        self._dwell = (DwellStats.from_config(dcfg) if raw is None
                       else DwellStats.from_bytes(raw, dcfg.min_dwell_ms))
        # the item statistics of the epoch being labelled wait until a later epoch starts
        self._deferred = DeferredItemStats(partition, self._dwell, self.meta(DEFERRED_META))
        partials = store._dwell_partials()
        partials[partition] = self._dwell
        self._shared = SharedStatsView(partition, remote if config.shared_stats else None, config.stats_epoch_ms,
                                       partials, self._n, self.meta(SHARED_META))
        #: what the committed state still needs of the other partitions' statistics (pruning bound)
        self.shared_needs_committed = self._shared.needs()
        self._shared_needs_staged: dict[int, int] = {}
        self._snapshots = UserSnapshots(config.joiner.seq_len, config.store.sequences.max_len, config.t2_window_ms)
        self._tx: StoreBatch | None = None
        logger.info("pipeline_open partition=%d restored=%s watermark_ms=%s samples=%d", partition,
                    restored, self.core.watermark_ms, self._n.get("samples", 0))

    # -- reads ---------------------------------------------------------------------------------
    def meta(self, name: bytes) -> bytes | None:
        """A committed metadata value (the counters, or what a caller stored)."""
        (raw,) = self.store._get_many([fs_keys.meta_key(name)])
        return raw

    def committed_offset(self, topic: str) -> int | None:
        """Next offset of ``topic`` (this partition) to consume, per the last commit."""
        return self.store.committed_offset(topic, self.partition)

    def counters(self) -> dict[str, int]:
        """Join-core counters and the pipeline's own (samples, valid reads by rule, dead letters)."""
        return {**self.core.counters(), **self._n}

    # -- processing ----------------------------------------------------------------------------
    def process(self, events: list[Event]) -> PipelineOutput:
        """Join ``events`` (arrival order) and label what closed; state is staged until :meth:`commit`."""
        return self._emit(self.core.process(events))

    def advance(self, event_time_ms: int) -> PipelineOutput:
        """Move event time forward without events (an idle partition)."""
        return self._emit(self.core.advance(event_time_ms))

    def finish(self) -> PipelineOutput:
        """End of input: move event time past every pending close and orphan deadline.

        Unlike ``JoinCore.flush`` the emitted tombstones are kept, so a duplicate arriving after
        this is still recognised.
        """
        t = finish_time_ms(self.core)
        return PipelineOutput() if t is None else self.advance(t)

    def count_dead_letter(self, topic: str, code: str, n: int = 1) -> None:
        """Count a message that went to the dead-letter topic (persisted with the next commit)."""
        key = f"dead_letter.{topic}.{code}"
        self._n[key] = self._n.get(key, 0) + n
        self._n["dead_letter"] = self._n.get("dead_letter", 0) + n

    def count_changelog_rebuild(self) -> None:
        """Count a store cleared and rebuilt from its changelog's start because compaction had run
        past it (``ChangelogCompacted``; persisted with the next commit)."""
        self._n["changelog_compacted_rebuilds"] = self._n.get("changelog_compacted_rebuilds", 0) + 1

    def count_skipped_offsets(self, topic: str, n: int) -> None:
        """Count source offsets found to hold no records (persisted with the next commit)."""
        for key in (f"source_offsets_skipped.{topic}", "source_offsets_skipped"):
            self._n[key] = self._n.get(key, 0) + n

    def commit(self, source_offsets: dict[str, int] | None = None,
               meta: dict[bytes, bytes] | None = None) -> None:
        """Write staged state + join-core records + counters + ``source_offsets`` + ``meta`` in one WriteBatch.

        ``source_offsets``: topic -> next offset to consume on this partition.
        """
        self.prepare(source_offsets, meta)
        self.commit_prepared()

    def prepare(self, source_offsets: dict[str, int] | None = None,
                meta: dict[bytes, bytes] | None = None) -> tuple[int | None, list[tuple[bytes, bytes]]]:
        """Stage as :meth:`commit` does and encode the WriteBatch without writing it: returns
        ``(commit number, its (key, value) pairs)`` for a changelog; then :meth:`commit_prepared`."""
        tx = self._stage_commit(source_offsets, meta)
        changes = tx.prepare()
        return tx.prepared_commit_seq, changes

    def commit_prepared(self, local: dict[bytes, bytes] | None = None) -> None:
        """Write the prepared WriteBatch plus ``local`` metadata (not state: not changelogged)."""
        self._tx.commit({fs_keys.meta_key(k): v for k, v in (local or {}).items()})
        self._tx = None
        self.shared_needs_committed = self._shared_needs_staged
        self._legacy_core = False
        self.republish_staged = False

    def note_restore(self, n_records: int) -> None:
        """Count a restore of this store from its changelog that applied ``n_records`` records
        (persisted with the next commit)."""
        self._n["restored_from_changelog"] = self._n.get("restored_from_changelog", 0) + 1
        self._n["restored_records"] = self._n.get("restored_records", 0) + n_records

    def republish(self, keys: Iterable[bytes]) -> int:
        """Stage the committed values of ``keys`` for the next commit (``StoreBatch.republish``:
        the changelog's last records of these keys belong to a batch that was never committed);
        returns how many (counter ``changelog_republished``)."""
        keys = set(keys)
        if keys:
            self._open().republish(keys)
            self._n["changelog_republished"] = self._n.get("changelog_republished", 0) + len(keys)
            self.republish_staged = True
        return len(keys)

    def _stage_commit(self, source_offsets, meta) -> StoreBatch:
        tx = self._open()
        for topic, offset in (source_offsets or {}).items():
            tx.set_offset(topic, self.partition, offset)
        for key, value in self.core.state_changes():
            tx.put_raw(key, value)
        if self._legacy_core:
            _stage_meta(tx, CORE_META, None)
        _stage_meta(tx, COUNTERS_META, json.dumps(self._n, sort_keys=True).encode())
        _stage_meta(tx, DEFERRED_META, self._deferred.to_bytes())
        if self._shared.enabled:
            _stage_meta(tx, SHARED_META, self._shared.to_bytes())
        self._shared_needs_staged = self._shared.needs()
        for name, value in (meta or {}).items():
            _stage_meta(tx, name, value)
        return tx

    def close(self) -> None:
        """Drop uncommitted work (it is redone from the committed offsets) and close the store."""
        if self._tx is not None:
            self._tx.abort()
            self._tx = None
        self.store.close()

    # -- internals -----------------------------------------------------------------------------
    def _open(self) -> StoreBatch:
        if self._tx is None:
            self._tx = self.store.transaction()
        return self._tx

    def _emit(self, out: JoinOutput) -> PipelineOutput:
        result = PipelineOutput(late=out.late, orphans=out.orphans)
        if out.samples:
            tx = self._open()
            result.samples = self._label(out.samples, tx, result.headers)
            result.keys = [str(j.impression.user_id).encode() for j in out.samples]
            self._count(result.samples)
        if self._shared.enabled:
            msg = self._shared.publisher.publish(self.core.watermark_ms)
            if msg is not None:
                result.stats.append(msg)
        return result

    def _label(self, joined: list[JoinedImpression], tx: StoreBatch,
               headers: list[list[tuple[str, bytes]] | None]) -> list[bytes]:
        epoch_ms = self.config.stats_epoch_ms
        snapshots = self._snapshots
        # the outcomes of impressions that close after a sample (later in this call, or still
        # pending in the core) but happened before it: see unsettled_entries
        by_user: dict[int, list[int]] = {}
        for idx, s in enumerate(joined):
            by_user.setdefault(s.impression.user_id, []).append(idx)
        pending = self.core.pending_records(by_user)
        # every user's rows in one multi-get, every item the call may touch in another
        users = tx.user_rows(by_user)
        deferred = self._deferred
        tx.prefetch(deferred.item_keys(joined, epoch_ms))
        shared = self._shared.publisher if self._shared.enabled else None
        columns = StatisticsColumns(self.config.joiner)
        snaps: list[Snapshot] = []
        i, n = 0, len(joined)
        while i < n:
            epoch = joined[i].label_ts_ms // epoch_ms
            j = i + 1
            while j < n and joined[j].label_ts_ms // epoch_ms == epoch:
                j += 1
            if deferred.epoch not in (None, epoch):
                deferred.apply(tx)
            t2_counts: list[int] = []
            for idx in range(i, j):
                s = joined[idx]
                rows = users[s.impression.user_id]
                snaps.append(snapshots.read(rows, s, t2_counts, unsettled_entries(joined, idx, by_user, pending)))
                stage_user(rows, s)
            run = joined[i:j]
            dwell, provenance = self._shared.freeze(tx, epoch, self._dwell)
            # the run's statistics are read now (its epoch's); the samples are encoded together
            columns.add(run, FrozenStoreStatistics(tx, dwell), t2_counts)
            header = None if provenance is None else [(HEADER_STATS, provenance)]
            headers += [header if s.clicked else None for s in run]
            deferred.add_run(epoch, run)  # the run's item statistics wait until a later epoch starts
            if shared is not None:
                for s in run:
                    if s.clicked and s.dwell_ms >= 0:
                        shared.add(epoch, s.impression.item_id, s.dwell_ms, s.click_ts_ms)
                self._shared.count_samples(sum(s.clicked for s in run))
            i = j
        return encode_labelled(joined, snaps, columns.columns(), self.config.joiner)

    def _count(self, values: list[bytes]) -> None:
        n = self._n
        flags = bytes(v[3] for v in values)
        rules = bytes(v[4] for v in values)
        f = np.frombuffer(flags, dtype=np.uint8)
        r = np.frombuffer(rules, dtype=np.uint8)
        valid = (f & FLAG_VALID_READ) != 0
        updates = {
            "samples": len(values),
            "clicked": int(np.count_nonzero(f & FLAG_CLICKED)),
            "valid_read": int(np.count_nonzero(valid)),
            "rule_t1": int(np.count_nonzero(valid & ((r & RULE_T1) != 0))),
            "rule_t2": int(np.count_nonzero(valid & ((r & RULE_T2) != 0))),
            "rule_t3": int(np.count_nonzero(valid & ((r & RULE_T3) != 0))),
        }
        for k, v in updates.items():
            n[k] = n.get(k, 0) + v


def finish_time_ms(core: JoinCore) -> int | None:
    """The event time that ends the input of ``core``: its watermark then passes every pending
    close and orphan deadline (None before the first event)."""
    w = core.watermark_ms
    if w is None:
        return None
    cfg = core.config
    max_ts = w + cfg.allowed_lateness_ms
    # the new watermark (this - lateness) passes max_ts + window and max_ts + orphan grace
    return max_ts + max(cfg.label_window_ms, cfg.orphan_grace_ms) + cfg.allowed_lateness_ms + 1


def open_pipeline(path, partition: int, config: PipelineConfig, remote: RemoteStats | None = None,
                  restore=None) -> JoinerPipeline:
    """A pipeline over the store at ``path`` (created when missing; restored when present).

    ``restore(store)``, when given, brings the opened store up to date (from its changelog)
    before the pipeline reads it; it returns ``(batches, records, unfinished, rebuilt)``: the
    batches and records applied, the keys whose last changelog record was never committed
    (republished by the next commit: :meth:`JoinerPipeline.republish`), and whether the store was
    cleared and rebuilt from the changelog's start (compaction had run past it).
    """
    store = RocksFeatureStore(path, config.store)
    try:
        n_commits, n_records, unfinished, rebuilt = restore(store) if restore is not None else (0, 0, (), False)
    except BaseException:
        store.close()
        raise
    pipe = JoinerPipeline(partition, store, config, remote)
    if rebuilt:
        pipe.count_changelog_rebuild()
    if n_commits:
        pipe.note_restore(n_records)
    pipe.republish(unfinished)
    return pipe
