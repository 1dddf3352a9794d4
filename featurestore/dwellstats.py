"""Streaming mu / sigma of ln(dwell) over clicks, exponentially decayed in event time (T1).

Each click contributes ``x = ln(max(dwell_ms, min_dwell_ms))`` with weight

    w_i = 2 ** (-(t_ref - t_i) / half_life_ms)

where ``t_ref`` is the newest event time seen so far. The state is the weighted count ``W``, the
weighted mean ``mu`` and the weighted sum of squared deviations ``M2``; ``sigma = sqrt(M2 / W)``.
When ``t_ref`` advances by ``dt`` every old weight shrinks by the same factor ``2 ** (-dt / h)``,
so ``W`` and ``M2`` are scaled and ``mu`` is unchanged; an out-of-order click (``t_i < t_ref``)
simply enters with its smaller weight. The state is therefore a function of the multiset of
``(t_i, x_i)`` (up to float rounding): arrival order does not matter, and two partial states merge
exactly by aligning both to the larger ``t_ref`` and combining with the parallel-variance formula.

``half_life_ms=None`` gives ``w_i = 1``: the exact mean and population standard deviation.

The T1 threshold is ``x_l = exp(mu - sigma)``; ``x_h = exp(mu + sigma)`` is the paper's upper
dwell threshold (section 2.3).

>>> s = DwellStats(half_life_ms=None)
>>> for d in (1000, 10000, 100000):
...     s.update(dwell_ms=d, ts_ms=0)
>>> round(s.mu, 4), round(s.sigma, 4), round(s.x_l_ms)
(9.2103, 1.8801, 1526)
>>> a, b = DwellStats(86_400_000), DwellStats(86_400_000)
>>> a.update(dwell_ms=2000, ts_ms=0); b.update(dwell_ms=8000, ts_ms=86_400_000)
>>> m = a.merge(b)
>>> round(m.weight, 3), round(math.exp(m.mu))    # the older click weighs half
(1.5, 5040)
"""
from __future__ import annotations

import math

from featurestore import codecs


class DwellStats:
    """Decayed moments of ln(dwell_ms) (see the module docstring)."""

    __slots__ = ("half_life_ms", "min_dwell_ms", "ref_ts_ms", "weight", "_mean", "_m2", "n")

    def __init__(self, half_life_ms: float | None = None, min_dwell_ms: float = 1.0) -> None:
        if half_life_ms is not None and not half_life_ms > 0:
            raise ValueError(f"half_life_ms={half_life_ms!r} must be > 0 or None")
        if not min_dwell_ms > 0:
            raise ValueError(f"min_dwell_ms={min_dwell_ms!r} must be > 0")
        self.half_life_ms = half_life_ms
        self.min_dwell_ms = min_dwell_ms
        self.ref_ts_ms: int | None = None
        self.weight = 0.0    # W, sum of weights
        self._mean = 0.0     # weighted mean of ln(dwell_ms)
        self._m2 = 0.0       # weighted sum of squared deviations
        self.n = 0           # clicks seen, undecayed

    @classmethod
    def from_config(cls, config) -> "DwellStats":
        """From a :class:`~featurestore.config.DwellStatsConfig`."""
        return cls(config.half_life_ms, config.min_dwell_ms)

    def _factor(self, dt_ms: float) -> float:
        if self.half_life_ms is None:
            return 1.0
        return 2.0 ** (-dt_ms / self.half_life_ms)

    def _advance(self, ts_ms: int) -> None:
        """Move ``t_ref`` forward to ``ts_ms`` (no-op when it is not newer)."""
        if self.ref_ts_ms is None:
            self.ref_ts_ms = ts_ms
        elif ts_ms > self.ref_ts_ms:
            f = self._factor(ts_ms - self.ref_ts_ms)
            self.weight *= f
            self._m2 *= f
            self.ref_ts_ms = ts_ms

    def update(self, dwell_ms: float, ts_ms: int) -> None:
        if not dwell_ms >= 0:
            raise ValueError(f"dwell_ms={dwell_ms!r} < 0")
        if ts_ms < 0:  # the encoding keeps "no reference time yet" as -1
            raise ValueError(f"ts_ms={ts_ms!r} < 0")
        x = math.log(max(dwell_ms, self.min_dwell_ms))
        # _advance, _factor and _add inlined (the joiner calls this per click): same operations in
        # the same order, so the state is bit-equal to the composed methods'
        h = self.half_life_ms
        ref = self.ref_ts_ms
        if ref is None:
            ref = self.ref_ts_ms = ts_ms
        elif ts_ms > ref:
            if h is not None:
                f = 2.0 ** (-(ts_ms - ref) / h)
                self.weight *= f
                self._m2 *= f
            ref = self.ref_ts_ms = ts_ms
        w = 1.0 if h is None else 2.0 ** (-(ref - ts_ms) / h)
        weight = self.weight
        total = weight + w
        if total > 0.0:
            delta = x - self._mean
            self._mean += delta * w / total
            self._m2 += 0.0 + delta * delta * weight * w / total
            self.weight = total
        self.n += 1

    def _add(self, w: float, mean: float, m2: float) -> None:
        """Combine a weighted group (w, mean, m2) into the state (Chan et al., weighted)."""
        total = self.weight + w
        if total <= 0.0:
            return
        delta = mean - self._mean
        self._mean += delta * w / total
        self._m2 += m2 + delta * delta * self.weight * w / total
        self.weight = total

    def merge(self, other: "DwellStats") -> "DwellStats":
        """A new state equal to one fed both streams; neither input changes."""
        if self.half_life_ms != other.half_life_ms or self.min_dwell_ms != other.min_dwell_ms:
            raise ValueError(f"cannot merge half_life_ms={self.half_life_ms!r}/"
                             f"min_dwell_ms={self.min_dwell_ms!r} with {other.half_life_ms!r}/"
                             f"{other.min_dwell_ms!r}")
        out = self.copy()
        if other.ref_ts_ms is None:
            return out
        out._advance(other.ref_ts_ms)
        f = out._factor(out.ref_ts_ms - other.ref_ts_ms)
        out._add(other.weight * f, other._mean, other._m2 * f)
        out.n += other.n
        return out

    def copy(self) -> "DwellStats":
        out = DwellStats(self.half_life_ms, self.min_dwell_ms)
        out.ref_ts_ms, out.weight, out._mean, out._m2, out.n = (
            self.ref_ts_ms, self.weight, self._mean, self._m2, self.n)
        return out

    @property
    def mu(self) -> float:
        """Weighted mean of ln(dwell_ms); nan when empty."""
        return self._mean if self.weight > 0 else math.nan

    @property
    def sigma(self) -> float:
        """Weighted population std of ln(dwell_ms); nan when empty."""
        return math.sqrt(max(self._m2, 0.0) / self.weight) if self.weight > 0 else math.nan

    @property
    def x_l_ms(self) -> float:
        """T1 valid-read threshold ``exp(mu - sigma)`` in ms; nan when empty."""
        return math.exp(self.mu - self.sigma)

    @property
    def x_h_ms(self) -> float:
        """Upper dwell threshold ``exp(mu + sigma)`` in ms; nan when empty."""
        return math.exp(self.mu + self.sigma)

    def to_bytes(self) -> bytes:
        ref = -1 if self.ref_ts_ms is None else self.ref_ts_ms
        return codecs.encode_dwell_stats(self.half_life_ms or 0.0, ref, self.weight, self._mean,
                                         self._m2, self.n)

    @classmethod
    def from_bytes(cls, data: bytes, min_dwell_ms: float = 1.0) -> "DwellStats":
        half_life, ref, weight, mean, m2, n = codecs.decode_dwell_stats(data)
        s = cls(half_life if half_life > 0 else None, min_dwell_ms)
        s.ref_ts_ms = None if ref < 0 else ref
        s.weight, s._mean, s._m2, s.n = weight, mean, m2, n
        return s

    def __repr__(self) -> str:
        return (f"DwellStats(n={self.n}, weight={self.weight:.6g}, mu={self.mu:.6g}, "
                f"sigma={self.sigma:.6g}, ref_ts_ms={self.ref_ts_ms}, half_life_ms={self.half_life_ms})")
