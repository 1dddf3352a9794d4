"""Windowed event-time counter with fixed-width buckets (clicks in the trailing 7 days).

An event at ``ts_ms`` lands in bucket ``b = ts_ms // bucket_ms``. ``count(ts_ms)`` is the sum of
the ``window_buckets + 1`` buckets ``b(ts_ms) - window_buckets .. b(ts_ms)``: every event in
``[ts_ms - window_ms, ts_ms]`` is counted, plus those earlier than that in the oldest bucket (by
less than ``bucket_ms``) and those later than ``ts_ms`` inside its own bucket. (``window_buckets``
buckets alone would miss the part of ``[ts_ms - window_ms, ts_ms]`` in the bucket below them unless
``ts_ms`` is at a bucket boundary.)

Only buckets ``>= newest - retain_buckets + 1`` are kept (``newest`` = bucket of the latest event,
``retain_buckets = window_buckets + 1 + late_buckets``). An event older than that is dropped and
counted in ``n_dropped``; a query is exact while its window lies inside the kept range, i.e.
``b(ts_ms) >= newest - late_buckets``. Order of arrival does not matter otherwise: the state is a
function of the multiset of kept events.

>>> c = WindowedCounter(bucket_ms=10, window_buckets=3, late_buckets=1)
>>> for ts in (0, 5, 12, 25, 31):
...     c.add(ts)
>>> c.count(31), c.count(29), c.count(19)     # buckets 0..3, -1..2, -2..1
(5, 4, 3)
>>> c.add(1); c.n_dropped                      # bucket 0 is still kept (>= 3 - 5 + 1)
0
>>> c.add(52); c.add(3); c.n_dropped           # newest is 5 now: bucket 0 is gone, 3 is too late
1
"""
from __future__ import annotations

from featurestore import codecs
from featurestore.config import retained_buckets


class WindowedCounter:
    """Per-key bucketed event-time counter (see the module docstring)."""

    __slots__ = ("bucket_ms", "window_buckets", "retain_buckets", "n_dropped", "_newest", "_buckets")

    def __init__(self, bucket_ms: int, window_buckets: int, late_buckets: int = 0) -> None:
        if bucket_ms <= 0 or window_buckets <= 0 or late_buckets < 0:
            raise ValueError(f"bucket_ms={bucket_ms!r}, window_buckets={window_buckets!r} must be > 0 "
                             f"and late_buckets={late_buckets!r} >= 0")
        self.bucket_ms = bucket_ms
        self.window_buckets = window_buckets
        self.retain_buckets = retained_buckets(window_buckets, late_buckets)
        self.n_dropped = 0
        self._newest: int | None = None
        self._buckets: dict[int, int] = {}

    @classmethod
    def from_config(cls, config) -> "WindowedCounter":
        """From a :class:`~featurestore.config.CounterConfig`."""
        return cls(config.bucket_ms, config.window_buckets, config.late_buckets)

    def add(self, ts_ms: int, n: int = 1) -> None:
        if ts_ms < 0:
            raise ValueError(f"ts_ms={ts_ms!r} < 0")
        if n < 0:
            raise ValueError(f"n={n!r} < 0")
        b = ts_ms // self.bucket_ms
        newest = self._newest
        if newest is not None and b <= newest - self.retain_buckets:
            self.n_dropped += n
            return
        buckets = self._buckets
        buckets[b] = buckets.get(b, 0) + n
        if newest is None or b > newest:
            self._newest = b
            floor = b - self.retain_buckets
            for old in [k for k in buckets if k <= floor]:
                del buckets[old]

    def count(self, ts_ms: int) -> int:
        """Events in the window that ends with the bucket of ``ts_ms`` (see the module docstring)."""
        hi = ts_ms // self.bucket_ms
        lo = hi - self.window_buckets
        return sum(c for b, c in self._buckets.items() if lo <= b <= hi)

    def latest_count(self) -> int:
        """``count`` as of the newest event seen (0 when empty)."""
        if self._newest is None:
            return 0
        return self.count(self._newest * self.bucket_ms)

    @property
    def newest_ts_ms(self) -> int | None:
        """Start of the newest bucket, or None when nothing was added."""
        return None if self._newest is None else self._newest * self.bucket_ms

    def to_bytes(self) -> bytes:
        keys = sorted(self._buckets)
        newest = -1 if self._newest is None else self._newest
        return codecs.encode_counter(keys, list(map(self._buckets.__getitem__, keys)), newest, self.n_dropped)

    @classmethod
    def from_bytes(cls, data: bytes, bucket_ms: int, window_buckets: int,
                   late_buckets: int = 0) -> "WindowedCounter":
        if type(data) is not bytes:
            data = bytes(data)
        n, newest, n_dropped = codecs.counter_header(data)
        c = cls(bucket_ms, window_buckets, late_buckets)
        c._newest = None if newest < 0 else newest
        off = codecs.COUNTER_HEADER_BYTES
        c._buckets = dict(zip(codecs.column(codecs.I64, data[off:off + 8 * n]),
                              codecs.column(codecs.U32, data[off + 8 * n:off + 12 * n])))
        c.n_dropped = n_dropped
        return c
