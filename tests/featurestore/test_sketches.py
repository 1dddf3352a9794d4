"""Deterministic dwell sketch: the same updates give the same bytes (round trips included); exact
up to k values; P10 / P50 within the documented rank error on random and adversarial inputs; merge
of partitions within the same error; bad and old-format bytes refused."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import CodecError
from featurestore.sketches import DwellSketch

# codec version 1, then Apache DataSketches KLL serializations (kll_floats_sketch(200)) as the
# previous store wrote them: empty, and one value (5.0)
OLD_KLL_EMPTY = bytes.fromhex("01" "02010f01c8000800")
OLD_KLL_ONE = bytes.fromhex("01" "02020f04c80008000000a040")


def true_rank(data: np.ndarray, value: float) -> float:
    """Fraction of the exact data <= value (the sketch's inclusive rank)."""
    return float(np.count_nonzero(data <= value)) / data.size


def rank_error(data: np.ndarray, value: float, q: float) -> float:
    """How far ``q`` lies outside the ranks ``value`` covers in the exact data: 0 when some copy of
    ``value`` sits at rank ``q`` (ties make a value cover a range of ranks)."""
    below, at_or_below = np.count_nonzero(data < value) / data.size, true_rank(data, value)
    return 0.0 if below <= q <= at_or_below else min(abs(q - below), abs(q - at_or_below))


def lognormal_dwell(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(mean=math.log(30_000), sigma=1.2, size=n).astype(np.float32)


def dwell_input(kind: str, n: int, seed: int = 0) -> np.ndarray:
    data = lognormal_dwell(seed, n)
    if kind == "ascending":
        return np.sort(data)
    if kind == "descending":
        return np.sort(data)[::-1].copy()
    if kind == "duplicates":  # 20 distinct values, each about 5 % of the mass
        return (np.random.default_rng(seed).integers(0, 20, n) * 1000).astype(np.float32)
    if kind == "sawtooth":  # a period just over k
        return ((np.arange(n) % 201) * 7 % 201).astype(np.float32)
    return data


@pytest.mark.parametrize("seed", range(5))
def test_p10_rank_within_documented_error(seed):
    data = lognormal_dwell(seed, 40_000)
    sk = DwellSketch(k=200)
    sk.update_many(data)
    p10 = sk.quantile(0.1)
    assert sk.n == data.size
    assert sk.rank_error == 0.01
    assert abs(true_rank(data, p10) - 0.1) <= sk.rank_error
    # the sketch is genuinely approximate here (not storing everything)
    assert len(sk.to_bytes()) < data.nbytes / 20


@pytest.mark.parametrize("n", [1_000, 10_000, 100_000])
@pytest.mark.parametrize("kind", ["lognormal", "ascending", "descending", "duplicates", "sawtooth"])
def test_quantiles_within_documented_error(kind, n):
    data = dwell_input(kind, n)
    sk = DwellSketch(k=200)
    sk.update_many(data)
    for q in (0.1, 0.5):
        assert rank_error(data, sk.quantile(q), q) <= sk.rank_error, q
        assert sk.rank(sk.quantile(q)) >= q
    # bounded memory: level 0 and the top level hold k values each, the others less
    assert len(sk.to_bytes()) <= 4 * 4 * sk.k + 15 + 12 * 64


@pytest.mark.parametrize("k", [50, 100])
def test_error_bound_scales_with_k(k):
    for seed in range(3):
        data = dwell_input("lognormal", 20_000, seed)
        sk = DwellSketch(k)
        sk.update_many(data)
        assert sk.rank_error == 2 / k
        for q in (0.1, 0.5):
            assert rank_error(data, sk.quantile(q), q) <= sk.rank_error, (seed, q)


def test_same_input_same_bytes():
    """The old KLL wrapper gave different P10s for the same 2000 values in 19 of 20 pairs."""
    data = lognormal_dwell(7, 2_000)
    for _ in range(5):
        a, b = DwellSketch(), DwellSketch()
        a.update_many(data)
        b.update_many(data)
        assert a.to_bytes() == b.to_bytes() and a.quantile(0.1) == b.quantile(0.1)


@pytest.mark.parametrize("seed", range(4))
def test_round_trips_and_batching_do_not_change_the_state(seed):
    """Per-value updates, batches cut anywhere and round trips at random points give the bytes of
    one ``update_many``."""
    rng = np.random.default_rng(seed)
    data = lognormal_dwell(seed, 5_000)
    one = DwellSketch()
    one.update_many(data)
    per_value = DwellSketch()
    for v in data.tolist():
        per_value.update(v)
    cut = DwellSketch()
    i = 0
    while i < data.size:
        j = i + int(rng.integers(1, 700))
        if rng.random() < 0.5:
            cut.update_many(data[i:j])
        else:
            for v in data[i:j].tolist():
                cut.update(v)
        if rng.random() < 0.5:
            cut.quantile(0.1)  # a read in between changes nothing
        if rng.random() < 0.7:
            cut = DwellSketch.from_bytes(cut.to_bytes())
        i = j
    assert one.to_bytes() == per_value.to_bytes() == cut.to_bytes()
    assert one.quantile(0.1) == per_value.quantile(0.1) == cut.quantile(0.1)
    assert one.n == cut.n == data.size


@pytest.mark.parametrize("seed", range(5))
def test_merge_equals_one_sketch_fed_both_streams(seed):
    a_data, b_data = lognormal_dwell(seed, 25_000), lognormal_dwell(seed + 100, 15_000) * 2
    both = np.concatenate([a_data, b_data])
    a, b, one = DwellSketch(200), DwellSketch(200), DwellSketch(200)
    a.update_many(a_data)
    b.update_many(b_data)
    one.update_many(both)
    b_bytes = b.to_bytes()
    merged = DwellSketch.from_bytes(a.to_bytes())   # merge also works across a store round trip
    merged.merge(DwellSketch.from_bytes(b_bytes))
    assert merged.n == one.n == both.size and b.n == b_data.size and b.to_bytes() == b_bytes
    for q in (0.1, 0.5, 0.9):
        r_merged, r_one = true_rank(both, merged.quantile(q)), true_rank(both, one.quantile(q))
        assert abs(r_merged - q) <= merged.rank_error
        assert abs(r_merged - r_one) <= 2 * merged.rank_error
    again = DwellSketch.from_bytes(a.to_bytes())
    again.merge(b)
    assert again.to_bytes() == merged.to_bytes()  # deterministic


@pytest.mark.parametrize("kind", ["lognormal", "ascending", "duplicates"])
def test_merge_of_partitions_within_documented_error(kind):
    """Shared statistics: each partition's sketch, some small and exact, folded into one."""
    data = dwell_input(kind, 60_000, seed=3)
    parts = np.split(data, [50, 7_000, 7_150, 30_000, 41_000])
    merged = DwellSketch()
    for part in parts:
        sk = DwellSketch()
        for i in range(0, part.size, 997):
            sk.update_many(part[i:i + 997])
        merged.merge(DwellSketch.from_bytes(sk.to_bytes()))
    assert merged.n == data.size
    for q in (0.1, 0.5):
        assert rank_error(data, merged.quantile(q), q) <= merged.rank_error, q


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(0, 10**7), min_size=1, max_size=200),
       q=st.floats(0.0, 1.0))
def test_exact_up_to_k(values, q):
    """With at most k values the sketch keeps them all: the inclusive quantile is exact."""
    sk = DwellSketch(k=200)
    for v in values:
        sk.update(v)
    data = np.sort(np.array(values, dtype=np.float32))
    idx = max(0, math.ceil(q * len(values)) - 1)
    assert sk.quantile(q) == float(data[idx])
    assert sk.rank(float(data[idx])) == true_rank(data, data[idx])
    assert DwellSketch.from_bytes(sk.to_bytes()).quantile(q) == float(data[idx])


def test_exact_at_k_then_approximate():
    data = lognormal_dwell(1, 201)
    sk = DwellSketch(k=200)
    sk.update_many(data[:200])
    assert len(sk.to_bytes()) == 15 + 12 + 4 * 200
    for q in (0.0, 0.1, 0.5, 1.0):
        assert sk.quantile(q) == float(np.sort(data[:200])[max(0, math.ceil(q * 200) - 1)])
    sk.update(float(data[200]))  # the first compaction
    assert len(sk.to_bytes()) < 15 + 12 + 4 * 200


def test_empty_and_bad_input():
    sk = DwellSketch()
    assert math.isnan(sk.quantile(0.1)) and math.isnan(sk.rank(5.0)) and sk.n == 0
    assert math.isnan(DwellSketch.from_bytes(sk.to_bytes()).quantile(0.1))
    with pytest.raises(ValueError):
        sk.update(-1)
    with pytest.raises(ValueError):
        sk.update(float("nan"))
    with pytest.raises(ValueError):
        sk.update_many(np.array([1.0, -2.0]))
    with pytest.raises(ValueError):
        sk.quantile(1.5)
    with pytest.raises(ValueError):
        DwellSketch(k=4)
    assert sk.n == 0


def test_bad_bytes_refused():
    sk = DwellSketch()
    sk.update_many(lognormal_dwell(0, 1_000))
    good = sk.to_bytes()
    head = struct.Struct("<B2sBHQB")
    _, magic, fmt, k, n, n_levels = head.unpack_from(good)
    bad = {
        "bad_magic": b"\x01garbage",
        "bad_length": good[:-1],
        "unknown_version": good[:3] + b"\x02" + good[4:],
        "weights add up": head.pack(1, magic, fmt, k, n + 1, n_levels) + good[head.size:],
        "bad_sketch: k": head.pack(1, magic, fmt, 4, n, n_levels) + good[head.size:],
        "negative": good[:-4] + struct.pack("<f", -1.0),
        "nan": good[:-4] + struct.pack("<f", math.nan),
    }
    for reason, data in bad.items():
        with pytest.raises(CodecError, match=reason):
            DwellSketch.from_bytes(data)


@pytest.mark.parametrize("data", [OLD_KLL_EMPTY, OLD_KLL_ONE])
def test_old_kll_bytes_refused(data):
    with pytest.raises(CodecError, match="old_format: .*DataSketches KLL.*older store; rebuild"):
        DwellSketch.from_bytes(data)


@settings(max_examples=200, deadline=None)
@given(stored=st.lists(st.floats(0, 1e9, allow_nan=False), max_size=40),
       buffered=st.lists(st.sampled_from([-0.0, 0.0, 1.0, 16_777_217.0, 0.1, 5_000.5, 3e8 + 1]) | st.floats(0, 1e9),
                         max_size=30),
       q=st.floats(0, 1))
def test_small_quantile_without_numpy_equals_the_sorted_view(stored, buffered, q):
    """A single-level sketch answers a quantile from a Python sort (up to _SMALL values): the same
    float as the numpy sorted view, with the unflushed updates rounded to float32 as a flush would."""
    s = DwellSketch(k=200)
    s.update_many(np.array(stored))
    for v in buffered:
        s.update(v)
    fast = s.quantile(q)
    t = DwellSketch.from_bytes(s.to_bytes())
    t._sorted_view()  # the numpy path
    assert struct.pack("<d", fast) == struct.pack("<d", t.quantile(q))  # nan when empty, no -0.0
    assert t.to_bytes() == s.to_bytes()
