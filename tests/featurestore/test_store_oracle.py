"""Oracle: the store after random transactions (some aborted, with reopens) reads the same as plain
in-memory aggregates fed only the committed transactions."""
from __future__ import annotations

import math
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import (CounterConfig, CounterKind, FeatureStoreConfig, ItemCountField,
                          RocksFeatureStore, SequenceConfig, SequenceKind)
from featurestore.counters import WindowedCounter
from featurestore.dwellstats import DwellStats
from featurestore.sequences import UserSequence
from featurestore.sketches import DwellSketch

CFG = FeatureStoreConfig(sequences=SequenceConfig(max_len=4, slack=2),
                         counters=CounterConfig(bucket_ms=100, window_buckets=5, late_buckets=3))
USERS, ITEMS = st.integers(0, 3), st.integers(0, 3)
TS = st.integers(0, 3_000)
OP = st.one_of(
    st.tuples(st.just("seq"), USERS, st.sampled_from(SequenceKind), ITEMS, st.integers(-1, 9), TS),
    st.tuples(st.just("cnt"), USERS, st.sampled_from(CounterKind), TS, st.integers(1, 3)),
    st.tuples(st.just("dwell"), ITEMS, st.integers(0, 100_000), TS, st.integers(0, 2)),
    st.tuples(st.just("icount"), ITEMS, st.sampled_from(ItemCountField), st.integers(1, 3)),
)
TXS = st.lists(st.tuples(st.lists(OP, max_size=12), st.booleans(), st.booleans()), max_size=8)


class Reference:
    def __init__(self) -> None:
        self.seqs, self.cnts, self.sketches, self.items, self.dwell = {}, {}, {}, {}, {}

    def apply(self, op) -> None:
        if op[0] == "seq":
            _, u, kind, item, cat, ts = op
            self.seqs.setdefault((u, kind), UserSequence(CFG.sequences.capacity)).add(item, cat, ts)
        elif op[0] == "cnt":
            _, u, kind, ts, n = op
            self.cnts.setdefault((u, kind), WindowedCounter.from_config(CFG.counters)).add(ts, n)
        elif op[0] == "dwell":
            _, item, d, ts, shard = op
            self.sketches.setdefault(item, DwellSketch(CFG.sketch.k)).update(d)
            self.dwell.setdefault(shard, DwellStats.from_config(CFG.dwell)).update(d, ts)
        else:
            _, item, field, n = op
            self.items.setdefault(item, [0, 0, 0, 0])[field] += n


def stage(tx, op) -> None:
    if op[0] == "seq":
        _, u, kind, item, cat, ts = op
        tx.add_sequence_event(u, kind, item, cat, ts)
    elif op[0] == "cnt":
        _, u, kind, ts, n = op
        tx.add_user_event(u, kind, ts, n)
    elif op[0] == "dwell":
        _, item, d, ts, shard = op
        tx.add_item_dwell(item, d)
        tx.add_global_dwell(d, ts, shard)
    else:
        _, item, field, n = op
        tx.add_item_count(item, field, n)


def same_nan(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=25, deadline=None)
@given(txs=TXS, probe=TS)
def test_store_matches_in_memory_reference(txs, probe):
    ref = Reference()
    with tempfile.TemporaryDirectory() as tmp:
        store = RocksFeatureStore(tmp, CFG)
        try:
            for offset, (ops, commit, reopen) in enumerate(txs, start=1):
                with store.transaction() as tx:
                    for op in ops:
                        stage(tx, op)
                    tx.set_offset("events", 0, offset)
                    if not commit:
                        tx.abort()
                if commit:
                    for op in ops:
                        ref.apply(op)
                if reopen:
                    store.close()
                    store = RocksFeatureStore(tmp, CFG)
            for u in range(4):
                uf = store.user_features(u, ts_ms=probe)
                for kind in SequenceKind:
                    seq = ref.seqs.get((u, kind))
                    want = [] if seq is None else seq.before(probe, CFG.sequences.max_len).item_ids.tolist()
                    assert uf.sequence(kind).item_ids.tolist() == want
                clicks = ref.cnts.get((u, CounterKind.CLICK))
                assert uf.clicks_in_window == (0 if clicks is None else clicks.count(probe))
            f = store.item_features(range(4))
            for i in range(4):
                sk = ref.sketches.get(i)
                assert same_nan(f.dwell_quantile_ms[i], math.nan if sk is None else sk.quantile(0.1))
                assert [f.impressions[i], f.clicks[i], f.likes[i], f.dislikes[i]] == ref.items.get(i, [0] * 4)
            merged = DwellStats.from_config(CFG.dwell)
            for _, part in sorted(ref.dwell.items()):
                merged = merged.merge(part)
            got = store.global_dwell_stats()
            assert got.n == merged.n and same_nan(got.mu, merged.mu)
        finally:
            store.close()
