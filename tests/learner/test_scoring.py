"""Scoring: published versions load safely, follow the topic, and score with point-in-time features."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaProducer

from featurestore import FeatureReader, RocksFeatureStore, SequenceKind, UserFeatures
from featurestore.sequences import EMPTY_SLICE, SequenceSlice
from learner.batch import SEQUENCE_KINDS
from learner.checkpoint import CheckpointError, save_checkpoint
from learner.data import batch_from_columns, decode_columns
from learner.scoring import (ModelFollower, NoModelError, Scorer, ScoringError, ScoringService, candidate_batch,
                             checkpoint_seq_len)
from learner.trainer import Trainer, TrainerConfig
from learner.versions import TOPIC_MODEL_UPDATES, ModelVersion
from streams.samples import Sample, Snapshot, encode
from tests.learner.conftest import tiny_config
from tests.learner.test_data import make_samples

T = 8
USER = 7
ITEMS = [3, 50, 51, 299]
CATS = [3, 14, 4, 10]                      # (item * 7) % 17, the categories of make_samples
DURS = [0, 12_000, 45_000, 500_000]
CONTEXT = dict(user_group=7, age_group=0, item_categories=CATS, item_durations_ms=DURS)
T0 = 50_000                                # the scoring time of the point-in-time checks


def make_trainer(model="dumn", objective="bce"):
    cfg = TrainerConfig(model=model, objective=objective, device="cpu", window=100, seed=3)
    return Trainer(cfg, tiny_config(model, heads=cfg.heads))


def train(trainer, steps, seed):
    values = make_samples(32 * steps, seed=seed)
    for s in range(steps):
        trainer.train_batch(batch_from_columns(decode_columns(values[32 * s:32 * (s + 1)], seq_len=T)))


def write_history(store, ts_from, ts_to, n, item0=0):
    """n events per sequence kind between ts_from and ts_to (exclusive), items item0.."""
    with store.transaction() as tx:
        for j, ts in enumerate(np.linspace(ts_from, ts_to - 1, n).astype(int).tolist()):
            for k, kind in enumerate(SequenceKind):
                item = item0 + 17 * k + j
                tx.add_sequence_event(USER, kind, item_id=item, category=(item * 7) % 17, ts_ms=ts)
        tx.set_offset("clicks", 0, ts_to)


@pytest.fixture
def store(tmp_path):
    s = RocksFeatureStore(tmp_path / "fs")
    write_history(s, 1_000, T0, 11)        # 11 > T: the newest 8 are kept
    yield s
    s.close()


def training_layout_batch(view, item_ids, ts_ms):
    """The candidates as the training path builds them: the joiner's snapshot from the store, the
    sample codec, the sample decoder and the loader's column mapping."""
    uf = view.user_features(USER, ts_ms)
    parts, newest = {}, -1
    for kind in SEQUENCE_KINDS:
        sl = getattr(uf, kind)
        if len(sl):
            parts[f"{kind}_items"] = tuple(sl.item_ids[-100:].tolist())
            parts[f"{kind}_cats"] = tuple(sl.categories[-100:].tolist())
            newest = max(newest, int(sl.ts_ms[-1]))
    snap = Snapshot(**parts, newest_ts_ms=newest)
    ts = ts_ms if ts_ms is not None else newest + 1
    values = [encode(Sample(impression_id=900 + j, ts_ms=ts, user_id=USER, item_id=it, label_ts_ms=ts + 1,
                            activeness=7, age_group=0, item_duration_ms=d, item_category=c, user_group=7,
                            snapshot=snap))
              for j, (it, c, d) in enumerate(zip(item_ids, CATS, DURS))]
    return batch_from_columns(decode_columns(values, seq_len=T))


def own_forward(trainer, batch):
    trainer.model.eval()
    try:
        with torch.no_grad():
            out = trainer.model(batch, write_memory=False)
            return trainer.objective.score(out).numpy(), out
    finally:
        trainer.model.train()


def publish(bootstrap, *values, topic=TOPIC_MODEL_UPDATES):
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    try:
        for v in values:
            producer.send(topic, key=b"dumn", value=v)
        producer.flush(timeout=10)
    finally:
        producer.close()


def version(n, path, samples_seen=0):
    return ModelVersion(version=n, path=str(path), created_at_ms=1_700_000_000_000 + n, samples_seen=samples_seen,
                        model="dumn", metrics={"auc": 0.6})


@pytest.mark.parametrize("model,objective", [("dumn", "bce"), ("dumn", "mtl_clsd"), ("din", "mtl")])
def test_scores_equal_the_models_own_forward_on_the_training_layout(store, tmp_path, model, objective):
    trainer = make_trainer(model, objective)
    train(trainer, 3, seed=1)
    save_checkpoint(tmp_path / "c.pt", trainer.checkpoint_state())
    service = ScoringService(store, Scorer.from_checkpoint(tmp_path / "c.pt", seq_len=T))
    for ts_ms in (T0, 20_000, None):
        got = service.score(USER, ITEMS, ts_ms, **CONTEXT)
        batch = training_layout_batch(store, ITEMS, ts_ms)
        want, out = own_forward(trainer, batch)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.float32 and got.shape == (len(ITEMS),)
    assert batch.click_mask.sum(1).tolist() == [T] * len(ITEMS)       # truncated to the newest T
    if objective.startswith("mtl"):   # two towers: the served score is their sum, without p_local
        both = torch.sigmoid(out.logits["main"]) + torch.sigmoid(out.logits["weighted"])
        np.testing.assert_allclose(got, both.numpy(), rtol=1e-6)
    else:
        np.testing.assert_allclose(got, torch.sigmoid(out.logits["main"]).numpy(), rtol=1e-6)
    # the context reaches the model: other categories give other scores
    other = service.score(USER, ITEMS, T0, **{**CONTEXT, "item_categories": [0, 0, 0, 0]})
    assert not np.array_equal(other, service.score(USER, ITEMS, T0, **CONTEXT))


def test_scoring_never_writes_dumn_memory(store, tmp_path):
    trainer = make_trainer()
    train(trainer, 2, seed=2)
    state = trainer.checkpoint_state()
    scorer = Scorer.from_state(state, seq_len=T)
    before = scorer.model.memory.memory.clone()
    assert torch.equal(before, state["model"]["memory.memory"])
    service = ScoringService(store, scorer)
    first = service.score(USER, ITEMS, T0)
    for _ in range(3):
        np.testing.assert_array_equal(service.score(USER, ITEMS, T0), first)
    assert torch.equal(scorer.model.memory.memory, before)
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())


def test_point_in_time_later_events_do_not_change_the_score(store, tmp_path):
    trainer = make_trainer()
    train(trainer, 2, seed=4)
    reader = FeatureReader(store.path)
    try:
        service = ScoringService(reader, Scorer.from_state(trainer.checkpoint_state(), seq_len=T),
                                 refresh_interval_s=0.0)
        at_t0 = service.score(USER, ITEMS, T0, **CONTEXT)
        latest = service.score(USER, ITEMS, None, **CONTEXT)
        np.testing.assert_array_equal(at_t0, latest)               # nothing after T0 exists yet
        write_history(store, T0, T0 + 10_000, 5, item0=200)        # events at T0 (excluded) and after
        np.testing.assert_array_equal(service.score(USER, ITEMS, T0, **CONTEXT), at_t0)
        assert not np.array_equal(service.score(USER, ITEMS, None, **CONTEXT), at_t0)  # the reader refreshed
        assert reader.user_features(USER, T0 + 1).click.ts_ms[-1] == T0            # T0 itself is stored
    finally:
        reader.close()


def test_follower_takes_newest_switches_refuses_corrupt_and_skips_malformed(broker, store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="learner.scoring")
    trainer = make_trainer()
    train(trainer, 2, seed=5)
    save_checkpoint(tmp_path / "v1.pt", trainer.checkpoint_state())
    want1, _ = own_forward(trainer, training_layout_batch(store, ITEMS, T0))
    train(trainer, 2, seed=6)
    save_checkpoint(tmp_path / "v2.pt", trainer.checkpoint_state())
    want2, _ = own_forward(trainer, training_layout_batch(store, ITEMS, T0))
    assert not np.array_equal(want1, want2)

    publish(broker.bootstrap, version(1, tmp_path / "v1.pt", 64).encode())
    with ModelFollower(broker.bootstrap, seq_len=T) as follower:
        service = ScoringService(store, follower)
        assert follower.wait_ready(15)
        assert follower.current.version.version == 1
        res = service.score_request(USER, ITEMS, T0, **CONTEXT)
        np.testing.assert_array_equal(res.scores, want1)
        assert res.model["version"] == 1 and res.model["samples_seen"] == 64

        publish(broker.bootstrap, version(2, tmp_path / "v2.pt", 128).encode())
        assert follower.wait_for_version(2, 15)                    # switched
        np.testing.assert_array_equal(service.score(USER, ITEMS, T0, **CONTEXT), want2)

        data = bytearray((tmp_path / "v2.pt").read_bytes())
        data[-5] ^= 0xFF
        (tmp_path / "v3.pt").write_bytes(bytes(data))
        publish(broker.bootstrap, b"not json", b'{"version": 9, "path": ""}', version(3, tmp_path / "v3.pt").encode())
        assert follower.wait(lambda f: f.counters["refused"] == 1, 15)
        assert follower.counters["malformed"] == 2
        assert follower.current.version.version == 2               # the previous version keeps serving
        np.testing.assert_array_equal(service.score(USER, ITEMS, T0, **CONTEXT), want2)
        refused = [r.getMessage() for r in caplog.records if "model_version_refused" in r.getMessage()]
        assert len(refused) == 1 and "version=3" in refused[0] and "sha256 mismatch" in refused[0]
        assert "serving=2" in refused[0]

        shutil.copy(tmp_path / "v1.pt", tmp_path / "v4.pt")        # a good newer version still comes in
        publish(broker.bootstrap, version(4, tmp_path / "v4.pt").encode())
        assert follower.wait_for_version(4, 15)
        np.testing.assert_array_equal(service.score(USER, ITEMS, T0, **CONTEXT), want1)
        assert follower.counters == {"messages": 6, "malformed": 2, "refused": 1, "loaded": 3, "stale": 0}


def test_follower_starting_late_loads_only_the_newest_good_version(broker, store, tmp_path):
    trainer = make_trainer()
    train(trainer, 1, seed=7)
    save_checkpoint(tmp_path / "a.pt", trainer.checkpoint_state())
    (tmp_path / "broken.pt").write_bytes(b"SRLCKPT\x00 short")
    publish(broker.bootstrap, version(1, tmp_path / "a.pt").encode(), version(2, tmp_path / "a.pt").encode(),
            version(3, tmp_path / "broken.pt").encode(), version(4, tmp_path / "missing.pt").encode())
    with ModelFollower(broker.bootstrap, seq_len=T) as follower:
        assert follower.wait_ready(15)
        assert follower.current.version.version == 2               # 4 and 3 refused, 1 older than 2
        assert follower.counters == {"messages": 4, "malformed": 0, "refused": 2, "loaded": 1, "stale": 1}


def test_no_model_yet_and_bad_requests_are_refused(broker, store, tmp_path):
    trainer = make_trainer()
    state = trainer.checkpoint_state()
    save_checkpoint(tmp_path / "c.pt", state)
    with ModelFollower(broker.bootstrap, topic="versions-later", seq_len=T) as follower:
        assert not follower.wait_ready(1.0)                        # the topic does not exist yet
        with pytest.raises(NoModelError):
            ScoringService(store, follower).score(USER, ITEMS)
        publish(broker.bootstrap, version(5, tmp_path / "c.pt").encode(), topic="versions-later")
        assert follower.wait_for_version(5, 15)
    service = ScoringService(store, Scorer.from_state(state, seq_len=T))
    with pytest.raises(ScoringError, match="no candidate"):
        service.score(USER, [])
    with pytest.raises(ScoringError, match="4 items but 2 categories"):
        service.score(USER, ITEMS, item_categories=[1, 2])
    with pytest.raises(ScoringError, match="announces model 'din'"):
        Scorer.from_state(state, version=ModelVersion(version=1, path="x", created_at_ms=0, samples_seen=0,
                                                      model="din"))
    with pytest.raises(ScoringError, match="does not rebuild"):
        Scorer.from_state({**state, "model": {}})
    with pytest.raises(CheckpointError):
        Scorer.from_checkpoint(tmp_path / "nothing.pt")
    assert checkpoint_seq_len(state) is None and Scorer.from_state(state).seq_len == 100
    assert Scorer.from_state({**state, "seq_len": 12}).seq_len == 12


def test_candidate_batch_layout():
    sl = SequenceSlice(np.array([5, 6, 7], np.uint64), np.array([1, -1, 2], np.int32), np.array([1, 2, 3]))
    uf = UserFeatures(9, None, sl, EMPTY_SLICE, EMPTY_SLICE, EMPTY_SLICE, 0, 0)
    b = candidate_batch(uf, [1, 2], seq_len=2, item_durations_ms=[0, 8_000])
    b.validate()
    assert b.click_items.tolist() == [[6, 7], [6, 7]] and b.click_cats.tolist() == [[-1, 2], [-1, 2]]
    assert b.item_profile.tolist() == [[0], [2]] and b.user_profile.tolist() == [[-1], [-1]]
    assert b.item_category.tolist() == [-1, -1] and b.user_group.tolist() == [0, 0]
    b = candidate_batch(uf, [1], seq_len=4)                        # oldest first, zero padding at the end
    assert b.click_items.tolist() == [[5, 6, 7, 0]] and b.click_mask.tolist() == [[True, True, True, False]]
    assert b.like_mask.tolist() == [[False] * 4]


def run_cli(capsys, *argv):
    from streamrec.cli import main
    rc = main(["--log-level", "WARNING", "score", *argv])
    out = capsys.readouterr()
    return rc, [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err


def test_cli_scores_with_the_newest_version_and_with_a_checkpoint(broker, store, tmp_path, capsys):
    trainer = make_trainer()
    train(trainer, 1, seed=8)
    save_checkpoint(tmp_path / "v1.pt", trainer.checkpoint_state())
    train(trainer, 1, seed=9)
    save_checkpoint(tmp_path / "v2.pt", trainer.checkpoint_state())
    want2, _ = own_forward(trainer, training_layout_batch(store, ITEMS, T0))
    publish(broker.bootstrap, version(1, tmp_path / "v1.pt").encode(), version(2, tmp_path / "v2.pt").encode())
    store.close()                                                  # the command reads as a secondary
    common = ["--feature-store", str(tmp_path / "fs"), "--user-id", str(USER), "--items", ",".join(map(str, ITEMS)),
              "--categories", ",".join(map(str, CATS)), "--durations-ms", ",".join(map(str, DURS)),
              "--user-group", "7", "--age-group", "0", "--ts-ms", str(T0), "--seq-len", str(T)]
    rc, lines, err = run_cli(capsys, "--bootstrap", broker.bootstrap, "--wait-s", "15", *common)
    assert rc == 0, err
    (row,) = lines
    assert row["model"]["version"] == 2 and row["items"] == ITEMS and row["ts_ms"] == T0
    np.testing.assert_allclose(row["scores"], want2, rtol=1e-6)
    assert row["follower"]["loaded"] == 1

    rc, lines, err = run_cli(capsys, "--checkpoint", str(tmp_path / "v2.pt"), *common)
    assert rc == 0, err
    assert lines[0]["model"]["version"] is None and lines[0]["scores"] == row["scores"]

    # the joiner's data directory: one store per partition, the user's history in one of them
    with RocksFeatureStore(tmp_path / "joiner" / "stores" / "p0000") as other:
        with other.transaction() as tx:
            tx.add_sequence_event(USER + 1, SequenceKind.CLICK, item_id=1, category=7, ts_ms=1_000)
    shutil.copytree(tmp_path / "fs", tmp_path / "joiner" / "stores" / "p0001")
    data_dir = [*common]
    data_dir[1] = str(tmp_path / "joiner")
    rc, lines, err = run_cli(capsys, "--checkpoint", str(tmp_path / "v2.pt"), *data_dir)
    assert rc == 0, err
    assert lines[0]["scores"] == row["scores"]

    (tmp_path / "bad.pt").write_bytes(b"garbage")
    rc, lines, err = run_cli(capsys, "--checkpoint", str(tmp_path / "bad.pt"), *common)
    assert rc == 1 and not lines and "cannot load checkpoint" in err


def test_a_joiner_data_directory_answers_from_the_store_that_holds_the_user(tmp_path):
    """A user with counters only (its impressions' label windows still open) is answered by its own
    partition store, not by p0000, which knows someone else; an unknown user by p0000."""
    from featurestore import CounterKind, FeatureStoreConfig
    from streamrec.commands.score import open_features

    stores = tmp_path / "joiner" / "stores"
    with RocksFeatureStore(stores / "p0000") as p0, p0.transaction() as tx:
        tx.add_sequence_event(USER + 1, SequenceKind.CLICK, item_id=1, category=7, ts_ms=1_000)
    with RocksFeatureStore(stores / "p0001") as p1, p1.transaction() as tx:
        for ts in (1_000, 2_000, 3_000):
            tx.add_user_event(USER, CounterKind.IMPRESSION, ts_ms=ts)
    features = open_features(tmp_path / "joiner", FeatureStoreConfig())
    try:
        features.refresh()
        uf = features.user_features(USER, 3_500)
        assert (uf.impressions_in_window, uf.clicks_in_window) == (3, 0)
        assert features.user_features(USER + 1).click.item_ids.tolist() == [1]
        assert features.user_features(USER + 2).impressions_in_window == 0
    finally:
        features.close()


def test_a_partition_store_that_does_not_open_closes_the_readers_already_open(tmp_path, monkeypatch):
    import tempfile

    from featurestore import FeatureStoreConfig, FeatureStoreError
    from streamrec.commands.score import open_features

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))  # where each reader's secondary dir goes
    stores = tmp_path / "joiner" / "stores"
    RocksFeatureStore(stores / "p0000").close()
    (stores / "p0001").mkdir()
    (stores / "p0001" / "CURRENT").write_bytes(b"garbage")  # RocksDB refuses to open it
    with pytest.raises(FeatureStoreError, match="p0001"):
        open_features(tmp_path / "joiner", FeatureStoreConfig())
    assert list(temp_root.iterdir()) == []  # p0000's reader was closed, its secondary dir removed


def test_cli_follow_prints_a_line_per_new_version(broker, store, tmp_path):
    trainer = make_trainer()
    train(trainer, 1, seed=10)
    save_checkpoint(tmp_path / "v1.pt", trainer.checkpoint_state())
    train(trainer, 1, seed=11)
    save_checkpoint(tmp_path / "v2.pt", trainer.checkpoint_state())
    want2, _ = own_forward(trainer, training_layout_batch(store, ITEMS, T0))
    publish(broker.bootstrap, version(1, tmp_path / "v1.pt").encode())
    store.close()
    cmd = [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "score", "--bootstrap", broker.bootstrap,
           "--feature-store", str(tmp_path / "fs"), "--user-id", str(USER), "--items", ",".join(map(str, ITEMS)),
           "--categories", ",".join(map(str, CATS)), "--durations-ms", ",".join(map(str, DURS)),
           "--user-group", "7", "--age-group", "0", "--ts-ms", str(T0), "--seq-len", str(T),
           "--wait-s", "60", "--follow-s", "90"]
    # the process ends by itself within --wait-s + --follow-s, so a read never blocks for longer
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = json.loads(proc.stdout.readline())
        assert first["model"]["version"] == 1
        publish(broker.bootstrap, version(2, tmp_path / "v2.pt").encode())
        second = json.loads(proc.stdout.readline())              # printed when version 2 takes over
        assert second["model"]["version"] == 2
        np.testing.assert_allclose(second["scores"], want2, rtol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
