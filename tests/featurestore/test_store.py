"""RocksFeatureStore on a real rocksdict under tmp_path: transaction lifecycle, reads, recovery."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from featurestore import (CounterKind, FeatureStoreConfig, ItemCountField, OffsetRegressionError,
                          RocksFeatureStore, SequenceConfig, SequenceKind, StoreClosedError,
                          TransactionStateError, keys)
from featurestore.dwellstats import DwellStats
from featurestore.store import FeatureStore

DAY = 86_400_000


class Clock:
    def __init__(self, now: int = 1_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = RocksFeatureStore(tmp_path / "fs", FeatureStoreConfig(), now_ms=clock)
    yield s
    s.close()


def test_is_a_feature_store(store):
    assert isinstance(store, RocksFeatureStore)
    proto_methods = [m for m in dir(FeatureStore) if not m.startswith("_")]
    assert proto_methods and all(callable(getattr(store, m)) for m in proto_methods)


def test_staged_updates_visible_in_the_transaction_only_until_commit(store, clock):
    tx = store.transaction()
    tx.add_sequence_event(1, SequenceKind.CLICK, item_id=10, category=2, ts_ms=5 * DAY)
    tx.add_user_event(1, CounterKind.CLICK, ts_ms=5 * DAY)
    tx.add_item_count(10, ItemCountField.CLICKS)
    tx.set_offset("clicks", 2, 8)
    assert tx.user_features(1, ts_ms=6 * DAY).click.item_ids.tolist() == [10]
    assert tx.user_clicks_in_window(1, 6 * DAY) == 1
    assert tx.item_features([10]).clicks.tolist() == [1]
    assert store.user_features(1, ts_ms=6 * DAY).click.item_ids.tolist() == []
    assert store.committed_offset("clicks", 2) is None and tx.pending_offsets == {("clicks", 2): 8}
    clock.now = 2_000
    info = tx.commit()
    assert (info.commit_seq, info.max_event_ts_ms, info.wall_ms) == (1, 5 * DAY, 2_000)
    assert store.commit_info() == info
    assert store.committed_offset("clicks", 2) == 8
    assert store.committed_offsets() == {("clicks", 2): 8}
    uf = store.user_features(1, ts_ms=6 * DAY)
    assert uf.click.categories.tolist() == [2] and uf.clicks_in_window == 1
    assert uf.unclick.item_ids.size == 0 and uf.impressions_in_window == 0


def test_exception_in_with_aborts_everything(store):
    with store.transaction() as tx:
        tx.add_item_dwell(3, 1000)
        tx.set_offset("dwell", 0, 5)
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.add_item_dwell(3, 9000)
            tx.add_sequence_event(4, SequenceKind.LIKE, 3, 1, 10)
            tx.set_offset("dwell", 0, 6)
            raise RuntimeError("worker crashed mid-batch")
    assert tx.state == tx.ABORTED
    assert store.committed_offset("dwell", 0) == 5
    assert store.item_features([3]).n_dwell.tolist() == [1]
    assert len(store.user_features(4).like) == 0
    with pytest.raises(TransactionStateError):
        tx.add_item_dwell(3, 1)


def test_one_transaction_at_a_time_and_no_use_after_commit(store):
    tx = store.transaction()
    with pytest.raises(TransactionStateError):
        store.transaction()
    tx.commit()   # empty: nothing written
    assert store.commit_info() is None
    with pytest.raises(TransactionStateError):
        tx.set_offset("clicks", 0, 1)
    store.transaction().abort()


def test_offsets_never_move_backwards(store):
    with store.transaction() as tx:
        tx.set_offset("impressions", 0, 100)
    with store.transaction() as tx:
        tx.set_offset("impressions", 0, 100)      # equal is fine (an idle commit)
        with pytest.raises(OffsetRegressionError):
            tx.set_offset("impressions", 0, 99)
        tx.set_offset("impressions", 1, 3)        # other partitions are independent
    assert store.committed_offsets() == {("impressions", 0): 100, ("impressions", 1): 3}


def test_reopen_recovers_state_offsets_and_commit_seq(tmp_path, clock):
    path = tmp_path / "fs"
    cfg = FeatureStoreConfig(sequences=SequenceConfig(max_len=5, slack=2))
    with RocksFeatureStore(path, cfg, now_ms=clock) as s:
        for i in range(20):
            with s.transaction() as tx:
                tx.add_sequence_event(9, SequenceKind.UNCLICK, item_id=i, category=-1, ts_ms=1000 * i)
                tx.add_global_dwell(1000 + i, ts_ms=1000 * i, shard=i % 3)
                tx.set_offset("impressions", 0, i + 1)
    with RocksFeatureStore(path, cfg, now_ms=clock) as s:
        assert s.committed_offset("impressions", 0) == 20 and s.commit_info().commit_seq == 20
        assert s.user_features(9).unclick.item_ids.tolist() == [15, 16, 17, 18, 19]
        assert s.user_features(9, ts_ms=18_000).unclick.item_ids.tolist() == [13, 14, 15, 16, 17]
        assert s.global_dwell_stats().n == 20
        with s.transaction() as tx:
            tx.set_offset("impressions", 0, 21)
        assert s.commit_info().commit_seq == 21


def test_global_dwell_shards_merge_to_one_fed_both(store):
    dwell = [(1000 * (i % 17 + 1), DAY * (i % 5)) for i in range(60)]
    with store.transaction() as tx:
        for i, (d, t) in enumerate(dwell):
            tx.add_global_dwell(d, t, shard=i % 2)
        inside = tx.global_dwell_stats()
    one = DwellStats.from_config(store.config.dwell)
    for d, t in dwell:
        one.update(d, t)
    for got in (inside, store.global_dwell_stats()):
        assert got.n == 60 and got.mu == pytest.approx(one.mu, rel=1e-12)
        assert got.sigma == pytest.approx(one.sigma, rel=1e-9)
    raw_keys = [k for k, _ in store._scan(keys.family_prefix(keys.Family.GLOBAL_DWELL))]
    assert raw_keys == [keys.global_dwell_key(0), keys.global_dwell_key(1)]


def test_item_features_align_with_the_request(store):
    with store.transaction() as tx:
        for d in range(1, 101):
            tx.add_item_dwell(7, d * 100)
        tx.add_item_count(7, ItemCountField.IMPRESSIONS, 5)
        tx.add_item_count(8, ItemCountField.DISLIKES)
    f = store.item_features(np.array([8, 7, 99], dtype=np.int64))
    assert f.item_ids.tolist() == [8, 7, 99]
    assert math.isnan(f.dwell_quantile_ms[0]) and f.dwell_quantile_ms[1] == 1000.0
    assert f.n_dwell.tolist() == [0, 100, 0] and f.impressions.tolist() == [0, 5, 0]
    assert f.dislikes.tolist() == [1, 0, 0]
    assert store.item_dwell_sketch(7).quantile(0.5) == 5000.0
    assert store.item_features([]).item_ids.size == 0


def test_bad_inputs_and_closed_store(store):
    with store.transaction() as tx:
        with pytest.raises(ValueError):
            tx.add_sequence_event(1, SequenceKind.CLICK, 1, category=-2, ts_ms=0)
        with pytest.raises(keys.KeyEncodingError):
            tx.add_sequence_event(1, SequenceKind.CLICK, item_id=-5, category=1, ts_ms=0)
        with pytest.raises(ValueError):
            tx.set_offset("clicks", 0, -1)
        with pytest.raises(ValueError):
            tx.add_item_dwell(1, -3)
    store.close()
    with pytest.raises(StoreClosedError):
        store.user_features(1)
    with pytest.raises(StoreClosedError):
        store.transaction()


def test_prepared_batches_rebuild_an_equal_store(tmp_path):
    """prepare() returns exactly what commit() writes; applying those pairs (a changelog) to an
    empty store gives the same state, offsets and commit record; local puts stay local."""
    a = RocksFeatureStore(tmp_path / "a")
    log = []
    for step in range(3):
        tx = a.transaction()
        tx.add_sequence_event(user_id=7, kind=SequenceKind.CLICK, item_id=step, category=1, ts_ms=100 + step)
        tx.add_item_dwell(item_id=3, dwell_ms=1000.0 * (step + 1))
        tx.add_global_dwell(5000.0, ts_ms=100 + step, shard=2)
        tx.set_offset("clicks", 0, step + 1)
        log += tx.prepare()
        assert tx.prepared_commit_seq == step + 1
        tx.commit({b"\x01changelog.next": b"%d" % len(log)})
    b = RocksFeatureStore(tmp_path / "b")
    assert b.apply_changes(log) == len(log)
    for store in (a, b):
        assert store.committed_offset("clicks", 0) == 3 and store.commit_info().commit_seq == 3
        assert store.user_features(7, ts_ms=200).click.item_ids.tolist() == [0, 1, 2]
    assert a.item_dwell_sketch(3).quantile(0.5) == b.item_dwell_sketch(3).quantile(0.5)
    assert a.global_dwell_stats().to_bytes() == b.global_dwell_stats().to_bytes()
    assert a._get_many([b"\x01changelog.next"]) != b._get_many([b"\x01changelog.next"]) == [None]
    a.close()
    b.close()


def test_republish_writes_committed_bytes_unless_the_commit_writes_the_key(tmp_path):
    """republish(keys): the committed bytes of each key (a delete for a key with none) join the
    commit's pairs, before the commit record; a key the commit writes anyway keeps its new value."""
    from featurestore import keys

    a = RocksFeatureStore(tmp_path / "a")
    with a.transaction() as tx:
        tx.add_sequence_event(user_id=7, kind=SequenceKind.CLICK, item_id=1, category=1, ts_ms=100)
        tx.add_item_dwell(item_id=3, dwell_ms=1000.0)
    seq_key, sketch_key = keys.user_sequence_key(7, SequenceKind.CLICK), keys.item_sketch_key(3)
    absent = keys.item_sketch_key(4)
    committed = dict(zip([seq_key, sketch_key], a._get_many([seq_key, sketch_key])))
    tx = a.transaction()
    tx.add_item_dwell(item_id=3, dwell_ms=2000.0)  # written anyway
    tx.republish([seq_key, sketch_key, absent])
    pairs = tx.prepare()
    assert pairs[-1][0] == keys.meta_key(keys.COMMIT_META)
    got = dict(pairs)
    assert got[seq_key] == committed[seq_key] and got[absent] is None
    assert got[sketch_key] != committed[sketch_key] and [k for k, _ in pairs].count(sketch_key) == 1
    tx.commit()
    assert a._get_many([seq_key]) == [committed[seq_key]] and a.commit_info().commit_seq == 2
    tx = a.transaction()
    tx.republish([seq_key])  # nothing else staged: still a commit
    assert [k for k, _ in tx.prepare()] == [seq_key, keys.meta_key(keys.COMMIT_META)]
    tx.abort()
    a.close()


def test_a_value_that_cannot_be_encoded_fails_the_transaction_and_frees_the_store(store):
    """A bucket count past its u32 field raises when the batch is encoded; the transaction ends
    FAILED with nothing written, and the store takes the next transaction (it used to stay 'open'
    and block every later one). A single count that large is refused at once."""
    with store.transaction() as tx0:
        with pytest.raises(ValueError, match="not in 0..4294967295"):
            tx0.add_user_event(9, CounterKind.CLICK, ts_ms=DAY, n=2**32)
    with pytest.raises((OverflowError, struct.error)):
        with store.transaction() as tx:
            tx.add_user_event(9, CounterKind.CLICK, ts_ms=DAY, n=2**31)
            tx.add_user_event(9, CounterKind.CLICK, ts_ms=DAY, n=2**31)
            tx.set_offset("clicks", 0, 5)
    assert tx.state == tx.FAILED
    assert store.committed_offset("clicks", 0) is None and store.user_features(9).clicks_in_window == 0
    with store.transaction() as tx2:
        tx2.add_user_event(9, CounterKind.CLICK, ts_ms=DAY)
    assert store.user_features(9, ts_ms=DAY).clicks_in_window == 1
