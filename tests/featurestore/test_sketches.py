"""KLL dwell sketch: P10 within the documented rank error; merge equals one sketch fed both."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import CodecError
from featurestore.sketches import DwellSketch


def true_rank(data: np.ndarray, value: float) -> float:
    """Fraction of the exact data <= value (the sketch's inclusive rank)."""
    return float(np.count_nonzero(data <= value)) / data.size


def lognormal_dwell(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(mean=math.log(30_000), sigma=1.2, size=n).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_p10_rank_within_documented_error(seed):
    data = lognormal_dwell(seed, 40_000)
    sk = DwellSketch(k=200)
    sk.update_many(data)
    p10 = sk.quantile(0.1)
    assert sk.n == data.size
    assert abs(true_rank(data, p10) - 0.1) <= sk.rank_error
    # the sketch is genuinely approximate here (not storing everything)
    assert len(sk.to_bytes()) < data.nbytes / 20


@pytest.mark.parametrize("seed", range(5))
def test_merge_equals_one_sketch_fed_both_streams(seed):
    a_data, b_data = lognormal_dwell(seed, 25_000), lognormal_dwell(seed + 100, 15_000) * 2
    both = np.concatenate([a_data, b_data])
    a, b, one = DwellSketch(200), DwellSketch(200), DwellSketch(200)
    a.update_many(a_data)
    b.update_many(b_data)
    one.update_many(both)
    merged = DwellSketch.from_bytes(a.to_bytes())   # merge also works across a store round trip
    merged.merge(DwellSketch.from_bytes(b.to_bytes()))
    assert merged.n == one.n == both.size and b.n == b_data.size
    for q in (0.1, 0.5, 0.9):
        r_merged, r_one = true_rank(both, merged.quantile(q)), true_rank(both, one.quantile(q))
        assert abs(r_merged - q) <= merged.rank_error
        assert abs(r_merged - r_one) <= 2 * merged.rank_error


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(0, 10**7), min_size=1, max_size=150),
       q=st.floats(0.0, 1.0))
def test_exact_below_k(values, q):
    """With fewer values than k the sketch keeps them all: the inclusive quantile is exact."""
    sk = DwellSketch(k=200)
    for v in values:
        sk.update(v)
    data = np.sort(np.array(values, dtype=np.float32))
    idx = max(0, math.ceil(q * len(values)) - 1)
    assert sk.quantile(q) == float(data[idx])


def test_empty_and_bad_input():
    sk = DwellSketch()
    assert math.isnan(sk.quantile(0.1)) and math.isnan(sk.rank(5.0)) and sk.n == 0
    with pytest.raises(ValueError):
        sk.update(-1)
    with pytest.raises(ValueError):
        sk.update(float("nan"))
    with pytest.raises(ValueError):
        sk.update_many(np.array([1.0, -2.0]))
    with pytest.raises(ValueError):
        sk.quantile(1.5)
    with pytest.raises(CodecError):
        DwellSketch.from_bytes(b"\x01garbage")
