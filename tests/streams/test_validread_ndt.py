"""Valid read against a straightforward reference, NDT against hand-computed values, the derived
tau against the 1e-5 bound, and labelling with an exact in-memory statistics implementation."""
from __future__ import annotations

import dataclasses
import doctest
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streams.joiner.ndt as ndt_module
import streams.joiner.validread as validread_module
from streams.contracts import Impression
from streams.joiner import (
    RULE_MIN_DWELL,
    RULE_P10_UNKNOWN,
    RULE_T1,
    RULE_T2,
    RULE_T3,
    RULE_X_L_UNKNOWN,
    JoinedImpression,
    JoinerConfig,
    NdtConfig,
    NdtParams,
    ValidReadConfig,
    derive_params,
    gain_beyond,
    label_samples,
    ndt_weight_ms,
    normalized_dwell_time,
    primary_rule,
    valid_read_batch,
)
from streams.joiner.validread import ndt_params
from streams.samples import Snapshot

DAY_MS = 86_400_000


class ExactDwellStats:
    """DwellStatistics computed exactly from a list of past clicks (user, item, ts_ms, dwell_ms)."""

    def __init__(self, clicks: list[tuple[int, int, int, int]]) -> None:
        self.clicks = clicks

    def ln_dwell_ms_moments(self):
        if not self.clicks:
            return None
        logs = [math.log(max(d, 1)) for _u, _i, _t, d in self.clicks]
        mu = sum(logs) / len(logs)
        return mu, math.sqrt(sum((x - mu) ** 2 for x in logs) / len(logs))

    def item_dwell_quantile_ms(self, item_id, quantile):
        values = sorted(d for _u, i, _t, d in self.clicks if i == item_id)
        if not values:
            return None
        return float(values[max(0, math.ceil(quantile * len(values)) - 1)])

    def user_clicks_7d(self, user_id, ts_ms):
        return sum(1 for u, _i, t, _d in self.clicks if u == user_id and ts_ms - 7 * DAY_MS <= t < ts_ms)


def reference(clicked, dwell, x_l, p10, n_clicks, cfg: ValidReadConfig) -> tuple[bool, int]:
    """Section 2.2 read literally, one sample at a time."""
    if not clicked:
        return False, 0
    rules = 0
    if cfg.t1_fixed_x_l_ms is not None:
        x_l = cfg.t1_fixed_x_l_ms
    if cfg.t1:
        if x_l is None:
            rules |= RULE_X_L_UNKNOWN
        elif dwell >= 0 and dwell >= x_l:
            rules |= RULE_T1
    if cfg.t2 and n_clicks < cfg.t2_max_clicks:
        rules |= RULE_T2
    if cfg.t3:
        if p10 is None:
            rules |= RULE_P10_UNKNOWN
        elif dwell >= 0 and dwell >= p10:
            rules |= RULE_T3
    if dwell >= 0 and dwell >= cfg.min_dwell_ms:
        rules |= RULE_MIN_DWELL
    else:
        return False, rules
    return bool(rules & (RULE_T1 | RULE_T2 | RULE_T3)), rules


def test_doctests_run_and_pass():
    for module in (ndt_module, validread_module):
        result = doctest.testmod(module)
        assert result.attempted >= 2 and result.failed == 0


HAND = [  # clicked, dwell_ms, x_l_ms, p10_ms, clicks in 7 d, valid, primary rule
    (True, 15_000, 15_000.0, None, 20, True, "T1"),  # T1 at equality
    (True, 14_999, 15_000.0, 20_000.0, 20, False, None),  # nothing fires
    (True, 6_000, 15_000.0, 20_000.0, 6, True, "T2"),  # light user: 6 < 7
    (True, 6_000, 15_000.0, 20_000.0, 7, False, None),  # 7 clicks is not light
    (True, 6_000, 15_000.0, 6_000.0, 7, True, "T3"),  # short item: at its P10
    (True, 4_999, 1_000.0, 1_000.0, 0, False, None),  # every rule, but under the 5 s floor
    (True, 5_000, 1_000.0, None, 10, True, "T1"),  # the floor itself passes
    (True, -1, 1_000.0, 1_000.0, 0, False, None),  # no dwell arrived: T2 fires, not valid
    (False, 60_000, 1_000.0, 1_000.0, 0, False, None),  # not clicked: no rule evaluated
    (True, 30_000, None, None, 50, False, None),  # cold start: no statistic known
]


@pytest.mark.parametrize("row", HAND)
def test_hand_cases_match_reference(row):
    clicked, dwell, x_l, p10, n_clicks, valid, primary = row
    got_valid, got_rules = valid_read_batch(
        [clicked], [dwell], math.nan if x_l is None else x_l, [math.nan if p10 is None else p10], [n_clicks])
    ref_valid, ref_rules = reference(clicked, dwell, x_l, p10, n_clicks, ValidReadConfig())
    assert (bool(got_valid[0]), int(got_rules[0])) == (ref_valid, ref_rules) == (valid, ref_rules)
    assert (primary_rule(int(got_rules[0])) if valid else None) == primary


def test_rules_switch_off_and_fixed_threshold():
    args = ([True], [10_000], 15_000.0, [20_000.0], [3])
    assert valid_read_batch(*args)[0].tolist() == [True]  # T2
    assert valid_read_batch(*args, cfg=ValidReadConfig(t2=False))[0].tolist() == [False]
    cfg = ValidReadConfig(t2=False, t1_fixed_x_l_ms=8_000.0)  # fixed x_l overrides the live one
    valid, rules = valid_read_batch(*args, cfg=cfg)
    assert valid.tolist() == [True] and int(rules[0]) & RULE_T1
    valid, rules = valid_read_batch([True], [10_000], math.nan, [math.nan], [30],
                                    cfg=ValidReadConfig(t1=False, t3=False))
    assert int(rules[0]) == RULE_MIN_DWELL and not valid[0]  # disabled rules record nothing


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-1, 120_000), st.none() | st.integers(1, 60_000),
                          st.none() | st.integers(0, 60_000), st.integers(0, 12)), min_size=1, max_size=30),
       st.booleans(), st.booleans(), st.booleans(), st.integers(0, 10_000))
def test_batch_matches_reference(rows, t1, t2, t3, min_dwell):
    cfg = ValidReadConfig(min_dwell_ms=min_dwell, t1=t1, t2=t2, t3=t3)
    x_l = rows[0][2]
    valid, rules = valid_read_batch(
        [r[0] for r in rows], [r[1] for r in rows], math.nan if x_l is None else float(x_l),
        [math.nan if r[3] is None else float(r[3]) for r in rows], [r[4] for r in rows], cfg)
    expected = [reference(r[0], r[1], x_l, r[3], r[4], cfg) for r in rows]
    assert list(zip(valid.tolist(), rules.tolist())) == expected


def test_ndt_hand_computed_values():
    # T_N = 2.319 / (1 + exp(-(T - 15) / 20)) - 0.744, worked by hand:
    # T=0:   1 / (1 + e^0.75) = 0.3208213  -> 2.319 * 0.3208213 - 0.744 = -0.0000154
    # T=15:  1 / 2                         -> 1.1595 - 0.744             =  0.4155
    # T=35:  1 / (1 + e^-1) = 0.7310586    -> 1.6953248 - 0.744          =  0.9513248
    # T=200: 1 / (1 + e^-9.25) = 0.9999039 -> 2.3187771 - 0.744          =  1.5747771
    got = normalized_dwell_time([0.0, 15.0, 35.0, 200.0])
    assert np.allclose(got, [-0.0000154, 0.4155, 0.9513248, 1.5747771], atol=2e-7)
    assert float(normalized_dwell_time(1e9)) == pytest.approx(2.319 - 0.744)
    # the paper's tau = 20 leaves 2.319 / (1 + e^9.25) = 2.2286e-4 of gain beyond 200 s
    assert gain_beyond(NdtParams(15.0, 20.0, 2.319, 0.744), 200.0) == pytest.approx(2.2286e-4, rel=1e-3)
    assert ndt_weight_ms([-1, 15_000, 35_000]).tolist() == pytest.approx([0.0, 0.4155, 0.9513248], abs=1e-6)
    assert ndt_weight_ms([0]).dtype == np.float32


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 5_000), st.floats(0, 5_000))
def test_ndt_is_monotone(a, b):
    lo, hi = sorted((a, b))
    assert normalized_dwell_time(lo) <= normalized_dwell_time(hi)


def test_ndt_is_steepest_at_offset():
    t = np.linspace(0, 120, 12_001)
    slope = np.diff(normalized_dwell_time(t))
    assert t[np.argmax(slope)] == pytest.approx(15.0, abs=0.02)


@settings(max_examples=200, deadline=None)
@given(st.floats(-1.0, 7.0), st.floats(0.05, 2.5))
def test_derived_tau_keeps_gain_beyond_x_h_below_bound(mu, sigma):
    p = derive_params(mu, sigma)
    assert p.offset_s == pytest.approx(math.exp(mu - sigma))
    assert p.x_h_s == pytest.approx(math.exp(mu + sigma))
    assert gain_beyond(p, p.x_h_s) < 1e-5
    assert float(normalized_dwell_time(0.0, p)) == pytest.approx(0.0, abs=1e-12)  # range kept: [0, A - B]
    assert p.a - p.b == pytest.approx(2.319 - 0.744)
    # tau is the largest such value: 1 % more and the bound breaks
    tau = p.tau_s * 1.01
    a = (p.a - p.b) * (1 + math.exp(-p.offset_s / tau))
    assert gain_beyond(NdtParams(p.offset_s, tau, a, a - (p.a - p.b)), p.x_h_s) >= 1e-5


def test_derived_params_for_the_papers_system_and_the_paper_defaults():
    # x_l = 15 s and x_h = 200 s as in section 2.2
    mu, sigma = (math.log(15) + math.log(200)) / 2, (math.log(200) - math.log(15)) / 2
    p = derive_params(mu, sigma)
    assert p.offset_s == pytest.approx(15.0) and 14.0 < p.tau_s < 16.0
    # and with offset / tau = 0.75 the rescaling gives back the paper's A and B
    a = 1.575 * (1 + math.exp(-0.75))
    assert (round(a, 3), round(a - 1.575, 3)) == (2.319, 0.744)
    with pytest.raises(ValueError, match="sigma"):
        derive_params(1.0, 0.0)
    with pytest.raises(ValueError, match="no spread"):  # positive, but exp(mu +- sigma) is one float
        derive_params(math.log(15), 1e-17)
    with pytest.raises(ValueError, match="max_gain_beyond_x_h"):
        NdtConfig(max_gain_beyond_x_h=2.0)


def joined(k, user, item, ts, click_ts=-1, dwell=-1, liked=False):
    imp = Impression(k, ts, user, item, k, activeness=3, age_group=2, item_duration_ms=60_000, item_category=5)
    return JoinedImpression(imp, click_ts >= 0, click_ts, dwell, click_ts + dwell if dwell >= 0 else -1,
                            liked, False, ts + 1_800_000, False)


def test_label_samples_with_exact_statistics():
    t0 = 100 * DAY_MS
    history = [(1, 10, t0 - 8 * DAY_MS, 90_000)]  # outside user 1's 7 days
    history += [(1, 10, t0 - DAY_MS + i, 40_000 + 1_000 * i) for i in range(7)]  # 7 clicks: not light
    history += [(2, 11, t0 - DAY_MS, 3_000), (3, 11, t0 - DAY_MS, 7_000)] + [(3, 12, t0 - 2, 5_500)] * 3
    history += [(3, 14, t0 - 3, 60_000)] * 6  # x_l = exp(mu - sigma) of all this is about 9.9 s
    stats = ExactDwellStats(history)
    js = [joined(1, 1, 10, t0, t0 + 5, 60_000, liked=True),  # T1 (60 s >= x_l)
          joined(2, 2, 11, t0, t0 + 5, 6_000),  # light user: T2, and T3 (>= P10 3 s)
          joined(3, 3, 12, t0, t0 + 5, 5_500),  # heavy user, short item: T3 only (P10 = 5.5 s)
          joined(4, 1, 10, t0, t0 + 5, 4_000),  # under 5 s
          joined(5, 2, 13, t0)]  # not clicked
    snaps = [Snapshot(click_items=(10,), click_cats=(5,), newest_ts_ms=t0 - 1)] + [Snapshot()] * 4
    cfg = JoinerConfig()
    out = label_samples(js, snaps, stats, cfg)
    mu, sigma = stats.ln_dwell_ms_moments()
    x_l = math.exp(mu - sigma)
    for s, j in zip(out, js):
        imp = j.impression
        p10 = stats.item_dwell_quantile_ms(imp.item_id, 0.1) if j.clicked else None
        n = stats.user_clicks_7d(imp.user_id, j.click_ts_ms) if j.clicked else 0
        assert (s.valid_read, s.rules) == reference(j.clicked, j.dwell_ms, x_l, p10, n, cfg.valid_read)
        assert s.ndt_weight == pytest.approx(float(normalized_dwell_time(j.dwell_ms / 1000)) if j.clicked else 0.0,
                                             abs=1e-6)
        assert (s.impression_id, s.user_group, s.label_ts_ms, s.item_category) == (imp.impression_id, 3,
                                                                                    j.label_ts_ms, 5)
    assert [s.valid_read for s in out] == [True, True, True, False, False]
    assert [primary_rule(s.rules) for s in out[:3]] == ["T1", "T2", "T3"]
    assert out[0].liked and out[0].snapshot == snaps[0]
    with pytest.raises(ValueError, match="snapshots"):
        label_samples(js, snaps[:2], stats, cfg)


def test_ndt_params_derived_from_live_moments_in_seconds():
    stats = ExactDwellStats([(1, 1, 0, 10_000), (1, 1, 0, 40_000), (1, 1, 0, 160_000)])
    mu, sigma = stats.ln_dwell_ms_moments()
    cfg = JoinerConfig(ndt=NdtConfig(derive_from_stats=True))
    p = ndt_params(cfg, stats)
    assert p.offset_s == pytest.approx(math.exp(mu - sigma) / 1000)
    assert ndt_params(dataclasses.replace(cfg, ndt=NdtConfig()), stats) == NdtParams(15.0, 20.0, 2.319, 0.744)
    assert ndt_params(cfg, ExactDwellStats([])) == NdtParams(15.0, 20.0, 2.319, 0.744)  # nothing known yet

    class NoSpread:  # every dwell (nearly) the same: no tau can be fitted, labelling goes on
        def ln_dwell_ms_moments(self):
            return math.log(15_000), 1e-17
    assert ndt_params(cfg, NoSpread()) == NdtParams(15.0, 20.0, 2.319, 0.744)


def test_label_batch_bytes_equal_per_sample_encoding():
    from streams.joiner import label_batch
    from streams.samples import encode

    t0 = 100 * DAY_MS
    stats = ExactDwellStats([(1, 10, t0 - DAY_MS, 20_000), (2, 10, t0 - DAY_MS, 9_000)])
    js = [joined(1, 1, 10, t0, t0 + 5, 60_000, liked=True), joined(2, 2, 11, t0), joined(3, 1, 10, t0, t0 + 1)]
    snaps = [Snapshot(like_items=(4, 5, 6), like_cats=(1, 2, 3), newest_ts_ms=t0 - 10), Snapshot(), Snapshot()]
    cfg = JoinerConfig(user_group_fields=("activeness", "age_group"))
    values = label_batch(js, snaps, stats, cfg)
    assert values == [encode(s) for s in label_samples(js, snaps, stats, cfg)]
    assert [s.user_group for s in label_samples(js, snaps, stats, cfg)] == [3 * 129 + 3] * 3
    leaky = [Snapshot(click_items=(1,), click_cats=(1,), newest_ts_ms=t0)] * 3
    with pytest.raises(ValueError, match="leakage"):
        label_batch(js, leaky, stats, cfg)


def test_ndt_weight_is_never_negative():
    from streams.joiner.ndt import ndt_weight_ms

    w = ndt_weight_ms(np.array([0, 1, 500, 5_000, -1]))
    assert (w >= 0).all() and w[0] == 0.0 and w[-1] == 0.0 and w[3] > 0


@pytest.mark.parametrize("derive", [False, True])
def test_statistics_columns_equal_one_query_per_run(derive):
    """Runs judged on different statistics, gathered by StatisticsColumns (one NDT call per set of
    parameters), equal query_statistics run by run, concatenated."""
    from streams.joiner.validread import StatisticsColumns, query_statistics

    t0 = 100 * DAY_MS
    cfg = JoinerConfig(ndt=NdtConfig(derive_from_stats=derive))
    history = [(1 + i % 3, 10 + i % 2, t0 - DAY_MS + i, 2_000 + 3_000 * i) for i in range(12)]
    runs = [([joined(1, 1, 10, t0, t0 + 5, 60_000), joined(2, 2, 11, t0)], ExactDwellStats([])),
            ([joined(3, 3, 10, t0, t0 + 5, 7_000)], ExactDwellStats(history[:4])),
            ([joined(4, 2, 13, t0)], ExactDwellStats(history[:6])),
            ([joined(5, 1, 11, t0, t0 + 9, 30_000), joined(6, 2, 10, t0, t0 + 2, 3_000)], ExactDwellStats(history))]
    columns = StatisticsColumns(cfg)
    for run, stats in runs:
        columns.add(run, stats)
    got = columns.columns()
    want = [np.concatenate(c) for c in zip(*(query_statistics(run, stats, cfg) for run, stats in runs))]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()
