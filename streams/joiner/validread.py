"""Valid-read rules (dwell-time paper, section 2.2) and the labelling of joined impressions.

Reading of section 2.2. The paper "define[s] three types of user-item clicks as our valid read
behaviors" and then "further wipe[s] out all clicks having less than 5s dwell time", and reports
the shares of T1, T2, T3 among valid reads as 89.9 %, 2.9 %, 7.2 % (summing to 100 %, so each
valid read is attributed to the first type it satisfies). So a sample is a valid read iff::

    clicked  AND  dwell known  AND  dwell >= min_dwell (5 s)  AND  (T1 OR T2 OR T3)

    T1  dwell >= x_l = exp(mu - sigma) of ln(dwell) over clicks   (global, live estimate)
    T2  the user's clicks in the trailing 7 days before this click < 7   (light users)
    T3  dwell >= the item's historical P10 dwell                    (short items)

T2 is a patch that admits every click of a light user regardless of T1 and T3 ("considering all
light users' click behaviors as supervised signals"), but not below the 5 s floor, which applies
to all three. Comparisons are ``>=`` (the paper says "longer than"; ties only matter at millisecond
resolution; ``>=`` matches the issue's statement of the rules). The 7 items of T2 are counted as
click events before this click (excluding it) in ``[ts - 7 d, ts)``. A rule whose statistic is not
known yet (no dwell statistics, an item without history) does not fire, and a bit records that.
A rule switched off in the config never fires. Only clicks are candidates: an unclicked impression
has ``rules = 0``.

``rules`` bitmask: RULE_T1, RULE_T2, RULE_T3 (the rule fired), RULE_MIN_DWELL (dwell >= the floor),
RULE_X_L_UNKNOWN, RULE_P10_UNKNOWN; :func:`primary_rule` gives the paper's attribution.

>>> valid, rules = valid_read_batch(clicked=[True, True, True, False], dwell_ms=[20_000, 4_000, 9_000, 0],
...     x_l_ms=15_000.0, item_p10_ms=[8_000.0, 1_000.0, 8_500.0, 1.0], user_clicks=[30, 2, 30, 0])
>>> valid.tolist(), [describe_rules(r) for r in rules]
([True, False, True, False], ['T1|T3|MIN', 'T2|T3', 'T3|MIN', ''])
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from streams.joiner.config import USER_GROUP_FIELDS, JoinerConfig, ValidReadConfig
from streams.joiner.ndt import NdtParams, derive_params, ndt_weight_ms
from streams.joiner.records import JoinedImpression
from streams.samples import (
    FIXED_DTYPE,
    FLAG_CLICKED,
    FLAG_DISLIKED,
    FLAG_EARLY,
    FLAG_LIKED,
    FLAG_VALID_READ,
    Sample,
    Snapshot,
    decode,
    encode_batch,
)

RULE_T1, RULE_T2, RULE_T3, RULE_MIN_DWELL = 1, 2, 4, 8
RULE_X_L_UNKNOWN, RULE_P10_UNKNOWN = 16, 32
_RULE_NAMES = ((RULE_T1, "T1"), (RULE_T2, "T2"), (RULE_T3, "T3"), (RULE_MIN_DWELL, "MIN"),
               (RULE_X_L_UNKNOWN, "X_L?"), (RULE_P10_UNKNOWN, "P10?"))
_LN_MS_PER_S = math.log(1000.0)
#: the columns encode_labelled reads from each joined impression (the first ten are sample fields)
_ROW_COLUMNS = ("impression_id", "ts_ms", "user_id", "item_id", "activeness", "age_group", "item_duration_ms",
                "item_category", "label_ts_ms", "dwell_ms", "clicked", "liked", "disliked", "early")
_impression_columns = operator.attrgetter(*_ROW_COLUMNS[:8])  # of JoinedImpression.impression
_joined_columns = operator.attrgetter(*_ROW_COLUMNS[8:])


class DwellStatistics(Protocol):
    """The statistics valid read and NDT need, as of just before the clicks being labelled."""

    def ln_dwell_ms_moments(self) -> tuple[float, float] | None:
        """(mu, sigma) of ln(dwell_ms) over clicks (a streaming estimate), None before any click."""

    def item_dwell_quantile_ms(self, item_id: int, quantile: float) -> float | None:
        """The item's historical dwell quantile in ms (P10 for T3), None without history."""

    def user_clicks_7d(self, user_id: int, ts_ms: int) -> int:
        """The user's clicks with event time in ``[ts_ms - 7 days, ts_ms)``. Asked only when the
        caller gives no per-row T2 counts (:meth:`StatisticsColumns.add`); the pipeline always
        gives them, so its statistics (``FrozenStoreStatistics``) leave this out."""


def describe_rules(rules: int) -> str:
    """``'T1|MIN'``-style names of the set bits."""
    return "|".join(name for bit, name in _RULE_NAMES if rules & bit)


def primary_rule(rules: int) -> str | None:
    """The first of T1, T2, T3 that fired (the paper's attribution of a valid read), else None."""
    for bit, name in _RULE_NAMES[:3]:
        if rules & bit:
            return name
    return None


def x_l_ms_from_moments(moments: tuple[float, float] | None) -> float:
    """exp(mu - sigma) in ms, NaN when unknown."""
    if moments is None:
        return math.nan
    mu, sigma = moments
    return math.exp(mu - sigma) if math.isfinite(mu) and math.isfinite(sigma) else math.nan


def valid_read_batch(clicked, dwell_ms, x_l_ms, item_p10_ms, user_clicks,
                     cfg: ValidReadConfig = ValidReadConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(valid (B,) bool, rules (B,) uint8); NaN in ``x_l_ms`` / ``item_p10_ms`` means unknown.

    ``dwell_ms`` < 0 means no dwell arrived; ``x_l_ms`` may be a scalar or (B,).
    """
    clicked = np.asarray(clicked, dtype=bool)
    dwell = np.asarray(dwell_ms, dtype=np.float64)
    b = clicked.shape[0]
    x_l = np.broadcast_to(np.asarray(x_l_ms, dtype=np.float64), (b,))
    if cfg.t1_fixed_x_l_ms is not None:
        x_l = np.full(b, float(cfg.t1_fixed_x_l_ms))
    p10 = np.asarray(item_p10_ms, dtype=np.float64)
    n_clicks = np.asarray(user_clicks, dtype=np.int64)
    has_dwell = clicked & (dwell >= 0)
    rules = np.zeros(b, dtype=np.uint8)
    if cfg.t1:
        rules |= np.where(has_dwell & (dwell >= x_l), RULE_T1, 0).astype(np.uint8)  # NaN compares False
        rules |= np.where(clicked & np.isnan(x_l), RULE_X_L_UNKNOWN, 0).astype(np.uint8)
    if cfg.t2:
        rules |= np.where(clicked & (n_clicks < cfg.t2_max_clicks), RULE_T2, 0).astype(np.uint8)
    if cfg.t3:
        rules |= np.where(has_dwell & (dwell >= p10), RULE_T3, 0).astype(np.uint8)
        rules |= np.where(clicked & np.isnan(p10), RULE_P10_UNKNOWN, 0).astype(np.uint8)
    min_ok = has_dwell & (dwell >= cfg.min_dwell_ms)
    rules |= np.where(min_ok, RULE_MIN_DWELL, 0).astype(np.uint8)
    valid = min_ok & ((rules & (RULE_T1 | RULE_T2 | RULE_T3)) != 0)
    return valid, rules


def ndt_params(cfg: JoinerConfig, stats: DwellStatistics | None) -> NdtParams:
    """The configured eq. 1 parameters, or derived from the live moments when so configured and
    known; the configured ones too while no tau can be fitted (sigma 0 or too small, see
    :func:`derive_params`)."""
    if cfg.ndt.derive_from_stats and stats is not None:
        moments = stats.ln_dwell_ms_moments()
        if moments is not None:
            try:
                return derive_params(moments[0] - _LN_MS_PER_S, moments[1], cfg.ndt)
            except ValueError:
                pass  # no spread yet (one click, or every dwell nearly the same)
    return NdtParams.from_config(cfg.ndt)


def label_batch(joined: Sequence[JoinedImpression], snapshots: Sequence[Snapshot],
                stats: DwellStatistics, cfg: JoinerConfig) -> list[bytes]:
    """Encoded samples (topic ``samples``) for joined impressions, built column-wise.

    Valid read, rules and NDT weight from ``stats``; the snapshots as given. The statistics must
    describe the stream before these clicks (query, then update the store); the snapshots must
    be the user's sequences before each impression's ts (the encoder rejects a newer entry).
    """
    if len(joined) != len(snapshots):
        raise ValueError(f"{len(joined)} joined impressions but {len(snapshots)} snapshots")
    return encode_labelled(joined, snapshots, query_statistics(joined, stats, cfg), cfg)


def query_statistics(joined: Sequence[JoinedImpression], stats: DwellStatistics,
                     cfg: JoinerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`label_batch` asks ``stats`` for, per row: ``(x_l_ms, item_p10_ms, user_clicks,
    ndt_weight)``, (B,) each (NaN = unknown). Rows judged on different statistics (e.g. several
    statistics epochs) can be queried apart (:class:`StatisticsColumns`) and encoded together
    with :func:`encode_labelled`."""
    columns = StatisticsColumns(cfg)
    columns.add(joined, stats)
    return columns.columns()


class StatisticsColumns:
    """:func:`query_statistics` over consecutive runs of rows, each run judged on its own
    statistics: :meth:`add` per run, in row order, then :meth:`columns` builds the (B,) columns
    in one numpy pass. The NDT weights of all rows whose runs share the parameters are computed
    in one call (the weight is elementwise, so this equals one call per run)."""

    def __init__(self, cfg: JoinerConfig) -> None:
        self.cfg = cfg
        self._x_l: list[float] = []
        self._p10: list[float] = []
        self._n_clicks: list[int] = []
        self._ndt: dict[NdtParams, tuple[list[int], list[int]]] = {}  # params -> (rows, dwell_ms)

    def add(self, run: Sequence[JoinedImpression], stats: DwellStatistics,
            user_clicks: Sequence[int] | None = None) -> None:
        """Query ``stats`` for the rows of ``run`` (the next rows). ``user_clicks``: the rows' T2
        counts, one per row, when the caller has them (the pipeline counts per sample, from its
        snapshot read); ``stats.user_clicks_7d`` is not asked then."""
        if user_clicks is not None and len(user_clicks) != len(run):
            raise ValueError(f"{len(user_clicks)} T2 counts for {len(run)} rows")
        vr = self.cfg.valid_read
        base, n = len(self._x_l), len(run)
        self._x_l += [x_l_ms_from_moments(stats.ln_dwell_ms_moments()) if vr.t1 else math.nan] * n
        p10, n_clicks = self._p10, self._n_clicks
        rows: list[int] = []
        dwell: list[int] = []
        for i, j in enumerate(run):
            if not j.clicked:
                p10.append(math.nan)
                n_clicks.append(0)
                continue
            imp = j.impression
            q = stats.item_dwell_quantile_ms(imp.item_id, vr.t3_quantile) if vr.t3 else None
            p10.append(math.nan if q is None else q)
            if not vr.t2:
                n_clicks.append(0)
            elif user_clicks is not None:
                n_clicks.append(user_clicks[i])
            else:
                n_clicks.append(stats.user_clicks_7d(imp.user_id, j.click_ts_ms))
            rows.append(base + i)
            dwell.append(j.dwell_ms)
        if rows:
            group = self._ndt.setdefault(ndt_params(self.cfg, stats), ([], []))
            group[0].extend(rows)
            group[1].extend(dwell)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(x_l_ms, item_p10_ms, user_clicks, ndt_weight)`` of every row added, (B,) each."""
        ndt = np.zeros(len(self._x_l), dtype=np.float32)
        for params, (rows, dwell) in self._ndt.items():
            ndt[rows] = ndt_weight_ms(np.array(dwell, dtype=np.int64), params)
        return (np.array(self._x_l, dtype=np.float64), np.array(self._p10, dtype=np.float64),
                np.array(self._n_clicks, dtype=np.int64), ndt)


def encode_labelled(joined: Sequence[JoinedImpression], snapshots: Sequence[Snapshot],
                    statistics: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                    cfg: JoinerConfig) -> list[bytes]:
    """Encoded samples from the joined impressions, their snapshots and the per-row statistics of
    :func:`query_statistics` or ``StatisticsColumns.columns()`` (x_l, P10, clicks in the T2
    window, NDT weight; one entry per row)."""
    x_l, p10, n_clicks, ndt = statistics
    n, vr = len(joined), cfg.valid_read
    # one pass over the rows, then columns: (B, 14) int64
    rows = np.array([_impression_columns(j.impression) + _joined_columns(j) for j in joined],
                    dtype=np.int64).reshape(n, len(_ROW_COLUMNS))
    clicked, liked, disliked, early = (rows[:, k] != 0 for k in range(10, 14))
    dwell = rows[:, 9]
    valid, rules = valid_read_batch(clicked, dwell, x_l, p10, n_clicks, vr)
    fixed = np.zeros(n, dtype=FIXED_DTYPE)
    for k, name in enumerate(_ROW_COLUMNS[:10]):
        fixed[name] = rows[:, k]
    fixed["rules"] = rules
    fixed["ndt_weight"] = ndt
    fixed["flags"] = (clicked * FLAG_CLICKED | valid * FLAG_VALID_READ | liked * FLAG_LIKED
                      | disliked * FLAG_DISLIKED | early * FLAG_EARLY)
    group = np.zeros(n, dtype=np.int64)
    for name in cfg.user_group_fields:  # mixed radix, as user_group_code
        values = fixed[name].astype(np.int64) + (1 if name == "age_group" else 0)
        group = group * USER_GROUP_FIELDS[name] + values
    fixed["user_group"] = group
    return encode_batch(fixed, snapshots)


def label_samples(joined: Sequence[JoinedImpression], snapshots: Sequence[Snapshot],
                  stats: DwellStatistics, cfg: JoinerConfig) -> list[Sample]:
    """:func:`label_batch` as Sample objects (decoded back: what the learner will see)."""
    return [decode(v) for v in label_batch(joined, snapshots, stats, cfg)]
