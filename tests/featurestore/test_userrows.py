"""UserRows and stage_global_dwell against the plain transaction calls: the same bytes, in the same order."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import (CounterKind, DwellStats, FeatureStoreConfig, RocksFeatureStore, SequenceConfig,
                          SequenceKind, TransactionStateError, keys)

_COMMIT = keys.meta_key(keys.COMMIT_META)

# (user, is a sequence entry, kind or counter, item, category, ts)
op = st.tuples(st.integers(0, 3), st.booleans(), st.integers(1, 4), st.integers(0, 5),
               st.integers(-1, 3), st.integers(0, 50))


def _apply(tx, ops, through_rows: bool) -> list:
    rows = tx.user_rows(u for u, *_ in ops) if through_rows else None
    seen = []
    for user, is_entry, kind, item, cat, ts in ops:
        if is_entry:
            if through_rows:
                rows[user].add_sequence_event(SequenceKind(kind), item, cat, ts)
            else:
                tx.add_sequence_event(user, SequenceKind(kind), item, cat, ts)
        else:
            counter = CounterKind(1 + kind % 2)
            if through_rows:
                rows[user].add_user_event(counter, ts)
            else:
                tx.add_user_event(user, counter, ts)
        if through_rows:  # what the rows show is what the transaction reads
            seen.append([None if s is None else s.entries_before(10**6, 100) for s in rows[user].sequences()])
        else:
            seen.append([None if s is None else s.entries_before(10**6, 100)
                         for s in tx._load_many(keys.user_row_keys(user)[:4], tx._decode_sequence)])
    return seen


@settings(max_examples=40, deadline=None)
@given(before=st.lists(op, max_size=15), ops=st.lists(op, max_size=40))
def test_user_rows_write_what_the_transaction_calls_write(tmp_path_factory, before, ops):
    cfg = FeatureStoreConfig(sequences=SequenceConfig(max_len=3, slack=1))
    results = []
    for through_rows in (False, True):
        with RocksFeatureStore(tmp_path_factory.mktemp("fs"), cfg, now_ms=lambda: 0) as store:
            with store.transaction() as tx:
                _apply(tx, before, through_rows=False)
            tx = store.transaction()
            seen = _apply(tx, ops, through_rows)
            results.append((seen, tx.prepare(), tx.n_updates))
            tx.commit()
    (seen_a, changes_a, n_a), (seen_b, changes_b, n_b) = results
    assert seen_a == seen_b
    assert changes_a == changes_b  # same keys, values and order (the commit record included)
    assert n_a == n_b


def test_user_rows_check_like_the_transaction(tmp_path):
    with RocksFeatureStore(tmp_path / "fs") as store:
        tx = store.transaction()
        rows = tx.user_rows([1, 1, 2])
        assert sorted(rows) == [1, 2] and rows[1].sequences() == [None] * 4
        with pytest.raises(ValueError):
            rows[1].add_sequence_event(SequenceKind.CLICK, 1, category=-2, ts_ms=0)
        with pytest.raises(keys.KeyEncodingError):
            rows[1].add_sequence_event(SequenceKind.CLICK, item_id=-5, category=1, ts_ms=0)
        with pytest.raises(ValueError):
            rows[1].add_user_event(CounterKind.CLICK, ts_ms=-1)
        for kind in (0, 5):  # row kind - 1: a counter's row (5 - 1) would have taken a sequence
            with pytest.raises(ValueError, match="not a SequenceKind"):
                rows[1].add_sequence_event(kind, item_id=1000, category=3, ts_ms=0)
        with pytest.raises(ValueError, match="not in 0..4294967295"):
            rows[1].add_user_event(CounterKind.CLICK, ts_ms=0, n=2**32)
        assert tx.prepare() == []  # nothing was staged by the rejected updates
        tx.commit()
        tx = store.transaction()
        rows = tx.user_rows([1])
        rows[1].add_user_event(CounterKind.CLICK, ts_ms=5)
        tx.commit()
        with pytest.raises(TransactionStateError):  # a staged row after the commit
            rows[1].add_user_event(CounterKind.CLICK, ts_ms=6)
        with pytest.raises(TransactionStateError):  # a row not staged yet
            rows[1].add_sequence_event(SequenceKind.LIKE, 1, 1, ts_ms=6)
        assert store.user_features(1).clicks_in_window == 1


def test_staged_global_dwell_equals_the_per_click_calls(tmp_path):
    clicks = [(1000.0 * (i % 7 + 1), 100 * i) for i in range(20)]
    changes = []
    for staged in (False, True):
        with RocksFeatureStore(tmp_path / f"fs{staged}", now_ms=lambda: 0) as store:
            own = DwellStats.from_config(store.config.dwell)
            for half in (clicks[:10], clicks[10:]):
                tx = store.transaction()
                tx.add_item_dwell(3, 1.0)
                if staged:
                    tx.stage_global_dwell(own, shard=2)
                    for d, t in half:
                        own.update(d, t)
                    tx.stage_global_dwell(own, shard=2)  # again: the same object, no-op
                else:
                    for d, t in half:
                        tx.add_global_dwell(d, t, shard=2)
                        own.update(d, t)
                changes.append([c for c in tx.prepare() if c[0] != _COMMIT])
                tx.commit()
            assert store.global_dwell_stats().to_bytes() == own.to_bytes()
    assert changes[:2] == changes[2:]
    with RocksFeatureStore(tmp_path / "other") as store:
        with store.transaction() as tx:
            tx.add_global_dwell(1000.0, 0, shard=1)
            with pytest.raises(TransactionStateError):
                tx.stage_global_dwell(DwellStats.from_config(store.config.dwell), shard=1)
