"""Checks a worker's samples against the offline builder's under the shared-statistics staleness
bound (docs/joiner.md, "Several workers"): a sample equals the offline one byte for byte, or it
carries the ``stats.applied`` header, differs only in the T1/T3 bits (and valid_read), and those
bits are what the thresholds computed from exactly the contributions the header names give."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from featurestore import DwellStats
from streams.joiner import RULE_T1, RULE_T3
from streams.joiner.pipeline import PipelineConfig
from streams.joiner.shared import HEADER_STATS, RemoteStats, fold_partials
from streams.joiner.validread import x_l_ms_from_moments
from streams.samples import FLAG_VALID_READ, decode

RULE_X_L_UNKNOWN, RULE_P10_UNKNOWN = 16, 32
STATS_RULES = RULE_T1 | RULE_T3 | RULE_X_L_UNKNOWN | RULE_P10_UNKNOWN


@dataclass
class BoundReport:
    n_equal: int = 0
    n_headers: int = 0
    n_explained: int = 0  # differ from the offline sample, explained by the header
    explained: dict[int, str] = field(default_factory=dict)  # impression_id -> "t1" / "t3" / "t1+t3"


class SharedStatsOracle:
    """Thresholds from every partition's contributions (``shared_contributions``), for any
    ``(epoch, applied)`` a header may name."""

    def __init__(self, table: RemoteStats, config: PipelineConfig) -> None:
        self.table, self.config = table, config
        self._x_l: dict[tuple, float] = {}
        self._recs = {q: table.take(q, 0, 2**62) for q in range(table.n_sources)}

    def _upto(self, applied: tuple[int, ...]) -> list[np.ndarray]:
        return [r[r["epoch"] < a] for r, a in zip(self._recs.values(), applied)]

    def x_l_ms(self, applied: tuple[int, ...]) -> float:
        if applied not in self._x_l:
            dcfg = self.config.store.dwell
            partials = {}
            for q, recs in enumerate(self._upto(applied)):
                part = partials[q] = DwellStats.from_config(dcfg)
                for d, t in zip(recs["dwell_ms"].tolist(), recs["click_ts_ms"].tolist()):
                    part.update(d, t)
            merged = fold_partials(partials)
            self._x_l[applied] = math.nan if merged is None else x_l_ms_from_moments((merged.mu, merged.sigma))
        return self._x_l[applied]

    def p10_ms(self, item_id: int, applied: tuple[int, ...]) -> float:
        values = np.sort(np.concatenate([r["dwell_ms"][r["item_id"] == item_id] for r in self._upto(applied)]))
        if not len(values):
            return math.nan
        q = self.config.joiner.valid_read.t3_quantile
        return float(values[max(math.ceil(q * len(values)) - 1, 0)])  # the sketch is exact up to k values


def check_within_bound(records, exact: dict[int, bytes], oracle: SharedStatsOracle) -> BoundReport:
    """``records``: the worker's samples as Kafka records (value, headers); ``exact``: the offline
    builder's samples by impression id. Raises AssertionError on a difference the header does not
    explain."""
    report = BoundReport()
    for r in records:
        got = decode(r.value)
        want_raw = exact[got.impression_id]
        header = dict(r.headers or ()).get(HEADER_STATS)
        report.n_headers += header is not None
        if r.value == want_raw:
            report.n_equal += 1
            continue
        want = decode(want_raw)
        assert header is not None, f"sample {got.impression_id} differs without incomplete statistics"
        epoch_s, applied_s = header.decode().split(":")
        epoch, applied = int(epoch_s), tuple(int(a) for a in applied_s.split(","))
        assert got.label_ts_ms // oracle.config.stats_epoch_ms == epoch
        assert max(applied) <= epoch
        same = lambda s: (s.flags & ~FLAG_VALID_READ, s.rules & ~STATS_RULES, s.snapshot, s.dwell_ms,  # noqa: E731
                          s.ndt_weight, s.label_ts_ms, s.ts_ms)
        assert same(got) == same(want), got.impression_id
        complete = tuple(epoch for _ in applied)
        used = (oracle.x_l_ms(applied), oracle.p10_ms(got.item_id, applied))
        full = (oracle.x_l_ms(complete), oracle.p10_ms(got.item_id, complete))
        which = []
        for bit, u, f in ((RULE_T1, *(used[0], full[0])), (RULE_T3, *(used[1], full[1]))):
            fired = bool(got.rules & bit)
            if not math.isnan(u) and abs(got.dwell_ms - u) > 1e-6 * u:  # not a tie at float precision
                assert fired == (got.dwell_ms >= u), (got.impression_id, bit, got.dwell_ms, u)
            if fired != bool(want.rules & bit):
                lo, hi = sorted((u if not math.isnan(u) else -math.inf, f))
                assert lo <= got.dwell_ms <= hi or math.isnan(u), (got.impression_id, bit, got.dwell_ms, u, f)
                which.append("t1" if bit == RULE_T1 else "t3")
        report.n_explained += 1
        report.explained[got.impression_id] = "+".join(which) or "unknown-bits"
    return report
