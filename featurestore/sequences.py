"""Bounded per-user behaviour sequence with point-in-time reads.

Entries ``(ts_ms, item_id, category)`` are kept sorted by ``ts_ms``; entries with equal ``ts_ms``
keep their arrival order. At most ``capacity`` entries are kept: when full, the oldest is evicted,
and an entry older than every retained one is rejected; ``n_dropped`` counts both.

Out-of-order inserts: the sequence always holds the ``capacity`` greatest entries by
``(ts_ms, arrival)`` of everything ever added, whatever the arrival order. So ``before(ts_ms, n)``
equals "the last ``n`` entries with ``ts`` < ``ts_ms`` among everything added" whenever at most
``capacity - n`` added entries have ``ts >= ts_ms``. With ``capacity = max_len + slack`` and
``n = max_len`` that bound is ``slack``: the joiner may apply up to ``slack`` newer events of a
user before it samples an impression, and the impression's sequence stays exact.

>>> seq = UserSequence(capacity=3)
>>> for ts, item in [(10, 1), (30, 3), (20, 2), (40, 4)]:
...     seq.add(item_id=item, category=0, ts_ms=ts)
>>> seq.before(35, n=5).item_ids.tolist()      # strictly before 35; 1 was evicted by 4
[2, 3]
>>> seq.before(30, n=1).ts_ms.tolist()
[20]
>>> seq.add(item_id=0, category=0, ts_ms=5); seq.n_dropped   # evicted 1, then rejected 0
2
"""
from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

import numpy as np

from featurestore import codecs

@dataclass(frozen=True)
class SequenceSlice:
    """A slice of one sequence, oldest first; three aligned arrays of length L <= n."""

    item_ids: np.ndarray    # (L,) uint64
    categories: np.ndarray  # (L,) int32, -1 = unknown
    ts_ms: np.ndarray       # (L,) int64

    def __len__(self) -> int:
        return int(self.ts_ms.shape[0])

    def padded(self, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(items (length,) int64, cats (length,) int64, mask (length,) bool)``, most recent
        last, left-padded with ``pad_id``; keeps the last ``length`` entries.

        >>> SequenceSlice(np.array([7], np.uint64), np.array([2], np.int32),
        ...               np.array([1], np.int64)).padded(3)[2].tolist()
        [False, False, True]
        """
        if length < 0:
            raise ValueError(f"length={length!r} < 0")
        m = min(len(self), length)
        items = np.full(length, pad_id, dtype=np.int64)   # (T,)
        cats = np.full(length, pad_id, dtype=np.int64)    # (T,)
        mask = np.zeros(length, dtype=bool)               # (T,)
        if m:
            items[length - m:] = self.item_ids[len(self) - m:].astype(np.int64)
            cats[length - m:] = self.categories[len(self) - m:]
            mask[length - m:] = True
        return items, cats, mask


EMPTY_SLICE = SequenceSlice(np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int64))


class UserSequence:
    """One bounded behaviour sequence of one user (see the module docstring)."""

    __slots__ = ("capacity", "n_dropped", "_ts", "_items", "_cats")

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity={capacity!r} must be > 0")
        self.capacity = capacity
        self.n_dropped = 0
        # native arrays (codecs.column): an insert or an eviction is one memmove, a slice one memcpy
        self._ts = array(codecs.I64)      # (n,) ts_ms, ascending
        self._items = array(codecs.U64)   # (n,) item_id
        self._cats = array(codecs.I32)    # (n,) category

    def __len__(self) -> int:
        return len(self._ts)

    def add(self, item_id: int, category: int, ts_ms: int) -> None:
        if ts_ms < 0:
            raise ValueError(f"ts_ms={ts_ms!r} < 0")
        ts = self._ts
        full = len(ts) >= self.capacity
        if full and ts_ms < ts[0]:
            self.n_dropped += 1
            return
        pos = bisect_right(ts, ts_ms)
        items, cats = self._items, self._cats
        # an out-of-range value raises OverflowError before the sequence changes
        items.insert(pos, item_id)
        try:
            cats.insert(pos, category)
            try:
                ts.insert(pos, ts_ms)
            except (OverflowError, TypeError):
                del cats[pos]
                raise
        except (OverflowError, TypeError):
            del items[pos]
            raise
        if full:
            del ts[0], items[0], cats[0]
            self.n_dropped += 1

    def before(self, ts_ms: int, n: int) -> SequenceSlice:
        """The last ``n`` entries with ``ts < ts_ms``, oldest first."""
        if n < 0:
            raise ValueError(f"n={n!r} < 0")
        end = bisect_left(self._ts, ts_ms)
        return self._slice(max(0, end - n), end)

    def entries_before(self, ts_ms: int, n: int) -> tuple[list[int], list[int], list[int]]:
        """``before(ts_ms, n)`` as plain lists ``(ts_ms, item_ids, categories)``, oldest first, for
        callers that go on in Python (no numpy arrays built).

        >>> seq = UserSequence(capacity=4)
        >>> for ts in (10, 20, 30):
        ...     seq.add(item_id=ts // 10, category=-1, ts_ms=ts)
        >>> seq.entries_before(30, n=5)
        ([10, 20], [1, 2], [-1, -1])
        """
        if n < 0:
            raise ValueError(f"n={n!r} < 0")
        ts = self._ts
        end = bisect_left(ts, ts_ms)
        start = max(0, end - n)
        if start >= end:
            return [], [], []
        return ts[start:end].tolist(), self._items[start:end].tolist(), self._cats[start:end].tolist()

    def items_before(self, ts_ms: int, n: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """``before(ts_ms, n)`` as ``(newest ts_ms, item_ids, categories)``, tuples oldest first
        (newest -1 when empty): what a sample snapshot holds.

        >>> seq = UserSequence(capacity=4)
        >>> for ts in (10, 20, 30):
        ...     seq.add(item_id=ts // 10, category=-1, ts_ms=ts)
        >>> seq.items_before(30, n=1), seq.items_before(10, n=5)
        ((20, (2,), (-1,)), (-1, (), ()))
        """
        if n < 0:
            raise ValueError(f"n={n!r} < 0")
        ts = self._ts
        end = bisect_left(ts, ts_ms)
        if not end or not n:
            return -1, (), ()
        start = end - n if end > n else 0
        return ts[end - 1], tuple(self._items[start:end]), tuple(self._cats[start:end])

    def count_before(self, ts_ms: int, n: int, since_ms: int) -> int:
        """How many of ``before(ts_ms, n)`` have ``ts >= since_ms`` (a windowed count over the last
        ``n`` entries, by bisection).

        >>> seq = UserSequence(capacity=8)
        >>> for ts in (10, 20, 30, 40):
        ...     seq.add(item_id=1, category=0, ts_ms=ts)
        >>> seq.count_before(40, n=8, since_ms=15), seq.count_before(40, n=1, since_ms=0)
        (2, 1)
        """
        if n < 0:
            raise ValueError(f"n={n!r} < 0")
        ts = self._ts
        end = bisect_left(ts, ts_ms)
        lo = max(end - n, bisect_left(ts, since_ms, 0, end))
        return max(0, end - lo)

    def latest(self, n: int) -> SequenceSlice:
        """The last ``n`` entries whatever their time, oldest first."""
        if n < 0:
            raise ValueError(f"n={n!r} < 0")
        return self._slice(max(0, len(self._ts) - n), len(self._ts))

    def _slice(self, start: int, end: int) -> SequenceSlice:
        if start >= end:
            return EMPTY_SLICE
        # each slice is a fresh array that nothing resizes, so numpy may wrap it without a copy
        return SequenceSlice(np.frombuffer(self._items[start:end], dtype=np.uint64),
                             np.frombuffer(self._cats[start:end], dtype=np.int32),
                             np.frombuffer(self._ts[start:end], dtype=np.int64))

    def to_bytes(self) -> bytes:
        """The ``codecs`` sequence layout (same bytes as :func:`codecs.encode_sequence`)."""
        return b"".join((codecs.encode_sequence_header(len(self._ts), self.n_dropped),
                         codecs.column_bytes(self._ts), codecs.column_bytes(self._items),
                         codecs.column_bytes(self._cats)))

    @classmethod
    def from_bytes(cls, data: bytes, capacity: int) -> "UserSequence":
        """Decode; a stored sequence longer than ``capacity`` keeps its newest entries."""
        if capacity <= 0:
            raise ValueError(f"capacity={capacity!r} must be > 0")
        if type(data) is not bytes:
            data = bytes(data)
        n, n_dropped = codecs.sequence_header(data)
        start = max(0, n - capacity)
        off = codecs.SEQUENCE_HEADER_BYTES
        seq = cls.__new__(cls)
        seq.capacity = capacity
        column = codecs.column
        seq._ts = column(codecs.I64, data[off + 8 * start:off + 8 * n])
        seq._items = column(codecs.U64, data[off + 8 * n + 8 * start:off + 16 * n])
        seq._cats = column(codecs.I32, data[off + 16 * n + 4 * start:off + 20 * n])
        seq.n_dropped = n_dropped + start
        return seq
