"""Metrics against direct O(n^2) pairwise computations (hypothesis) and accumulator invariants."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner import MetricsError
from learner.metrics import CumulativeMetrics, WindowMetrics, auc, gauc, logloss


def pairwise_auc(s, y):
    pos = [a for a, l in zip(s, y) if l == 1]
    neg = [a for a, l in zip(s, y) if l == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def pairwise_gauc(s, y, u):
    num = den = 0.0
    for user in set(u):
        idx = [i for i, x in enumerate(u) if x == user]
        a = pairwise_auc([s[i] for i in idx], [y[i] for i in idx])
        if not math.isnan(a):
            num += a * len(idx)
            den += len(idx)
    return num / den if den else math.nan


rows = st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0]) | st.floats(0, 1),
                          st.integers(0, 1), st.integers(0, 4)), min_size=1, max_size=60)


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(rows)
def test_auc_and_gauc_match_pairwise(data):
    s, y, u = map(list, zip(*data))
    assert same(auc(s, y), pairwise_auc(s, y))
    assert same(gauc(s, y, u), pairwise_gauc(s, y, u))


@settings(max_examples=60, deadline=None)
@given(rows, st.integers(1, 25), st.integers(1, 7))
def test_window_equals_exact_metrics_on_the_last_rows(data, window, step):
    s, y, u = (np.array(c) for c in zip(*data))
    acc = WindowMetrics(window)
    for i in range(0, len(s), step):
        acc.update(s[i:i + step], y[i:i + step], u[i:i + step])
    got = acc.compute()
    ls, ly, lu = s[-window:], y[-window:], u[-window:]
    assert got["n"] == len(ls)
    assert same(got["auc"], pairwise_auc(list(ls), list(ly)))
    assert same(got["gauc"], pairwise_gauc(list(ls), list(ly), list(lu)))
    assert same(got["logloss"], logloss(ls, ly))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=80),
       st.integers(1, 9))
def test_cumulative_is_exact_for_scores_on_bin_centres(data, step):
    n_bins = 10
    s = np.array([(b + 0.5) / n_bins for b, _, _ in data])
    y = np.array([l for _, l, _ in data])
    u = np.array([x for _, _, x in data])
    acc = CumulativeMetrics(n_bins=n_bins)
    for i in range(0, len(s), step):
        acc.update(s[i:i + step], y[i:i + step], u[i:i + step])
    got = acc.compute()
    assert same(got["auc"], pairwise_auc(list(s), list(y)))
    assert same(got["gauc"], pairwise_gauc(list(s), list(y), list(u)))
    assert got["logloss"] == pytest.approx(logloss(s, y), rel=1e-9)
    assert got["n"] == len(s)


def test_cumulative_binning_error_is_small_and_state_round_trips():
    rng = np.random.default_rng(0)
    s, y, u = rng.random(5000), (rng.random(5000) < 0.3).astype(float), rng.integers(0, 50, 5000)
    s = np.clip(s * 0.5 + 0.4 * y, 0, 1)
    acc = CumulativeMetrics(n_bins=10_000)
    acc.update(s[:3000], y[:3000], u[:3000])
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    restored = CumulativeMetrics(n_bins=10_000)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for a in (acc, restored):
        a.update(s[3000:], y[3000:], u[3000:])
    assert acc.compute() == restored.compute()
    got = acc.compute()
    assert got["auc"] == pytest.approx(auc(s, y), abs=1e-3)
    assert got["gauc"] == pytest.approx(gauc(s, y, u), abs=2e-3)
    with pytest.raises(MetricsError):
        CumulativeMetrics(n_bins=5).load_state_dict(acc.state_dict())


def test_window_state_round_trip_and_errors():
    acc = WindowMetrics(4)
    acc.update(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([0, 1, 1]), torch.tensor([1, 1, 2]))
    restored = WindowMetrics(4)
    restored.load_state_dict(acc.state_dict())
    for a in (acc, restored):
        a.update([0.3, 0.2], [0, 1], [2, 2])
    assert acc.compute() == restored.compute()
    with pytest.raises(MetricsError):
        acc.update([0.1, 0.2], [1], [1, 2])
    assert math.isnan(auc([0.1, 0.2], [1, 1]))
    assert math.isnan(gauc([0.1, 0.2], [1, 0], [1, 2]))     # every user has one class only


def test_float64_scores_are_not_rounded_into_ties():
    scores = torch.tensor([0.5, 0.5 + 1e-9], dtype=torch.float64)
    assert auc(scores, [0, 1]) == 1.0
    assert auc(scores.numpy(), [0, 1]) == 1.0


def test_cumulative_without_users_keeps_a_fixed_state_and_the_same_auc_and_logloss():
    """The continuous learner's setting: no per-user rows (GAUC NaN), AUC and logloss unchanged;
    a state that kept users loads into one that does not, and the other way GAUC starts afresh."""
    rng = np.random.default_rng(1)
    s, y, u = rng.random(6000), (rng.random(6000) < 0.3).astype(float), rng.integers(0, 4000, 6000)
    full, lean = CumulativeMetrics(n_bins=1000), CumulativeMetrics(n_bins=1000, per_user=False)
    for a in (full, lean):
        a.update(s[:3000], y[:3000], u[:3000])
    sizes = [lean.state_dict()["g_user"].numel()]
    for a in (full, lean):
        a.update(s[3000:], y[3000:], u[3000:])
    sizes.append(lean.state_dict()["g_user"].numel())
    assert sizes == [0, 0] and full.state_dict()["g_user"].numel() > 3000
    got, want = lean.compute(), full.compute()
    assert math.isnan(got["gauc"]) and not math.isnan(want["gauc"])
    assert {k: got[k] for k in ("n", "auc", "logloss", "ctr")} == {k: want[k] for k in ("n", "auc", "logloss", "ctr")}
    dropped = CumulativeMetrics(n_bins=1000, per_user=False)
    dropped.load_state_dict(full.state_dict())
    assert dropped.state_dict()["g_user"].numel() == 0 and dropped.compute()["auc"] == want["auc"]
    afresh = CumulativeMetrics(n_bins=1000)
    afresh.load_state_dict(lean.state_dict())
    afresh.update(s[:100], y[:100], u[:100])
    assert afresh.compute()["gauc"] == pytest.approx(gauc(s[:100], y[:100], u[:100]), abs=2e-2)
