"""Samples file -> SampleBatch: column mapping, framing, order, rejects, resume offsets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.data import (DataConfig, SampleLoader, SamplesFileError, batch_from_columns, count_frames,
                          decode_columns, iter_frames, write_frames)
from streams.samples import Sample, Snapshot, encode


def make_samples(n: int, seed: int = 0, n_users: int = 40, n_items: int = 300, max_len: int = 12) -> list[bytes]:
    """``n`` encoded samples of a small learnable stream, in time order: a few categories are popular,
    users like a few more, clicks lean towards both, valid reads are a subset of clicks, snapshots are the user's past."""
    rng = np.random.default_rng(seed)
    item_cat = (np.arange(n_items) * 7) % 17
    fav = {u: set(rng.choice(17, 3, replace=False).tolist()) for u in range(n_users)}
    hist: dict[int, dict[str, list[int]]] = {u: {"click": [], "unclick": [], "like": [], "dislike": []}
                                             for u in range(n_users)}
    values = []
    for i in range(n):
        u = int(rng.integers(n_users))
        it = int(rng.integers(n_items))
        c = int(item_cat[it])
        p = 0.08 + 0.4 * (c < 6) + 0.4 * (c in fav[u])          # popular categories + own taste
        clicked = bool(rng.random() < p)
        valid = clicked and bool(rng.random() < 0.85)
        h = hist[u]
        snap_kw = {}
        for kind, seq in h.items():
            tail = seq[-max_len:]
            snap_kw[f"{kind}_items"] = tuple(tail)
            snap_kw[f"{kind}_cats"] = tuple(int(item_cat[x]) for x in tail)
        ts = 1_000_000 + 1000 * i
        newest = ts - 500 if any(h.values()) else -1
        s = Sample(impression_id=10_000 + i, ts_ms=ts, user_id=u, item_id=it, label_ts_ms=ts + 60_000,
                   activeness=u % 9, age_group=u % 7, item_duration_ms=int(rng.integers(0, 400_000)),
                   item_category=c, user_group=u % 9, clicked=clicked,
                   dwell_ms=int(rng.integers(1000, 90_000)) if clicked else -1, valid_read=valid,
                   ndt_weight=float(rng.random()) if valid else 0.0, liked=valid and rng.random() < 0.2,
                   snapshot=Snapshot(**snap_kw, newest_ts_ms=newest))
        values.append(encode(s))
        h["click" if clicked else "unclick"].append(it)
        if s.liked:
            h["like"].append(it)
        if not clicked and rng.random() < 0.05:
            h["dislike"].append(it)
    return values


def make_samples_file(path, n: int, seed: int = 0) -> list[bytes]:
    values = make_samples(n, seed)
    write_frames(path, values)
    return values


def test_column_mapping_matches_samples():
    values = make_samples(50, seed=1)
    batch = batch_from_columns(decode_columns(values, seq_len=8))
    batch.validate()
    from streams.samples import decode
    for row, v in enumerate(values):
        s = decode(v)
        assert batch.user_id[row] == s.user_id and batch.item_id[row] == s.item_id
        assert batch.item_category[row] == s.item_category and batch.user_group[row] == s.user_group
        assert batch.user_profile[row, 0] == s.age_group
        assert batch.sample_id[row] == s.impression_id
        assert batch.clicked[row] == float(s.clicked) and batch.valid_read[row] == float(s.valid_read)
        assert batch.ndt_weight[row] == pytest.approx(s.ndt_weight)
        for kind in ("click", "unclick", "like", "dislike"):
            items, cats, mask = batch.sequence(kind)
            want = list(getattr(s.snapshot, f"{kind}_items"))[-8:]
            want_c = list(getattr(s.snapshot, f"{kind}_cats"))[-8:]
            assert items[row][mask[row]].tolist() == want
            assert cats[row][mask[row]].tolist() == want_c
            assert int(mask[row].sum()) == len(want)


def test_duration_buckets_are_monotone():
    vals = []
    for i, d in enumerate([0, 1, 7_000, 7_001, 60_000, 1_000_000]):
        vals.append(encode(Sample(impression_id=i, ts_ms=10, user_id=1, item_id=2, label_ts_ms=20,
                                  item_duration_ms=d)))
    b = batch_from_columns(decode_columns(vals, seq_len=4)).item_profile[:, 0].tolist()
    assert b == sorted(b) and b[0] == 0 and b[1] == 1 and b[2] == 1 and b[3] == 2 and len(set(b)) == 5


def test_loader_reads_everything_in_order_with_offsets(tmp_path):
    path = tmp_path / "s.bin"
    values = make_samples_file(path, 103, seed=2)
    assert count_frames(path) == 103
    with SampleLoader(DataConfig(str(path), batch_size=16, seq_len=6)) as loader:
        got = list(loader)
    assert [g.batch.batch_size for g in got] == [16] * 6 + [7]
    ids = torch.cat([g.batch.sample_id for g in got]).tolist()
    assert ids == list(range(10_000, 10_103))
    # each batch's end offset resumes exactly at the next batch
    resumed = list(SampleLoader(DataConfig(str(path), batch_size=16, seq_len=6,
                                           start_offset_bytes=got[2].end_offset_bytes)))
    assert resumed[0].batch.sample_id[0].item() == 10_048
    assert torch.equal(resumed[0].batch.click_items, got[3].batch.click_items)
    assert got[-1].end_offset_bytes == path.stat().st_size
    assert sum(len(v) + 4 for v in values) == path.stat().st_size


def test_loader_max_samples_and_rejects(tmp_path):
    path = tmp_path / "s.bin"
    values = make_samples(20, seed=3)
    values[5] = values[5][:-8]                       # breaks the contract: wrong length
    write_frames(path, values)
    loader = SampleLoader(DataConfig(str(path), batch_size=8, seq_len=4, max_samples=12))
    got = list(loader)
    assert [g.n_messages for g in got] == [8, 4]
    assert [g.batch.batch_size for g in got] == [7, 4]
    assert loader.n_rejected == 1 and got[0].n_rejected == 1


def test_a_batch_of_rejects_only_is_yielded_empty_and_counted(tmp_path):
    """A stretch of corrupt frames as long as a batch: the loader yields that batch empty, so a run
    counts its messages and rejects and resumes past it (it used to be dropped, counts and all)."""
    from learner.trainer import Trainer, TrainerConfig
    from tests.learner.conftest import tiny_config

    path = tmp_path / "s.bin"
    values = make_samples(24, seed=5)
    for i in range(8, 16):
        values[i] = b"junk"
    write_frames(path, values)
    got = list(SampleLoader(DataConfig(str(path), batch_size=8, seq_len=4)))
    assert [(g.batch.batch_size, g.n_messages, g.n_rejected) for g in got] == [(8, 8, 0), (0, 8, 8), (8, 8, 0)]
    trainer = Trainer(TrainerConfig(model="din", device="cpu", window=50), tiny_config("din"))
    result = trainer.run(SampleLoader(DataConfig(str(path), batch_size=8, seq_len=4)))
    assert (result.samples_seen, result.steps, result.n_rejected) == (16, 2, 8)
    assert result.source_offsets == {"offset_bytes": path.stat().st_size, "messages": 24}


def test_truncated_file_raises_in_consumer(tmp_path):
    path = tmp_path / "s.bin"
    make_samples_file(path, 10, seed=4)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(SamplesFileError):
        list(SampleLoader(DataConfig(str(path), batch_size=4, seq_len=4)))
    with pytest.raises(SamplesFileError):
        list(iter_frames(path))


def test_missing_file_and_bad_config(tmp_path):
    with pytest.raises(SamplesFileError):
        SampleLoader(DataConfig(str(tmp_path / "nope.bin")))
    with pytest.raises(ValueError):
        DataConfig("x", batch_size=0)
