"""Read API: ``(user_id, ts_ms)`` / ``item_ids`` -> features, from the writer or another process.

:class:`FeatureView` holds the read logic over two primitives (multi get and prefix scan); the
writer (:class:`~featurestore.store.RocksFeatureStore`), its open transaction and
:class:`FeatureReader` all inherit it, so every reader sees the same features for the same bytes.

:class:`FeatureReader` opens the store path as a RocksDB *secondary* instance (default) or
read-only. A secondary never blocks the writer; it sees nothing new until :meth:`refresh`
(``try_catch_up_with_primary``), which replays the writer's WAL. A commit is one WAL record, so a
refresh exposes whole commits only: state and the offsets that cover it always agree. Staleness =
time since the last :meth:`refresh` plus the writer's commit interval; :meth:`staleness_ms` reports
``now - wall time of the last visible commit``. A reader is meant for one thread: a refresh
running between the gets of one ``user_features`` call could mix two commits.

>>> import tempfile
>>> from featurestore.store import RocksFeatureStore
>>> tmp = tempfile.TemporaryDirectory()
>>> writer = RocksFeatureStore(tmp.name)
>>> reader = FeatureReader(tmp.name)
>>> with writer.transaction() as tx:
...     tx.add_sequence_event(5, SequenceKind.LIKE, item_id=11, category=3, ts_ms=1_000)
...     tx.set_offset("feedback", 0, 1)
>>> reader.committed_offset("feedback", 0) is None      # not caught up yet
True
>>> reader.refresh().commit_seq, reader.user_features(5).like.item_ids.tolist()
(1, [11])
>>> reader.close(); writer.close(); tmp.cleanup()
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rocksdict import AccessType, Rdict, ReadOptions

from featurestore import FeatureStoreError, StoreClosedError, StoreNotFoundError, codecs, keys
from featurestore.config import FeatureStoreConfig, check_layout, with_layout
from featurestore.counters import WindowedCounter
from featurestore.dwellstats import DwellStats
from featurestore.keys import CounterKind, SequenceKind
from featurestore.sequences import EMPTY_SLICE, SequenceSlice, UserSequence
from featurestore.sketches import DwellSketch

logger = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class CommitInfo:
    """The newest commit: a counter, the newest event time it applied, and its wall time."""

    commit_seq: int
    max_event_ts_ms: int
    wall_ms: int


@dataclass(frozen=True)
class UserFeatures:
    """One user's features at ``ts_ms`` (None = everything stored): the four sequences strictly
    before ``ts_ms`` (at most ``max_len`` each, oldest first) and the windowed counts of the window
    ending at ``ts_ms`` (at the user's newest event when ``ts_ms`` is None)."""

    user_id: int
    ts_ms: int | None
    click: SequenceSlice
    unclick: SequenceSlice
    like: SequenceSlice
    dislike: SequenceSlice
    clicks_in_window: int
    impressions_in_window: int

    def sequence(self, kind: SequenceKind) -> SequenceSlice:
        return getattr(self, SequenceKind(kind).name.lower())


@dataclass(frozen=True)
class ItemFeatures:
    """Per-item features, aligned with ``item_ids``; ``dwell_quantile_ms`` is nan for an item with
    no dwell yet (the T3 rank, P10 by default)."""

    item_ids: np.ndarray            # (N,) uint64
    dwell_quantile_ms: np.ndarray   # (N,) float64
    n_dwell: np.ndarray             # (N,) int64
    impressions: np.ndarray         # (N,) int64
    clicks: np.ndarray              # (N,) int64
    likes: np.ndarray               # (N,) int64
    dislikes: np.ndarray            # (N,) int64


class FeatureView:
    """Feature assembly over a raw key-value view; subclasses provide ``_get_many`` and
    ``_scan``. ``_load*`` hooks decode values; a transaction overrides them to see its own writes."""

    config: FeatureStoreConfig

    # --- raw primitives -------------------------------------------------------------------
    def _get_many(self, keys_: list[bytes]) -> list[bytes | None]:
        raise NotImplementedError

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        raise NotImplementedError

    # --- decoded loads (overridden by transactions) --------------------------------------
    def _load_many(self, keys_: list[bytes], decode: Callable[[bytes], object]) -> list[object | None]:
        return [None if raw is None else decode(raw) for raw in self._get_many(keys_)]

    def _dwell_partials(self) -> dict[int, DwellStats]:
        prefix = keys.family_prefix(keys.Family.GLOBAL_DWELL)
        return {keys.decode_key(k)[1][0]: self._decode_dwell(v) for k, v in self._scan(prefix)}

    # --- decoders bound to the config -----------------------------------------------------
    def _decode_sequence(self, raw: bytes) -> UserSequence:
        return UserSequence.from_bytes(raw, self.config.sequences.capacity)

    def _decode_counter(self, raw: bytes) -> WindowedCounter:
        c = self.config.counters
        return WindowedCounter.from_bytes(raw, c.bucket_ms, c.window_buckets, c.late_buckets)

    def _decode_dwell(self, raw: bytes) -> DwellStats:
        return DwellStats.from_bytes(raw, self.config.dwell.min_dwell_ms)

    # --- public read API --------------------------------------------------------------------
    def _user_rows(self, user_id: int) -> tuple[list, list]:
        """The user's decoded sequences (SequenceKind order) and counters (CounterKind order), None
        where absent: one multi-get per family."""
        row_keys = keys.user_row_keys(user_id)
        n_seq = len(SequenceKind)
        return (self._load_many(row_keys[:n_seq], self._decode_sequence),
                self._load_many(row_keys[n_seq:], self._decode_counter))

    def _features_of(self, user_id: int, ts_ms: int | None, seqs: list, cnts: list) -> UserFeatures:
        n = self.config.sequences.max_len
        slices = [EMPTY_SLICE if seq is None else (seq.latest(n) if ts_ms is None else seq.before(ts_ms, n))
                  for seq in seqs]
        counts = [0 if c is None else (c.latest_count() if ts_ms is None else c.count(ts_ms))
                  for c in cnts]
        by_kind = dict(zip(SequenceKind, slices))
        by_counter = dict(zip(CounterKind, counts))
        return UserFeatures(user_id, ts_ms, by_kind[SequenceKind.CLICK],
                            by_kind[SequenceKind.UNCLICK], by_kind[SequenceKind.LIKE],
                            by_kind[SequenceKind.DISLIKE], by_counter[CounterKind.CLICK],
                            by_counter[CounterKind.IMPRESSION])

    def user_features(self, user_id: int, ts_ms: int | None = None) -> UserFeatures:
        """Sequences strictly before ``ts_ms`` and counters of the window ending at ``ts_ms``."""
        return self._features_of(user_id, ts_ms, *self._user_rows(user_id))

    def find_user_features(self, user_id: int, ts_ms: int | None = None) -> UserFeatures | None:
        """:meth:`user_features`, or None when no row of the user is stored (a sequence or a
        counter: a user whose impressions are still open has counters only). Picks the partition
        store that knows the user with one read."""
        seqs, cnts = self._user_rows(user_id)
        if all(x is None for x in (*seqs, *cnts)):
            return None
        return self._features_of(user_id, ts_ms, seqs, cnts)

    def has_user(self, user_id: int) -> bool:
        """Whether any row of the user is stored, a sequence or a counter."""
        seqs, cnts = self._user_rows(user_id)
        return any(x is not None for x in (*seqs, *cnts))

    def user_clicks_in_window(self, user_id: int, ts_ms: int) -> int:
        """T2 input: the user's clicks in the window ending at ``ts_ms``."""
        (c,) = self._load_many([keys.user_counter_key(user_id, CounterKind.CLICK)],
                               self._decode_counter)
        return 0 if c is None else c.count(ts_ms)

    def item_features(self, item_ids: Iterable[int]) -> ItemFeatures:
        ids = [int(i) for i in item_ids]
        q = self.config.sketch.quantile
        sketches = self._load_many([keys.item_sketch_key(i) for i in ids], DwellSketch.from_bytes)
        counts = self._load_many([keys.item_counts_key(i) for i in ids], _decode_item_counts)
        table = np.array([c if c is not None else [0, 0, 0, 0] for c in counts],
                         dtype=np.int64).reshape(len(ids), 4)      # (N, 4)
        return ItemFeatures(
            item_ids=np.array(ids, dtype=np.uint64),
            dwell_quantile_ms=np.array([math.nan if s is None else s.quantile(q) for s in sketches],
                                       dtype=np.float64),
            n_dwell=np.array([0 if s is None else s.n for s in sketches], dtype=np.int64),
            impressions=table[:, 0], clicks=table[:, 1], likes=table[:, 2], dislikes=table[:, 3])

    def item_dwell_sketch(self, item_id: int) -> DwellSketch | None:
        (s,) = self._load_many([keys.item_sketch_key(item_id)], DwellSketch.from_bytes)
        return s

    def global_dwell_stats(self) -> DwellStats:
        """All writer shards' partials merged into one (empty stats when none)."""
        merged = DwellStats.from_config(self.config.dwell)
        for _, partial in sorted(self._dwell_partials().items()):
            merged = merged.merge(partial)
        return merged

    def committed_offset(self, topic: str, partition: int) -> int | None:
        """Next offset to consume for ``(topic, partition)``, or None when never committed."""
        (raw,) = self._get_many([keys.offset_key(topic, partition)])
        return None if raw is None else codecs.decode_offset(raw)

    def committed_offsets(self) -> dict[tuple[str, int], int]:
        out = {}
        for k, v in self._scan(keys.family_prefix(keys.Family.OFFSET)):
            topic, partition = keys.decode_key(k)[1]
            out[(topic, partition)] = codecs.decode_offset(v)
        return out

    def commit_info(self) -> CommitInfo | None:
        (raw,) = self._get_many([keys.meta_key(keys.COMMIT_META)])
        return None if raw is None else CommitInfo(*codecs.decode_commit(raw))


def _decode_item_counts(raw: bytes) -> list[int]:
    return list(codecs.decode_item_counts(raw))


class RdictView(FeatureView):
    """:class:`FeatureView` over an open raw-mode ``Rdict``."""

    _db: Rdict | None

    def _require_db(self) -> Rdict:
        if self._db is None:
            raise StoreClosedError(f"{type(self).__name__} is closed")
        return self._db

    def _get_many(self, keys_: list[bytes]) -> list[bytes | None]:
        if not keys_:
            return []
        return self._require_db().get(keys_)

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        lo, hi = keys.prefix_range(prefix)
        ropts = ReadOptions()
        if hi is not None:
            ropts.set_iterate_upper_bound(hi)
        yield from self._require_db().items(from_key=lo, read_opt=ropts)


class FeatureReader(RdictView):
    """Reads a store that another process writes (see the module docstring).

    ``mode="secondary"`` (default) keeps its RocksDB info files in ``secondary_path`` (a temporary
    directory when None, removed on close); ``mode="read_only"`` reopens the DB on refresh.
    ``config`` None takes the layout settings the store recorded; a config whose layout differs
    from them raises :class:`LayoutMismatchError`.
    """

    def __init__(self, path: str | Path, config: FeatureStoreConfig | None = None, *,
                 mode: str = "secondary", secondary_path: str | Path | None = None,
                 now_ms: Callable[[], int] = wall_clock_ms) -> None:
        if mode not in ("secondary", "read_only"):
            raise ValueError(f"mode={mode!r} must be 'secondary' or 'read_only'")
        self.path = str(path)
        self.config = config or FeatureStoreConfig()
        self._config_given = config is not None
        self._layout_seen = False
        self.mode = mode
        self._now_ms = now_ms
        self._own_tmp = None
        self._db = None
        self._require_store()
        if mode == "secondary" and secondary_path is None:
            self._own_tmp = tempfile.mkdtemp(prefix="featurestore-secondary-")
            secondary_path = self._own_tmp
        self._secondary_path = None if secondary_path is None else str(secondary_path)
        try:
            self._db = self._open()
            self._take_layout()
        except BaseException:
            self.close()  # the temporary secondary directory must not outlive a failed open
            raise
        self.last_refresh_ms = self._now_ms()
        logger.info("featurestore_reader_open path=%s mode=%s commit_seq=%s", self.path, mode,
                    getattr(self.commit_info(), "commit_seq", None))

    def _take_layout(self) -> None:
        """The store's recorded layout settings: taken when no config was given, checked against
        one that was (a store from before the record was written has none: the config stands)."""
        (raw,) = self._get_many([keys.meta_key(keys.LAYOUT_META)])
        if raw is None:
            return
        self._layout_seen = True
        if not self._config_given:
            try:
                self.config = with_layout(self.config, raw)
            except ValueError as exc:
                raise FeatureStoreError(f"feature store at path={self.path}: {exc}") from None
        else:
            check_layout(self.path, raw, self.config, "give the reader no config to take the store's, or the "
                                                    "writer's settings", whose="the reader's config")

    def _require_store(self) -> None:
        """Checked before every open and catch-up: RocksDB would create an empty directory in a
        moved store's place (read-only open), or keep serving the old files (secondary)."""
        if not (Path(self.path) / "CURRENT").exists():
            raise StoreNotFoundError(f"no feature store at path={self.path} (never created, moved or removed)")

    def _open(self) -> Rdict:
        """A new handle on the store; the current one, if any, is left untouched."""
        opts = self.config.to_rocksdict_options(create=False)
        if self.mode == "secondary":
            access = AccessType.secondary(self._secondary_path)
        else:
            access = AccessType.read_only(False)
        try:
            return Rdict(self.path, opts, access_type=access)
        except Exception as exc:  # rocksdict raises a bare Exception with RocksDB's status text
            raise FeatureStoreError(f"cannot open the feature store at path={self.path}: {exc}") from exc

    def refresh(self) -> CommitInfo | None:
        """Make the writer's newest commits visible; returns the newest visible commit.

        Raises :class:`StoreNotFoundError` when the store directory is gone and
        :class:`FeatureStoreError` when RocksDB fails; either way the reader keeps serving what it
        saw before, and a later refresh can succeed once the store is back.
        """
        db = self._require_db()
        self._require_store()
        if self.mode == "secondary":
            try:
                db.try_catch_up_with_primary()
            except Exception as exc:  # rocksdict raises a bare Exception
                raise FeatureStoreError(f"cannot catch up with the feature store at path={self.path}: "
                                        f"{exc}") from exc
        else:
            self._db = self._open()  # swapped in only once it opened
            db.close()
        if not self._layout_seen:    # opened before the writer recorded it
            self._take_layout()
        self.last_refresh_ms = self._now_ms()
        return self.commit_info()

    def staleness_ms(self) -> int | None:
        """``now - wall time of the newest visible commit`` (None before the first commit)."""
        info = self.commit_info()
        return None if info is None else self._now_ms() - info.wall_ms

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._own_tmp is not None:
            shutil.rmtree(self._own_tmp, ignore_errors=True)
            self._own_tmp = None

    def __enter__(self) -> "FeatureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
