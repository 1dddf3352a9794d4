"""The continuous learner on the embedded broker over TCP: stream -> trainer -> checkpoints -> versions.

Real parts only: the broker, kafka-python clients, the tiny DUMN on CPU, checkpoints on tmp_path,
and ``python -m streamrec.cli learner`` subprocesses for kill -9 and SIGTERM.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from learner.checkpoint import CheckpointError, load_checkpoint
from learner.continuous import AuditLog, CheckpointStore, ContinuousLearner, LearnerConfig, VersionPublisher
from learner.prometheus import MetricsRegistry, MetricsServer, PrometheusConfig
from learner.stream import SampleStream, StreamConfig, from_source_offsets
from learner.trainer import Trainer, TrainerConfig
from learner.versions import TOPIC_MODEL_UPDATES, ModelVersion
from streams.samples import TOPIC_SAMPLES, Sample, Snapshot, encode
from tests.learner.conftest import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[2]
N_PARTITIONS = 3
SEQ_LEN = 5
TINY_TOML = """
[learner.stream]
seq_len = 5
heartbeat_interval_ms = 200
session_timeout_ms = 10000
rebalance_timeout_s = 8.0

[learner.trainer]
device = "cpu"
window = 200
cumulative_bins = 100

[learner.model]
n_slots = 8
slot_dim = 8
controller_dim = 16
mlp_dims = [16]
write_chunk = 5

[learner.model.embedding]
dim = 8
item_buckets = 512
category_buckets = 64
user_buckets = 256
profile_buckets = 64
"""


def wait_until(cond, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def make_sample(sample_id: int) -> Sample:
    user = sample_id % 17
    return Sample(impression_id=sample_id, ts_ms=10_000 + sample_id, user_id=user, item_id=(sample_id * 7) % 53,
                  label_ts_ms=20_000 + sample_id, clicked=sample_id % 3 == 0, item_category=sample_id % 5,
                  item_duration_ms=20_000, user_group=user % 3,
                  snapshot=Snapshot(click_items=(sample_id % 11, 4), click_cats=(1, 2), newest_ts_ms=9_000))


def create_topic(bootstrap: str, topic: str = TOPIC_SAMPLES) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=N_PARTITIONS, replication_factor=1)])
    finally:
        admin.close()


def produce(bootstrap: str, ids, bad: int = 0) -> None:
    """Samples ``ids`` keyed by user id, plus ``bad`` records that break the sample contract."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in ids:
        s = make_sample(i)
        producer.send(TOPIC_SAMPLES, key=str(s.user_id).encode(), value=encode(s))
    for j in range(bad):
        producer.send(TOPIC_SAMPLES, key=b"junk", value=b"not a sample %d" % j)
    producer.flush()
    producer.close()


def end_offsets(bootstrap: str) -> dict[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(TOPIC_SAMPLES, p) for p in range(N_PARTITIONS)]
        return {tp.partition: o for tp, o in c.end_offsets(tps).items()}
    finally:
        c.close()


def read_versions(bootstrap: str, expect_at_least: int) -> list[ModelVersion]:
    c = KafkaConsumer(TOPIC_MODEL_UPDATES, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      enable_auto_commit=False, consumer_timeout_ms=2000)
    got: list[ModelVersion] = []
    deadline = time.monotonic() + 20
    try:
        while len(got) < expect_at_least and time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=1000).values():
                got.extend(ModelVersion.decode(r.value) for r in recs)
    finally:
        c.close()
    return got


def audit_rows(path: Path) -> list[tuple[int, int, int]]:
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


def make_learner(bootstrap: str, tmp_path: Path, max_samples: int, group: str = "learners", **cfg_kw):
    trainer = Trainer(TrainerConfig(model="dumn", device="cpu", window=200, cumulative_bins=100), tiny_config("dumn"))
    stream = SampleStream(StreamConfig(bootstrap=bootstrap, group_id=group, batch_size=16, seq_len=SEQ_LEN,
                                       heartbeat_interval_ms=200, session_timeout_ms=10_000,
                                       rebalance_timeout_s=8.0))
    cfg = LearnerConfig(checkpoint_dir=str(tmp_path / "ckpt"), max_samples=max_samples,
                        audit_log=str(tmp_path / "audit.log"), **{"checkpoint_every_steps": 5, **cfg_kw})
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    learner = ContinuousLearner(cfg, trainer, stream, CheckpointStore(cfg.checkpoint_dir, cfg.keep_checkpoints),
                                publisher=VersionPublisher(producer), audit=AuditLog(cfg.audit_log),
                                registry=MetricsRegistry())
    return learner, producer


def run_bounded(learner: ContinuousLearner, timeout_s: float = 60.0) -> None:
    """learner.run on this thread; a timer stops it after ``timeout_s`` so a hang fails instead of blocking."""
    stop = threading.Event()
    timer = threading.Timer(timeout_s, stop.set)
    timer.start()
    try:
        learner.run(stop)
    finally:
        timer.cancel()
    assert not stop.is_set(), f"learner did not reach max_samples within {timeout_s}s"


def test_end_to_end_trains_every_sample_and_publishes_loadable_versions(broker, tmp_path):
    bootstrap, n = broker.bootstrap, 300
    create_topic(bootstrap)
    produce(bootstrap, range(1, n + 1), bad=3)
    learner, producer = make_learner(bootstrap, tmp_path, max_samples=n)
    try:
        assert learner.restore() == 0
        run_bounded(learner)
    finally:
        producer.close()
    t = learner.trainer
    assert t.samples_seen == n and t.n_rejected == 3
    assert learner.offsets == end_offsets(bootstrap)               # every record consumed, bad ones too
    rows = audit_rows(tmp_path / "audit.log")
    assert sorted(r[2] for r in rows) == list(range(1, n + 1))      # each sample trained once
    assert len({(p, o) for p, o, _ in rows}) == n
    versions = read_versions(bootstrap, expect_at_least=learner.stats.n_versions)
    assert len(versions) == learner.stats.n_versions >= 2
    assert [v.version for v in versions] == sorted(v.version for v in versions)
    newest = versions[-1]
    assert newest.samples_seen == n and newest.model == "dumn"
    assert from_source_offsets(TOPIC_SAMPLES, newest.source_offsets) == learner.offsets
    state = load_checkpoint(newest.path)                              # verified, torch.load(weights_only=True)
    assert state["samples_seen"] == n and state["learner"]["version"] == newest.version
    assert state["seq_len"] == learner.stream.cfg.seq_len                # what a scorer builds its batches with
    fresh = Trainer(learner.trainer.cfg, tiny_config("dumn"))
    fresh.load_checkpoint_state(state)
    for name, tensor in fresh.model.state_dict().items():
        assert torch.equal(tensor, t.model.state_dict()[name]), name
    # the group's offsets follow the durable checkpoint
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        committed = {tp.partition: m.offset for tp, m in admin.list_group_offsets({"learners": None})["learners"].items()}
    finally:
        admin.close()
    assert committed == learner.offsets
    # the live view, scraped over HTTP from the registry the learner filled
    with MetricsServer(PrometheusConfig(), learner.registry) as server:
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            body = resp.read().decode()
    assert f"streamrec_learner_samples_total {n}" in body.splitlines()
    assert f"streamrec_learner_model_version {newest.version}" in body.splitlines()
    for p in range(N_PARTITIONS):
        assert f'streamrec_learner_consumer_lag{{partition="{p}",topic="samples"}} 0' in body.splitlines()


def test_restart_resumes_at_checkpoint_offsets_and_refuses_a_damaged_newest_checkpoint(broker, tmp_path, caplog):
    bootstrap = broker.bootstrap
    create_topic(bootstrap)
    produce(bootstrap, range(1, 161))
    first, producer = make_learner(bootstrap, tmp_path, max_samples=160, checkpoint_every_steps=2)
    try:
        first.restore()
        run_bounded(first)
    finally:
        producer.close()
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    kept = store.versions()
    assert len(kept) == 3
    newest, previous = store.path(kept[-1]), store.path(kept[-2])
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])                       # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(newest)
    prev_state = load_checkpoint(previous)
    prev_offsets = from_source_offsets(TOPIC_SAMPLES, prev_state["source_offsets"])
    assert prev_state["samples_seen"] < 160

    produce(bootstrap, range(161, 201))
    second, producer = make_learner(bootstrap, tmp_path, max_samples=200, checkpoint_every_steps=2)
    try:
        with caplog.at_level("ERROR", logger="learner.checkpoint_store"):
            assert second.restore() == kept[-2]
        assert any("checkpoint refused" in r.message and "truncated" in r.message for r in caplog.records)
        assert second.offsets == prev_offsets and second.trainer.samples_seen == prev_state["samples_seen"]
        run_bounded(second)
    finally:
        producer.close()
    # the samples of the refused checkpoint were trained again inside the restored lineage, once
    rows = audit_rows(tmp_path / "audit.log")
    assert sorted(r[2] for r in rows) == list(range(1, 201))
    assert second.trainer.samples_seen == 200
    assert min(store.versions()) > kept[-1] - 3 and max(store.versions()) > kept[-1]   # numbers never reused

    # every checkpoint corrupt: refused, no silent start from scratch
    for v in store.versions():
        p = store.path(v)
        raw = bytearray(p.read_bytes())
        raw[-5] ^= 0xFF
        p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        store.load_newest()


def test_rebalance_checkpoints_before_revoke_and_the_new_member_starts_there(broker, tmp_path):
    """A plain consumer joins the learner's group: the learner checkpoints and commits before giving
    partitions up; the joiner reads from there. Learner's trained + joiner's read = every sample, once."""
    bootstrap, n = broker.bootstrap, 240
    create_topic(bootstrap)
    produce(bootstrap, range(1, n + 1))
    learner, producer = make_learner(bootstrap, tmp_path, max_samples=0, checkpoint_every_steps=0,
                                     checkpoint_every_s=3600)
    stop = threading.Event()
    learner.restore()
    thread = threading.Thread(target=learner.run, args=(stop,), daemon=True)
    thread.start()
    other_ids: list[int] = []
    try:
        wait_until(lambda: learner.trainer.samples_seen == n, what="the learner to train the first samples")
        assert learner.stats.version == 0                              # no checkpoint yet (time policy: 1 h)
        # "earliest": had the learner not committed before giving its partitions up, the new member
        # would read them again from offset 0 and the ids below would repeat
        other = KafkaConsumer(TOPIC_SAMPLES, bootstrap_servers=bootstrap, group_id="learners",
                              auto_offset_reset="earliest", enable_auto_commit=False, heartbeat_interval_ms=200,
                              session_timeout_ms=10_000)

        def poll_other() -> None:
            # longer than a rebalance with its checkpoint (see tests/broker/test_group_clients.py)
            for recs in other.poll(timeout_ms=5000).values():
                other_ids.extend(int.from_bytes(r.value[8:16], "little") for r in recs)   # impression_id

        try:
            wait_until(lambda: (poll_other() or True) and bool(other.assignment()), timeout_s=40,
                       what="the second member to get partitions")
            assert learner.stats.version == 1                          # the rebalance checkpoint
            wait_until(lambda: learner.stream.assignment() | {tp.partition for tp in other.assignment()}
                       == set(range(N_PARTITIONS)) and not learner.stream.assignment() & {
                           tp.partition for tp in other.assignment()}, what="the partitions to be split")
            produce(bootstrap, range(n + 1, n + 121))

            def drained() -> bool:
                poll_other()
                return sum(end_offsets(bootstrap).values()) <= learner.trainer.samples_seen + len(other_ids)

            wait_until(drained, timeout_s=40, what="both members to consume everything")
        finally:
            other.close()
    finally:
        stop.set()
        thread.join(timeout=60)
        producer.close()
    assert not thread.is_alive(), "the learner did not stop within 60 s"
    trained = [r[2] for r in audit_rows(tmp_path / "audit.log")]
    assert sorted(trained + other_ids) == list(range(1, n + 121))
    state = load_checkpoint(CheckpointStore(tmp_path / "ckpt").path(1))
    assert state["learner"]["reason"] == "rebalance" and state["samples_seen"] == n


def _cli(bootstrap: str, tmp_path: Path, log: Path, *extra: str) -> subprocess.Popen:
    """The learner command; its output goes to ``log`` (a pipe nobody reads while it runs could fill
    up and stall it)."""
    cfg = tmp_path / "learner.toml"
    cfg.write_text(TINY_TOML)
    cmd = [sys.executable, "-m", "streamrec.cli", "--config", str(cfg), "learner", "--bootstrap", bootstrap,
           "--group", "cli-learners", "--checkpoint-dir", str(tmp_path / "ckpt"), "--batch-size", "16",
           "--audit-log", str(tmp_path / "audit.log"), "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _n_audit(tmp_path: Path) -> int:
    p = tmp_path / "audit.log"
    return len(p.read_text().splitlines()) if p.exists() else 0


def test_kill_9_restart_then_sigterm_trains_every_sample_exactly_once(broker, tmp_path):
    bootstrap = broker.bootstrap
    create_topic(bootstrap)
    produce(bootstrap, range(1, 401))
    proc = _cli(bootstrap, tmp_path, tmp_path / "learner-1.log", "--checkpoint-every-steps", "3")
    try:
        wait_until(lambda: _n_audit(tmp_path) >= 100 and CheckpointStore(tmp_path / "ckpt").versions(), timeout_s=120,
                   what="the learner to train and checkpoint")
        proc.kill()                                                    # SIGKILL: no final checkpoint
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    produce(bootstrap, range(401, 601))
    # no periodic checkpoint after the restart: only SIGTERM's final checkpoint can hold the tail
    proc = _cli(bootstrap, tmp_path, tmp_path / "learner-2.log", "--checkpoint-every-steps", "0",
                "--checkpoint-every-s", "3600")
    try:
        # the dead member's 10 s session runs out first, then torch starts up
        wait_until(lambda: _n_audit(tmp_path) >= 600, timeout_s=150, what="the restarted learner to catch up")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "learner-2.log").read_text()
    assert proc.returncode == 0, out
    assert "signal received signal=SIGTERM" in out and "samples=600" in out
    ids = [r[2] for r in audit_rows(tmp_path / "audit.log")]
    assert len(ids) == 600 and Counter(ids).most_common(1)[0][1] == 1 and set(ids) == set(range(1, 601))
    store = CheckpointStore(tmp_path / "ckpt")
    _, _, state = store.load_newest()
    assert state["learner"]["reason"] == "final" and state["samples_seen"] == 600
    assert from_source_offsets(TOPIC_SAMPLES, state["source_offsets"]) == end_offsets(bootstrap)


def test_configs_refuse_settings_that_break_the_protocol(tmp_path):
    with pytest.raises(ValueError, match="poll_timeout_ms=500 < 1000"):
        StreamConfig(bootstrap="127.0.0.1:9092", poll_timeout_ms=500)
    with pytest.raises(ValueError, match="rebalance_timeout_s=30.0 must be > 0 and below session_timeout_ms=10000"):
        StreamConfig(bootstrap="127.0.0.1:9092", session_timeout_ms=10_000, rebalance_timeout_s=30.0)
    with pytest.raises(ValueError, match="no checkpoint would be cut"):
        LearnerConfig(checkpoint_dir=str(tmp_path), checkpoint_every_steps=0, checkpoint_every_s=0)
    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        LearnerConfig(checkpoint_dir=str(tmp_path), keep_checkpoints=0)


def test_compiled_crc32c_gives_kafka_python_the_same_checksums():
    import kafka.record._crc32c as pure
    import kafka.record.default_records as default_records

    from learner.stream import use_compiled_crc32c

    assert use_compiled_crc32c()
    data = os.urandom(4096)
    assert default_records.calc_crc32c(memoryview(data)) == pure.crc(data)
    assert default_records.calc_crc32c(memoryview(b"123456789")) == 0xE3069283


def test_no_checkpoint_moves_past_dead_letters_that_did_not_land(broker, tmp_path):
    """Dead letters are flushed before the checkpoint that moves the offsets past their records is
    saved: when the flush fails, no checkpoint is written (a restart re-reads and re-routes them)."""
    from streams.dlq import DeadLetterError

    class FailingRouter:
        def flush(self, timeout_s=None):
            raise DeadLetterError("1 of 1 dead letters were not acknowledged")

    create_topic(broker.bootstrap)
    learner, producer = make_learner(broker.bootstrap, tmp_path, max_samples=10)
    try:
        assert learner.restore() == 0
        learner.stream.router = FailingRouter()
        with pytest.raises(DeadLetterError):
            learner.checkpoint("test", wait=True)
        assert learner.store.versions() == []
        learner.stream.router = None
        learner.checkpoint("test", wait=True)
        assert len(learner.store.versions()) == 1
    finally:
        producer.close()


def test_a_missing_topic_is_waited_for_not_created(broker, caplog):
    """A mistyped topic must not be auto-created by the learner's subscription (and then waited on
    forever in silence): the stream warns and subscribes once the topic exists."""
    stream = SampleStream(StreamConfig(bootstrap=broker.bootstrap, topic=TOPIC_SAMPLES, seq_len=SEQ_LEN))
    with caplog.at_level("WARNING", logger="learner.stream"):
        stream.start()
        try:
            wait_until(lambda: "is not on the cluster" in caplog.text, 20, "the missing-topic warning")
            time.sleep(2.5)                              # a few more checks
            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
            try:
                assert TOPIC_SAMPLES not in admin.list_topics()
            finally:
                admin.close()
            create_topic(broker.bootstrap)
            produce(broker.bootstrap, range(10))
            got = 0
            deadline = time.monotonic() + 30
            while got < 10 and time.monotonic() < deadline:
                item = stream.get(0.5)
                if item is not None and hasattr(item, "reply"):
                    item.reply({})
                elif item is not None:
                    got += len(item.offsets)
            assert got == 10
        finally:
            stream.close()


def test_a_partition_idle_since_the_start_is_checkpointed_at_its_committed_offset(broker, tmp_path):
    """No checkpoint: partitions start at the group's committed offsets. One that delivers nothing
    before the first checkpoint must still be in it, or a restart would read it from the beginning."""
    bootstrap = broker.bootstrap
    create_topic(bootstrap)
    produce(bootstrap, range(1, 61))
    ends = end_offsets(bootstrap)
    assert all(ends.values())
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id="learners", enable_auto_commit=False)
    try:   # the group has trained everything so far (its checkpoints were moved away since)
        c.commit({TopicPartition(TOPIC_SAMPLES, p): OffsetAndMetadata(o, "", -1) for p, o in ends.items()})
    finally:
        c.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(100, 132):                       # new samples in partitions 0 and 1 only
        producer.send(TOPIC_SAMPLES, value=encode(make_sample(i)), partition=i % 2)
    producer.flush()
    producer.close()
    learner, out = make_learner(bootstrap, tmp_path, max_samples=32)
    try:
        assert learner.restore() == 0
        run_bounded(learner)
    finally:
        out.close()
    _, _, state = CheckpointStore(tmp_path / "ckpt").load_newest()
    assert from_source_offsets(TOPIC_SAMPLES, state["source_offsets"]) == {0: ends[0] + 16, 1: ends[1] + 16,
                                                                           2: ends[2]}


def test_a_fresh_model_numbers_its_versions_above_the_announced_ones(broker, tmp_path):
    """Checkpoints moved away: the new model's versions must still be newer than what the servers
    follow (they take no version at or below the one they serve)."""
    from learner.versions import newest_announced

    bootstrap = broker.bootstrap
    assert newest_announced(bootstrap, "dumn") == 0                        # no topic yet
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for v, model in ((3, "dumn"), (7, "dumn"), (12, "din"), (5, "dumn")):
        mv = ModelVersion(version=v, path=f"/old/{v}.pt", created_at_ms=1, samples_seen=v, model=model)
        producer.send(TOPIC_MODEL_UPDATES, key=model.encode(), value=mv.encode())
    producer.send(TOPIC_MODEL_UPDATES, key=b"dumn", value=b"{not json")
    producer.flush()
    producer.close()
    assert (newest_announced(bootstrap, "dumn"), newest_announced(bootstrap, "din")) == (7, 12)
    create_topic(bootstrap)
    produce(bootstrap, range(1, 33))
    learner, out = make_learner(bootstrap, tmp_path, max_samples=32)
    try:
        learner.version_floor = newest_announced(bootstrap, learner.model_name)
        assert learner.restore() == 0
        run_bounded(learner)
    finally:
        out.close()
    versions = CheckpointStore(tmp_path / "ckpt").versions()
    assert versions[0] == 8 and newest_announced(bootstrap, "dumn") == versions[-1]
