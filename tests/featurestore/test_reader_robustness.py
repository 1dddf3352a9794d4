"""FeatureReader at the edges: when the store goes away or does not open (a clear
FeatureStoreError, the reader keeps what it saw, nothing is left behind, and a later refresh works
once the store is back), and ``has_user`` for a user with counters only."""
from __future__ import annotations

import tempfile

import pytest

from featurestore import (CounterKind, FeatureReader, FeatureStoreError, RocksFeatureStore,
                          SequenceKind, StoreNotFoundError)


def write_like(store: RocksFeatureStore, user_id: int, item_id: int, offset: int) -> None:
    with store.transaction() as tx:
        tx.add_sequence_event(user_id, SequenceKind.LIKE, item_id=item_id, category=1, ts_ms=1_000 + offset)
        tx.set_offset("feedback", 0, offset)


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store"
    with RocksFeatureStore(path) as writer:
        write_like(writer, 5, 11, 1)
    return path


@pytest.mark.parametrize("mode", ["secondary", "read_only"])
def test_refresh_of_a_moved_store_raises_and_the_reader_recovers_when_it_is_back(store_path, mode):
    moved = store_path.with_name("moved")
    with FeatureReader(store_path, mode=mode) as reader:
        store_path.rename(moved)
        with pytest.raises(StoreNotFoundError, match=f"no feature store at path={store_path}"):
            reader.refresh()
        assert not store_path.exists()  # no empty store directory created in its place
        assert reader.user_features(5).like.item_ids.tolist() == [11]  # still serves what it saw

        moved.rename(store_path)
        with RocksFeatureStore(store_path) as writer:
            write_like(writer, 5, 12, 2)
        assert reader.refresh().commit_seq == 2
        assert reader.user_features(5).like.item_ids.tolist() == [11, 12]


@pytest.mark.parametrize("mode", ["secondary", "read_only"])
def test_refresh_of_a_removed_store_raises_store_not_found(store_path, mode):
    with FeatureReader(store_path, mode=mode) as reader:
        for f in store_path.iterdir():
            f.unlink()
        store_path.rmdir()
        with pytest.raises(StoreNotFoundError):
            reader.refresh()
        assert not store_path.exists()


def test_a_read_only_reopen_that_fails_is_a_feature_store_error_and_keeps_the_old_handle(store_path):
    current = store_path / "CURRENT"
    good = current.read_bytes()
    with FeatureReader(store_path, mode="read_only") as reader:
        current.write_bytes(b"garbage")  # no trailing newline: RocksDB refuses it
        with pytest.raises(FeatureStoreError, match=f"cannot open the feature store at path={store_path}: "
                                                    "Corruption"):
            reader.refresh()
        assert reader.committed_offset("feedback", 0) == 1
        current.write_bytes(good)
        assert reader.refresh().commit_seq == 1


@pytest.mark.parametrize("mode", ["secondary", "read_only"])
def test_a_store_that_does_not_open_is_a_feature_store_error_and_leaks_no_secondary_dir(tmp_path, monkeypatch,
                                                                                         mode):
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))  # where the reader's own secondary dir goes
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "CURRENT").write_bytes(b"garbage")
    with pytest.raises(FeatureStoreError, match=f"cannot open the feature store at path={broken}"):
        FeatureReader(broken, mode=mode)
    assert list(temp_root.iterdir()) == []


def test_has_user_sees_sequences_and_counters_alone(store_path):
    with RocksFeatureStore(store_path) as writer:
        with writer.transaction() as tx:
            tx.add_user_event(6, CounterKind.IMPRESSION, ts_ms=2_000)  # label window still open
            assert tx.has_user(6)                                     # staged rows count too
        with FeatureReader(store_path) as reader:
            assert [reader.has_user(u) for u in (5, 6, 7)] == [True, True, False]
            assert writer.has_user(6) and not writer.has_user(7)


def test_the_store_records_its_layout_and_refuses_another(tmp_path):
    """Counters bucketed by the hour, read with minute buckets, were silently zero: the store now
    records its layout, a reader without a config takes it, and other layouts are refused."""
    from rocksdict import Rdict

    from featurestore import CounterConfig, FeatureStoreConfig, LayoutMismatchError
    from featurestore import keys as fs_keys

    path, hour = tmp_path / "s", FeatureStoreConfig()
    minute = FeatureStoreConfig(counters=CounterConfig(bucket_ms=60_000))
    with RocksFeatureStore(path, hour) as writer:
        with writer.transaction() as tx:
            for i in range(5):
                tx.add_user_event(9, CounterKind.CLICK, ts_ms=3_600_000 + i)
            tx.set_offset("clicks", 0, 5)
        assert writer.clear() > 0 and writer.commit_info() is None       # the layout record stays
    with pytest.raises(LayoutMismatchError, match="was written with layout"):
        RocksFeatureStore(path, minute)
    with RocksFeatureStore(path, hour) as writer:
        with writer.transaction() as tx:
            for i in range(5):
                tx.add_user_event(9, CounterKind.CLICK, ts_ms=3_600_000 + i)
            tx.set_offset("clicks", 0, 5)
        with FeatureReader(path) as reader:                               # no config: the store's
            assert reader.config.counters.bucket_ms == 3_600_000
            assert reader.user_clicks_in_window(9, 3_600_010) == 5
        with pytest.raises(LayoutMismatchError, match="the reader's config has"):
            FeatureReader(path, minute)
    db = Rdict(str(path), hour.to_rocksdict_options(create=False))    # a store from before the record
    db.delete(fs_keys.meta_key(fs_keys.LAYOUT_META))
    db.close()
    with FeatureReader(path, minute) as reader:                           # nothing to check against
        assert reader.config.counters.bucket_ms == 60_000
    with RocksFeatureStore(path, hour):                                   # records it now
        pass
    with pytest.raises(LayoutMismatchError):
        RocksFeatureStore(path, minute)
