"""Per-item dwell-time quantile sketch (T3: dwell >= the item's historical P10).

A thin wrapper over Apache DataSketches' KLL float sketch. KLL's error is in rank, not in value:
``quantile(q)`` returns a stored dwell whose true normalized rank is within ``rank_error`` of
``q`` (about 1.65 % for k = 200, at the 99th percentile of trials). Until the sketch holds more
than about ``k`` values it keeps every value and is exact. Merging two sketches gives a sketch of
the union of both streams with the same error guarantee. No decay: the quantile is over the item's
whole history, as the paper's "historical dwell time records".

>>> s = DwellSketch(k=200)
>>> s.update_many(np.arange(1, 101) * 1000)
>>> s.n, s.quantile(0.1), s.rank_error < 0.02
(100, 10000.0, True)
>>> t = DwellSketch.from_bytes(s.to_bytes())
>>> t.n, t.quantile(0.5) == s.quantile(0.5)
(100, True)
>>> DwellSketch().quantile(0.1)
nan
"""
from __future__ import annotations

import math

import numpy as np
from datasketches import kll_floats_sketch

from featurestore import CodecError, codecs


class DwellSketch:
    """KLL sketch of one item's dwell times in milliseconds."""

    __slots__ = ("_sk",)

    def __init__(self, k: int = 200, _sketch: kll_floats_sketch | None = None) -> None:
        self._sk = _sketch if _sketch is not None else kll_floats_sketch(k)

    @property
    def k(self) -> int:
        return self._sk.k

    @property
    def n(self) -> int:
        return self._sk.n

    @property
    def rank_error(self) -> float:
        """Single-sided normalized rank error of ``quantile`` for this ``k``."""
        return kll_floats_sketch.get_normalized_rank_error(self._sk.k, False)

    def update(self, dwell_ms: float) -> None:
        if not dwell_ms >= 0:  # also rejects nan
            raise ValueError(f"dwell_ms={dwell_ms!r} < 0")
        self._sk.update(float(dwell_ms))

    def update_many(self, dwell_ms: np.ndarray) -> None:
        arr = np.ascontiguousarray(dwell_ms, dtype=np.float32)
        if arr.size and not (arr >= 0).all():
            raise ValueError("dwell_ms has negative or nan values")
        self._sk.update(arr)

    def quantile(self, q: float) -> float:
        """Approximate ``q``-quantile (inclusive ranks: the smallest value with rank >= q); nan when
        empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q={q!r} must be in [0, 1]")
        if self._sk.is_empty():
            return math.nan
        return float(self._sk.get_quantile(q, True))

    def rank(self, dwell_ms: float) -> float:
        """Approximate fraction of values <= ``dwell_ms`` (nan when empty)."""
        if self._sk.is_empty():
            return math.nan
        return float(self._sk.get_rank(float(dwell_ms), True))

    def merge(self, other: "DwellSketch") -> None:
        """Fold ``other`` into this sketch (``other`` is unchanged)."""
        self._sk.merge(other._sk)

    def to_bytes(self) -> bytes:
        return codecs.encode_sketch(self._sk.serialize())

    @classmethod
    def from_bytes(cls, data: bytes) -> "DwellSketch":
        raw = codecs.decode_sketch(data)
        try:
            return cls(_sketch=kll_floats_sketch.deserialize(raw))
        except (RuntimeError, ValueError, IndexError) as exc:
            raise CodecError(f"bad_sketch: {exc}") from None
