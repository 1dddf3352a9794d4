"""Configs validate at construction and produce working rocksdict options."""
from __future__ import annotations

import dataclasses

import pytest
from rocksdict import Rdict

from featurestore import (CounterConfig, DwellStatsConfig, FeatureStoreConfig, SequenceConfig,
                          SketchConfig)


@pytest.mark.parametrize("make", [
    lambda: SequenceConfig(max_len=0), lambda: SequenceConfig(slack=-1),
    lambda: SequenceConfig(max_len=65_000, slack=1_000), lambda: CounterConfig(bucket_ms=0),
    lambda: CounterConfig(window_buckets=0), lambda: CounterConfig(late_buckets=-1),
    lambda: SketchConfig(k=4), lambda: SketchConfig(quantile=1.5),
    lambda: DwellStatsConfig(half_life_ms=0), lambda: DwellStatsConfig(min_dwell_ms=0),
    lambda: FeatureStoreConfig(compression="gzip"), lambda: FeatureStoreConfig(write_buffer_bytes=0),
])
def test_invalid_configs_raise(make):
    with pytest.raises(ValueError):
        make()


def test_frozen_and_serialisable():
    cfg = FeatureStoreConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sync_writes = True
    as_dict = dataclasses.asdict(cfg)
    assert as_dict["sequences"] == {"max_len": 100, "slack": 28}
    assert as_dict["dwell"]["half_life_ms"] == 7 * 86_400_000


def test_options_open_a_raw_mode_db(tmp_path):
    db = Rdict(str(tmp_path / "db"), FeatureStoreConfig(compression="zstd").to_rocksdict_options())
    db[b"k"] = b"v"
    assert db[b"k"] == b"v"
    db.close()
    assert FeatureStoreConfig(sync_writes=True).to_write_options().sync is True
