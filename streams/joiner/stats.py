"""The statistics a labelling run is judged on, and the item updates that wait for a later epoch.

:class:`FrozenStoreStatistics` takes the ln(dwell) moments (T1) from the pipeline's partial of the
global statistics (kept equal, bit for bit, to the one the store holds for the partition's shard)
and reads the item P10 sketches (T3) on demand from a store view (the open transaction, which sees
its own staged updates). The pipeline builds it before it applies anything of the run's epoch, so
every sample of a run is judged on the statistics as of the start of its statistics epoch. It has
no ``user_clicks_7d``: the pipeline counts T2 per sample, in close order, from the snapshot read,
and hands the counts to ``StatisticsColumns.add`` itself.

:class:`DeferredItemStats` holds the item updates (counts, dwell sketches) and the partition's
ln(dwell) partial of the samples labelled in the current epoch until a sample of a later epoch is
labelled; they are part of the committed state.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from featurestore import keys as fs_keys
from featurestore.batch import StoreBatch
from featurestore.dwellstats import DwellStats
from featurestore.reader import FeatureView
from streams.joiner.records import JoinedImpression

#: one deferred item update per sample, as stored
_DEFERRED = np.dtype([("epoch", "<i8"), ("item_id", "<u8"), ("dwell_ms", "<i8"), ("click_ts_ms", "<i8"),
                      ("flags", "u1")])
_F_CLICKED, _F_LIKED, _F_DISLIKED = 1, 2, 4


class FrozenStoreStatistics:
    """T1 moments read at construction; T3 quantiles read (and cached) on first use (T2: see the
    module docstring)."""

    def __init__(self, view: FeatureView, dwell: DwellStats) -> None:
        mu, sigma = dwell.mu, dwell.sigma
        self._moments = (mu, sigma) if math.isfinite(mu) and math.isfinite(sigma) else None
        self._view = view
        self._quantiles: dict[tuple[int, float], float | None] = {}

    def ln_dwell_ms_moments(self) -> tuple[float, float] | None:
        return self._moments

    def item_dwell_quantile_ms(self, item_id: int, quantile: float) -> float | None:
        key = (item_id, quantile)
        if key not in self._quantiles:
            sketch = self._view.item_dwell_sketch(item_id)
            self._quantiles[key] = None if sketch is None or sketch.n == 0 else float(sketch.quantile(quantile))
        return self._quantiles[key]


class DeferredItemStats:
    """The item updates of the samples of one statistics epoch, applied when a later one starts.

    ``own``: the partition's ln(dwell) partial, equal to the stored one; :meth:`apply` feeds it and
    stages it itself (:meth:`StoreBatch.stage_global_dwell`). ``raw``: :meth:`to_bytes` of the
    last commit.
    """

    def __init__(self, partition: int, own: DwellStats, raw: bytes | None = None) -> None:
        self.partition, self.own = partition, own
        self._records: list[tuple[int, int, int, int, int]] = (
            [] if raw is None else np.frombuffer(raw, dtype=_DEFERRED).tolist())

    @property
    def epoch(self) -> int | None:
        """The epoch of the waiting updates (None: none wait)."""
        return self._records[0][0] if self._records else None

    def add_run(self, epoch: int, run: Sequence[JoinedImpression]) -> None:
        """Defer the item updates of ``run``, labelled in ``epoch`` (the epoch of any waiting ones)."""
        records = self._records
        for s in run:
            flags = s.clicked * _F_CLICKED | s.liked * _F_LIKED | s.disliked * _F_DISLIKED
            records.append((epoch, s.impression.item_id, s.dwell_ms, s.click_ts_ms, flags))

    def item_keys(self, joined: Sequence[JoinedImpression], epoch_ms: int) -> list[bytes]:
        """The item keys a labelling call over ``joined`` reads or stages: the sketches of the
        clicked items (T3) and, only when the call crosses an epoch (so :meth:`apply` runs), those
        that applying the waiting updates and those of ``joined`` stages (counts of every item,
        sketches of the clicked ones). Ascending key order (sketches, then counts; by item), which
        a multi-get serves faster."""
        epochs = {s.label_ts_ms // epoch_ms for s in joined}
        if self._records:
            epochs.add(self.epoch)
        clicked = dict.fromkeys(s.impression.item_id for s in joined if s.clicked)
        if len(epochs) < 2:  # nothing is applied in this call: only the T3 reads
            return list(map(fs_keys.item_sketch_key, sorted(clicked)))
        counted = dict.fromkeys(r[1] for r in self._records)
        counted.update(dict.fromkeys(s.impression.item_id for s in joined))
        clicked.update(dict.fromkeys(r[1] for r in self._records if r[4] & _F_CLICKED))
        return [*map(fs_keys.item_sketch_key, sorted(clicked)), *map(fs_keys.item_counts_key, sorted(counted))]

    def apply(self, tx: StoreBatch) -> None:
        """Stage the waiting updates in ``tx`` and feed ``own``; nothing waits afterwards."""
        counts: dict[int, list[int]] = {}  # item -> [impressions, clicks, likes, dislikes]
        own, staged = self.own, False
        for _epoch, item, dwell_ms, click_ts_ms, flags in self._records:
            c = counts.get(item)
            if c is None:
                c = counts[item] = [0, 0, 0, 0]
            c[0] += 1
            c[1] += flags & _F_CLICKED
            c[2] += (flags & _F_LIKED) >> 1
            c[3] += (flags & _F_DISLIKED) >> 2
            if flags & _F_CLICKED and dwell_ms >= 0:
                tx.add_item_dwell(item, dwell_ms)
                if not staged:  # the clicks' times were seen when their samples were staged
                    tx.stage_global_dwell(own, shard=self.partition)
                    staged = True
                own.update(dwell_ms, click_ts_ms)
        for item, c in counts.items():
            tx.add_item_counts(item, c)
        self._records = []

    def to_bytes(self) -> bytes:
        return np.array(self._records, dtype=_DEFERRED).tobytes()
