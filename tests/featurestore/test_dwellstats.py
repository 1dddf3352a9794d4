"""Streaming ln(dwell) moments: oracle against batch computation; merge equals one fed both."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.dwellstats import DwellStats

HOUR = 3_600_000
CLICKS = st.lists(st.tuples(st.integers(1, 10**7), st.integers(0, 30 * 24 * HOUR)),
                  min_size=1, max_size=60)


def batch_moments(clicks, half_life_ms):
    """Direct weighted mean / population std of ln(dwell) with weights relative to the newest ts."""
    x = np.log(np.array([d for d, _ in clicks], dtype=np.float64))
    ts = np.array([t for _, t in clicks], dtype=np.float64)
    w = np.ones_like(x) if half_life_ms is None else 2.0 ** (-(ts.max() - ts) / half_life_ms)
    mu = float(np.sum(w * x) / np.sum(w))
    sigma = float(math.sqrt(np.sum(w * (x - mu) ** 2) / np.sum(w)))
    return mu, sigma, float(np.sum(w))


def feed(clicks, half_life_ms):
    s = DwellStats(half_life_ms)
    for d, t in clicks:
        s.update(dwell_ms=d, ts_ms=t)
    return s


@settings(max_examples=200, deadline=None)
@given(clicks=CLICKS)
def test_no_decay_is_exact_mean_and_std_of_ln(clicks):
    s = feed(clicks, None)
    x = np.log(np.array([d for d, _ in clicks], dtype=np.float64))
    assert s.n == len(clicks) and s.weight == len(clicks)
    assert s.mu == pytest.approx(float(x.mean()), rel=1e-9, abs=1e-9)
    assert s.sigma == pytest.approx(float(x.std()), rel=1e-6, abs=1e-6)
    assert s.x_l_ms == pytest.approx(math.exp(x.mean() - x.std()), rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(clicks=CLICKS, half_life_h=st.integers(1, 24 * 14), seed=st.integers(0, 2**16))
def test_decayed_stream_matches_batch_whatever_the_arrival_order(clicks, half_life_h, seed):
    h = half_life_h * HOUR
    shuffled = list(clicks)
    random.Random(seed).shuffle(shuffled)
    mu, sigma, weight = batch_moments(clicks, h)
    for order in (clicks, shuffled):
        s = feed(order, h)
        assert s.ref_ts_ms == max(t for _, t in clicks)
        assert s.weight == pytest.approx(weight, rel=1e-9)
        assert s.mu == pytest.approx(mu, rel=1e-9, abs=1e-9)
        assert s.sigma == pytest.approx(sigma, rel=1e-6, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(clicks=CLICKS, cut=st.data(), half_life=st.sampled_from([None, HOUR, 7 * 24 * HOUR]))
def test_merge_of_two_partials_equals_one_fed_both(clicks, cut, half_life):
    mask = cut.draw(st.lists(st.booleans(), min_size=len(clicks), max_size=len(clicks)))
    left = [c for c, m in zip(clicks, mask) if m]
    right = [c for c, m in zip(clicks, mask) if not m]
    one = feed(clicks, half_life)
    a, b = feed(left, half_life), feed(right, half_life)
    for merged in (a.merge(b), b.merge(a)):
        assert merged.n == one.n and merged.ref_ts_ms == one.ref_ts_ms
        assert merged.weight == pytest.approx(one.weight, rel=1e-9)
        assert merged.mu == pytest.approx(one.mu, rel=1e-9, abs=1e-9)
        assert merged.sigma == pytest.approx(one.sigma, rel=1e-6, abs=1e-6)
    assert a.n == len(left)   # inputs untouched


def test_decay_follows_a_regime_change():
    """After several half-lives of the new regime the estimate tracks it; without decay it lags."""
    rng = np.random.default_rng(0)
    day = 24 * HOUR
    old = [(float(d), int(t)) for d, t in zip(rng.lognormal(math.log(10_000), 1.0, 2000),
                                              np.linspace(0, 10 * day, 2000))]
    new = [(float(d), int(t)) for d, t in zip(rng.lognormal(math.log(60_000), 1.0, 2000),
                                              np.linspace(10 * day, 40 * day, 2000))]
    decayed, flat = feed(old + new, 3 * day), feed(old + new, None)
    assert abs(decayed.mu - math.log(60_000)) < 0.1
    assert abs(flat.mu - math.log(60_000)) > 0.5
    assert decayed.sigma == pytest.approx(1.0, abs=0.1)


def test_round_trip_zero_dwell_and_validation():
    s = feed([(0, 5), (1000, 6)], 7 * 24 * HOUR)
    back = DwellStats.from_bytes(s.to_bytes())
    assert (back.mu, back.sigma, back.n, back.ref_ts_ms, back.half_life_ms) == (
        s.mu, s.sigma, 2, 6, s.half_life_ms)
    assert s.mu == pytest.approx((0.0 + math.log(1000) * 1.0) / (1 + 2 ** (-1 / s.half_life_ms)),
                                 rel=1e-6)   # dwell 0 clamped to 1 ms
    empty = DwellStats.from_bytes(DwellStats(None).to_bytes())
    assert math.isnan(empty.mu) and empty.ref_ts_ms is None and empty.half_life_ms is None
    with pytest.raises(ValueError):
        s.update(-1, 0)
    with pytest.raises(ValueError, match="ts_ms=-1"):  # -1 encodes "no reference time"
        s.update(1000, -1)
    with pytest.raises(ValueError):
        DwellStats(HOUR).merge(DwellStats(2 * HOUR))
