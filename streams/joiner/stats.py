"""The feature store as :class:`~streams.joiner.validread.DwellStatistics` for one labelling run.

:class:`FrozenStoreStatistics` takes the ln(dwell) moments (T1) from the pipeline's partial of the
global statistics (kept equal, bit for bit, to the one the store holds for the partition's shard)
and reads the item P10 sketches (T3) on demand from a store view (the open transaction, which sees
its own staged updates). The pipeline builds it before it applies anything of the run's epoch, so
every sample of a run is judged on the statistics as of the start of its statistics epoch. The T2
counts are computed by the pipeline per sample, in close order, and handed in.
"""
from __future__ import annotations

import math

from featurestore.dwellstats import DwellStats
from featurestore.reader import FeatureView


class FrozenStoreStatistics:
    """T1 moments read at construction; T3 quantiles read (and cached) on first use."""

    def __init__(self, view: FeatureView, dwell: DwellStats, user_clicks_7d: dict[tuple[int, int], int]) -> None:
        mu, sigma = dwell.mu, dwell.sigma
        self._moments = (mu, sigma) if math.isfinite(mu) and math.isfinite(sigma) else None
        self._view = view
        self._quantiles: dict[tuple[int, float], float | None] = {}
        self._clicks = user_clicks_7d

    def ln_dwell_ms_moments(self) -> tuple[float, float] | None:
        return self._moments

    def item_dwell_quantile_ms(self, item_id: int, quantile: float) -> float | None:
        key = (item_id, quantile)
        if key not in self._quantiles:
            sketch = self._view.item_dwell_sketch(item_id)
            self._quantiles[key] = None if sketch is None or sketch.n == 0 else float(sketch.quantile(quantile))
        return self._quantiles[key]

    def user_clicks_7d(self, user_id: int, ts_ms: int) -> int:
        try:
            return self._clicks[(user_id, ts_ms)]
        except KeyError:
            raise ValueError(f"no T2 count computed for user_id={user_id} ts_ms={ts_ms}") from None
