"""The writer: :class:`RocksFeatureStore` and its transaction, :class:`StoreBatch`
(:mod:`featurestore.batch`).

Lifecycle of a transaction (one at a time per store)::

    OPEN --commit()--> COMMITTED          state + offsets + commit record: one WriteBatch
      |  \\--abort() or an exception in ``with``--> ABORTED      nothing written
      \\--write fails--> FAILED             nothing written; the worker should crash and resume
    OPEN --prepare()--> PREPARED --commit(local)--> COMMITTED    (changelogged stores, below)

Updates are read-modify-write: the first update of a key loads and decodes its value, later
updates in the same transaction change the decoded object in memory, and ``commit()`` encodes each
touched key once into a ``rocksdict.WriteBatch`` together with every staged ``(topic, partition)
-> next offset`` and the commit record. RocksDB applies a WriteBatch atomically (one WAL record),
so after any crash the reopened store holds the state of exactly the commits whose offsets it
reports: resume consuming at :meth:`~featurestore.reader.FeatureView.committed_offset`.

A changelogged writer calls ``prepare()`` first: it encodes the WriteBatch and returns its
``(key, value)`` pairs, which the caller produces to the changelog; ``commit(local)`` then writes
exactly those bytes (plus ``local``, bookkeeping that is not state, e.g. the changelog position).
:meth:`RocksFeatureStore.apply_changes` writes changelog records back (restore); a value None
deletes its key.

Reads inside a transaction (``tx.user_features``, ``tx.item_features``, ...) see its own staged
updates; reads on the store see committed state only. A transaction keeps what it read decoded
(a key read and then updated is loaded once: reading a value never changes it, so the bytes
written stay a function of the updates alone), and :meth:`StoreBatch.prefetch` loads many keys in
one multi-get, e.g. every key a batch of samples will touch.

>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> store = RocksFeatureStore(tmp.name)
>>> with store.transaction() as tx:
...     tx.add_sequence_event(user_id=7, kind=SequenceKind.CLICK, item_id=3, category=1, ts_ms=100)
...     tx.add_user_event(user_id=7, counter=CounterKind.CLICK, ts_ms=100)
...     tx.add_item_dwell(item_id=3, dwell_ms=12_000)
...     tx.set_offset("clicks", 0, 1)
>>> store.committed_offset("clicks", 0), store.user_features(7, ts_ms=101).click.item_ids.tolist()
(1, [3])
>>> store.user_features(7, ts_ms=100).click.item_ids.tolist()    # strictly before
[]
>>> store.item_features([3, 4]).dwell_quantile_ms.tolist()
[12000.0, nan]
>>> store.close(); tmp.cleanup()
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from rocksdict import Rdict, WriteBatch

from featurestore import TransactionStateError, keys
from featurestore.batch import StoreBatch
from featurestore.config import FeatureStoreConfig, check_layout, encode_layout
from featurestore.dwellstats import DwellStats
from featurestore.keys import CounterKind, SequenceKind  # noqa: F401  (the module doctest uses them)
from featurestore.reader import CommitInfo, ItemFeatures, RdictView, UserFeatures, wall_clock_ms

logger = logging.getLogger(__name__)

__all__ = ["CommitInfo", "FeatureStore", "RocksFeatureStore", "StoreBatch"]


class FeatureStore(Protocol):
    """The role the joiner writes and the learner / scoring read."""

    def transaction(self) -> "StoreBatch": ...
    def committed_offset(self, topic: str, partition: int) -> int | None: ...
    def user_features(self, user_id: int, ts_ms: int | None = None) -> UserFeatures: ...
    def item_features(self, item_ids: Iterable[int]) -> ItemFeatures: ...
    def global_dwell_stats(self) -> DwellStats: ...
    def close(self) -> None: ...


class RocksFeatureStore(RdictView):
    """The primary (read-write) instance on ``path``; reopening recovers the last commit."""

    def __init__(self, path: str | Path, config: FeatureStoreConfig | None = None, *,
                 now_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.path = str(path)
        self.config = config or FeatureStoreConfig()
        self._now_ms = now_ms
        self._write_options = self.config.to_write_options()
        self._db: Rdict | None = Rdict(self.path, self.config.to_rocksdict_options())
        self._active: StoreBatch | None = None
        try:
            self._check_layout()
        except BaseException:
            self._db.close()
            self._db = None
            raise
        info = self.commit_info()
        self._commit_seq = 0 if info is None else info.commit_seq
        self._max_event_ts_ms = -1 if info is None else info.max_event_ts_ms
        logger.info("featurestore_open path=%s commit_seq=%d n_offsets=%d", self.path,
                    self._commit_seq, len(self.committed_offsets()))

    def apply_changes(self, changes: Iterable[tuple[bytes, bytes | None]]) -> int:
        """Write changelog records (puts; None deletes) in one WriteBatch; returns how many.

        For restoring a store from its changelog: the records must be whole commits (each ends
        with its commit record), in changelog order.
        """
        db = self._require_db()
        if self._active is not None:
            raise TransactionStateError("cannot apply changes while a transaction is open")
        wb = WriteBatch(raw_mode=True)
        n = 0
        for key, value in changes:
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
            n += 1
        if n:
            db.write(wb, self._write_options)
            info = self.commit_info()
            self._commit_seq = 0 if info is None else info.commit_seq
            self._max_event_ts_ms = -1 if info is None else info.max_event_ts_ms
        return n

    def _check_layout(self) -> None:
        """Record the layout settings in a new store; refuse a config whose layout differs from
        the one a store was written with (its values would be misread without an error)."""
        key = keys.meta_key(keys.LAYOUT_META)
        (raw,) = self._get_many([key])
        if raw is None:
            self._db.put(key, encode_layout(self.config), self._write_options)
        else:
            check_layout(self.path, raw, self.config, "open it with the settings it was written with, or start "
                                                     "a new store")

    def clear(self) -> int:
        """Delete every key but the layout record (a store about to be rebuilt from its
        changelog); returns how many."""
        layout = keys.meta_key(keys.LAYOUT_META)
        found = [k for k in self._require_db().keys() if k != layout]
        for i in range(0, len(found), 10_000):  # one WriteBatch per 10K deletes, not one for the whole store
            self.apply_changes((key, None) for key in found[i:i + 10_000])
        return len(found)

    def transaction(self) -> "StoreBatch":
        """Begin the (only) open transaction; use it as a context manager or call commit/abort."""
        self._require_db()
        if self._active is not None:
            raise TransactionStateError("a transaction is already open on this store")
        self._active = StoreBatch(self)
        return self._active

    def flush(self) -> None:
        """Flush memtables to SST files (not needed for durability; the WAL has every commit)."""
        self._require_db().flush(True)

    def close(self) -> None:
        if self._active is not None:
            self._active.abort()
        if self._db is not None:
            self._db.close()
            self._db = None
            logger.info("featurestore_close path=%s commit_seq=%d", self.path, self._commit_seq)

    def __enter__(self) -> "RocksFeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
