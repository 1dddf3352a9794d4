"""The transaction of :class:`~featurestore.store.RocksFeatureStore`: :class:`StoreBatch`.

Its lifecycle, read-modify-write staging and prefetching are described in :mod:`featurestore.store`.
A staged key is encoded once at ``prepare()``, in the order the keys were first updated.
:meth:`StoreBatch.user_rows` hands out the rows of many users at once
(:class:`~featurestore.userrows.UserRows`), for a writer that reads and updates the same users many
times per transaction.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from rocksdict import WriteBatch

from featurestore import OffsetRegressionError, TransactionStateError, codecs, keys
from featurestore.counters import WindowedCounter
from featurestore.dwellstats import DwellStats
from featurestore.keys import CounterKind, ItemCountField, SequenceKind
from featurestore.reader import CommitInfo, FeatureView
from featurestore.sequences import UserSequence
from featurestore.sketches import DwellSketch
from featurestore.userrows import N_SEQUENCES, UserRows

if TYPE_CHECKING:
    from featurestore.store import RocksFeatureStore

logger = logging.getLogger(__name__)

__all__ = ["StoreBatch"]

_ABSENT = object()
_first = operator.itemgetter(0)


class StoreBatch(FeatureView):
    """One transaction on a :class:`RocksFeatureStore` (see the module docstring)."""

    OPEN, PREPARED, COMMITTED, ABORTED, FAILED = "open", "prepared", "committed", "aborted", "failed"

    def __init__(self, store: RocksFeatureStore) -> None:
        self._store = store
        self.config = store.config
        self.state = self.OPEN
        self._cache: dict[bytes, object] = {}  # staged (to be written)
        self._read: dict[bytes, object | None] = {}  # decoded committed values (None: no key)
        self._raw: dict[bytes, bytes | None] = {}  # prefetched committed bytes, not decoded yet
        self._encoders: dict[bytes, Callable[[object], bytes]] = {}
        self._offsets: dict[tuple[str, int], int] = {}
        self._puts: dict[bytes, bytes | None] = {}  # raw values staged by put_raw (None: delete)
        self._republish: set[bytes] = set()  # keys whose committed bytes go out with the commit
        self._max_event_ts_ms = store._max_event_ts_ms
        self._prepared: tuple[CommitInfo | None, list[tuple[bytes, bytes | None]]] | None = None
        self.n_updates = 0

    # --- FeatureView primitives: committed bytes, overlaid with staged objects -----------
    def _get_many(self, keys_: list[bytes]) -> list[bytes | None]:
        return self._store._get_many(keys_)

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        return self._store._scan(prefix)

    def _load_many(self, keys_: list[bytes], decode: Callable[[bytes], object]) -> list[object | None]:
        cache, read, raws = self._cache, self._read, self._raw
        out: list[object | None] = []
        missing = None
        for i, k in enumerate(keys_):
            obj = cache.get(k)
            if obj is None:
                obj = read.get(k, _ABSENT)
                if obj is _ABSENT:
                    raw = raws.pop(k, _ABSENT)
                    if raw is _ABSENT:
                        missing = [] if missing is None else missing
                        missing.append(i)
                        obj = None
                    else:
                        obj = read[k] = None if raw is None else decode(raw)
            out.append(obj)
        if missing:
            fetched = self._store._get_many([keys_[i] for i in missing])
            for i, raw in zip(missing, fetched):
                out[i] = read[keys_[i]] = None if raw is None else decode(raw)
        return out

    def prefetch(self, keys_: Iterable[bytes]) -> int:
        """Read the committed values of ``keys_`` not loaded yet in one multi-get (decoded when
        first used); returns how many were fetched. Reads and updates then skip the database."""
        cache, read, raws = self._cache, self._read, self._raw
        todo = [k for k in dict.fromkeys(keys_) if k not in cache and k not in read and k not in raws]
        if todo:
            raws.update(zip(todo, self._store._get_many(todo)))
        return len(todo)

    def _dwell_partials(self) -> dict[int, DwellStats]:
        partials = super()._dwell_partials()
        for key, obj in self._cache.items():
            if key[0] == keys.Family.GLOBAL_DWELL:
                partials[keys.decode_key(key)[1][0]] = obj
        return partials

    # --- staging ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.state != self.OPEN:
            raise TransactionStateError(f"transaction is {self.state}")

    def _for_update(self, key: bytes, decode: Callable[[bytes], object], new: Callable[[], object],
                    encode: Callable[[object], bytes]) -> object:
        if self.state != self.OPEN:
            self._check_open()
        obj = self._cache.get(key)
        if obj is None:
            obj = self._read.pop(key, _ABSENT)
            if obj is _ABSENT:
                raw = self._raw.pop(key, _ABSENT)
                if raw is _ABSENT:
                    raw = self._store._require_db().get(key)
                obj = None if raw is None else decode(raw)
            if obj is None:
                obj = new()
            self._cache[key] = obj
            self._encoders[key] = encode
        self.n_updates += 1
        return obj

    def _saw(self, ts_ms: int) -> None:
        """Validate an event time before anything is staged and track the newest one."""
        if ts_ms < 0:
            raise ValueError(f"ts_ms={ts_ms!r} < 0")
        if ts_ms > self._max_event_ts_ms:
            self._max_event_ts_ms = ts_ms

    def _check_time(self, ts_ms: int) -> None:
        """:meth:`_saw`, then the transaction must be open (for updates of an object staged earlier,
        which skip :meth:`_for_update`)."""
        self._saw(ts_ms)
        if self.state != self.OPEN:
            self._check_open()

    def _check_entry(self, item_id: int, category: int, ts_ms: int) -> None:
        """The checks of a sequence entry, before anything is staged."""
        if not -1 <= category <= keys.I32_MAX:
            raise ValueError(f"category={category!r} out of range [-1, {keys.I32_MAX}]")
        if type(item_id) is not int or not 0 <= item_id <= keys.U64_MAX:
            keys.item_sketch_key(item_id)  # validates item_id like every other key field
        self._check_time(ts_ms)

    @staticmethod
    def _check_count(n: int) -> None:
        """The check of an event count ``n`` (a counter bucket is a u32)."""
        if not 0 <= n <= keys.U32_MAX:
            raise ValueError(f"n={n!r} is not in 0..{keys.U32_MAX}")

    def user_rows(self, user_ids: Iterable[int]) -> dict[int, UserRows]:
        """Each user's :class:`~featurestore.userrows.UserRows`: its sequences (decoded now) and
        counters (decoded on their first change), the committed values of every user fetched in
        one multi-get."""
        self._check_open()
        users = sorted(set(user_ids))
        row_keys = [keys.user_row_keys(u) for u in users]
        n = N_SEQUENCES
        seq_keys = [k for ks in row_keys for k in ks[:n]]
        # the sequence keys, then the counter keys: ascending key order, which the multi-get
        # serves faster (about 0.9 us a key instead of 1.4 on a memtable of 100K keys)
        self.prefetch([*seq_keys, *(k for ks in row_keys for k in ks[n:])])
        seqs = self._load_many(seq_keys, self._decode_sequence)
        return {u: UserRows(self, u, ks, seqs[n * i:n * i + n]) for i, (u, ks) in enumerate(zip(users, row_keys))}

    def add_sequence_event(self, user_id: int, kind: SequenceKind, item_id: int, category: int,
                           ts_ms: int, *, key: bytes | None = None) -> None:
        """Append ``item_id`` (with its ``category``, -1 = unknown) to the user's ``kind`` sequence.

        ``key``: ``keys.user_sequence_key(user_id, kind)`` when the caller already has it."""
        self._check_entry(item_id, category, ts_ms)
        seq = self._for_update(key or keys.user_sequence_key(user_id, kind), self._decode_sequence,
                               self._new_sequence, UserSequence.to_bytes)
        seq.add(item_id, category, ts_ms)

    def add_user_event(self, user_id: int, counter: CounterKind, ts_ms: int, n: int = 1, *,
                       key: bytes | None = None) -> None:
        """Count ``n`` events of ``counter`` for the user at event time ``ts_ms``.

        ``key``: ``keys.user_counter_key(user_id, counter)`` when the caller already has it."""
        self._check_count(n)
        self._saw(ts_ms)
        cnt = self._for_update(key or keys.user_counter_key(user_id, counter), self._decode_counter,
                               self._new_counter, WindowedCounter.to_bytes)
        cnt.add(ts_ms, n)

    def _new_sequence(self) -> UserSequence:
        return UserSequence(self.config.sequences.capacity)

    def _new_counter(self) -> WindowedCounter:
        return WindowedCounter.from_config(self.config.counters)

    def add_item_dwell(self, item_id: int, dwell_ms: float) -> None:
        """Feed one click's dwell into the item's dwell sketch (T3)."""
        if not dwell_ms >= 0:
            raise ValueError(f"dwell_ms={dwell_ms!r} < 0")
        k = self.config.sketch.k
        sk = self._for_update(keys.item_sketch_key(item_id), DwellSketch.from_bytes,
                              lambda: DwellSketch(k), DwellSketch.to_bytes)
        sk.update(dwell_ms)

    def add_item_count(self, item_id: int, field: ItemCountField, n: int = 1) -> None:
        if n < 0:
            raise ValueError(f"n={n!r} < 0")
        counts = self._for_update(keys.item_counts_key(item_id), _decode_counts,
                                  lambda: [0, 0, 0, 0], codecs.encode_item_counts)
        counts[ItemCountField(field)] += n

    def add_item_counts(self, item_id: int, n: list[int]) -> None:
        """Add ``n`` (impressions, clicks, likes, dislikes; :class:`ItemCountField` order) to the
        item's totals: :meth:`add_item_count` for the four fields at once."""
        if len(n) != 4 or min(n) < 0:
            raise ValueError(f"n={n!r} must be four counts >= 0")
        counts = self._for_update(keys.item_counts_key(item_id), _decode_counts,
                                  lambda: [0, 0, 0, 0], codecs.encode_item_counts)
        for i, v in enumerate(n):
            counts[i] += v

    def add_global_dwell(self, dwell_ms: float, ts_ms: int, shard: int = 0) -> None:
        """Feed one click's dwell into this writer's partial of the global ln(dwell) stats (T1);
        ``shard`` names the partial (e.g. the source partition), readers merge all shards."""
        if not dwell_ms >= 0:
            raise ValueError(f"dwell_ms={dwell_ms!r} < 0")
        self._saw(ts_ms)
        dcfg = self.config.dwell
        stats = self._for_update(keys.global_dwell_key(shard), self._decode_dwell,
                                 lambda: DwellStats.from_config(dcfg), DwellStats.to_bytes)
        stats.update(dwell_ms, ts_ms)

    def stage_global_dwell(self, stats: DwellStats, shard: int = 0) -> None:
        """Stage ``stats`` itself as the shard's partial of the global ln(dwell) statistics, encoded
        at ``prepare()`` with every update made to it until then.

        For a writer that keeps its partial in memory, equal to the stored one, and feeds it
        directly instead of calling :meth:`add_global_dwell` per click. Event times are not
        tracked: the caller has staged the events the clicks belong to."""
        self._check_open()
        key = keys.global_dwell_key(shard)
        current = self._cache.get(key)
        if current is not None and current is not stats:
            raise TransactionStateError(f"shard={shard}: another partial is staged already")
        self._read.pop(key, None)
        self._raw.pop(key, None)
        self._cache[key] = stats
        self._encoders[key] = DwellStats.to_bytes
        self.n_updates += 1

    def set_offset(self, topic: str, partition: int, offset: int) -> None:
        """Stage the next offset to consume (last applied + 1) for ``(topic, partition)``."""
        self._check_open()
        key = keys.offset_key(topic, partition)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset={offset!r} must be an int >= 0")
        current = self._offsets.get((topic, partition))
        if current is None:
            raw = self._store._get_many([key])[0]
            current = None if raw is None else codecs.decode_offset(raw)
        if current is not None and offset < current:
            raise OffsetRegressionError(f"topic={topic} partition={partition} offset={offset} "
                                        f"< committed {current}")
        self._offsets[(topic, partition)] = offset

    def put_raw(self, key: bytes, value: bytes | None) -> None:
        """Stage ``value`` as the bytes of ``key`` (None: delete the key) with the commit, for state
        its owner encodes itself (the joiner's metadata and join core). Not read back by this
        transaction; the key must not be one the typed updates above also stage."""
        self._check_open()
        self._puts[key] = value

    def republish(self, keys_: Iterable[bytes]) -> None:
        """Write the committed bytes of ``keys_`` again with the commit (a delete for a key with
        none), unless the commit writes the key anyway. For a changelog whose last record of a
        key belongs to a batch that was never committed (``streams.joiner.changelog``): the
        commit's records then carry the key's committed value past it."""
        self._check_open()
        self._republish.update(keys_)

    @property
    def pending_offsets(self) -> dict[tuple[str, int], int]:
        return dict(self._offsets)

    # --- lifecycle ------------------------------------------------------------------------------
    def prepare(self) -> list[tuple[bytes, bytes | None]]:
        """Encode the WriteBatch (state, offsets, then the commit record last) and freeze the
        transaction; returns its ``(key, value)`` pairs, value None for a deleted key ([] when
        nothing is staged)."""
        self._check_open()
        try:
            return self._prepare()
        except BaseException:
            # a value that cannot be encoded (e.g. a count past its u32 field): the transaction is
            # over, nothing was written, and the store takes a new one
            self._finish(self.FAILED)
            raise

    def _prepare(self) -> list[tuple[bytes, bytes | None]]:
        store = self._store
        changes: list[tuple[bytes, bytes | None]] = []
        if self._cache or self._offsets or self._puts or self._republish:
            info = CommitInfo(store._commit_seq + 1, self._max_event_ts_ms, store._now_ms())
            changes = [(key, self._encoders[key](obj)) for key, obj in self._cache.items()]
            changes += self._puts.items()
            changes += [(keys.offset_key(topic, partition), codecs.encode_offset(offset))
                        for (topic, partition), offset in self._offsets.items()]
            commit_key = keys.meta_key(keys.COMMIT_META)
            if self._republish:
                written = {key for key, _ in changes}
                again = sorted(k for k in self._republish if k not in written and k != commit_key)
                changes += zip(again, store._get_many(again))
            changes.append((commit_key, codecs.encode_commit(info.commit_seq, info.max_event_ts_ms, info.wall_ms)))
            self._prepared = (info, changes)
        else:
            self._prepared = (None, changes)
        self.state = self.PREPARED
        return changes

    @property
    def prepared_commit_seq(self) -> int | None:
        """The commit number :meth:`prepare` assigned (None: not prepared or nothing staged)."""
        return None if self._prepared is None or self._prepared[0] is None else self._prepared[0].commit_seq

    def commit(self, local: dict[bytes, bytes] | None = None) -> CommitInfo | None:
        """Write every staged update, offset and the commit record in one WriteBatch (the bytes
        :meth:`prepare` returned, when it was called), plus the ``local`` raw puts."""
        if self.state != self.PREPARED:
            self.prepare()
        store = self._store
        info, changes = self._prepared
        if info is None and not local:
            self._finish(self.COMMITTED)
            return store.commit_info()
        wb = WriteBatch(raw_mode=True)
        # in ascending key order (a stable sort: a repeated key keeps its last value): RocksDB
        # inserts sorted keys into its memtable about three times faster; one WriteBatch is applied
        # atomically whatever its order, and ``changes`` (the changelog records) keeps its own
        for key, value in sorted(changes, key=_first):
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
        for key, value in (local or {}).items():
            wb.put(key, value)
        try:
            store._require_db().write(wb, store._write_options)
        except BaseException:
            self._finish(self.FAILED)
            logger.error("featurestore_commit_failed path=%s commit_seq=%s", store.path,
                         None if info is None else info.commit_seq)
            raise
        if info is None:
            self._finish(self.COMMITTED)
            return store.commit_info()
        store._commit_seq = info.commit_seq
        store._max_event_ts_ms = info.max_event_ts_ms
        self._finish(self.COMMITTED)
        return info

    def abort(self) -> None:
        """Drop every staged update and offset; nothing is written."""
        if self.state in (self.OPEN, self.PREPARED):
            self._finish(self.ABORTED)

    def _finish(self, state: str) -> None:
        self.state = state
        self._cache.clear()
        self._read.clear()
        self._raw.clear()
        self._encoders.clear()
        self._offsets.clear()
        self._puts.clear()
        self._republish.clear()
        self._prepared = None
        if self._store._active is self:
            self._store._active = None

    def __enter__(self) -> "StoreBatch":
        self._check_open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Commit on a clean exit, abort on an exception; no-op if already committed or aborted."""
        if self.state not in (self.OPEN, self.PREPARED):
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _decode_counts(raw: bytes) -> list[int]:
    return list(codecs.decode_item_counts(raw))

