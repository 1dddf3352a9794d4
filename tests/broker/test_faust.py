"""A real faust-streaming worker (rocksdb table, changelog, consumer group) on the embedded broker.

The worker runs as a subprocess (``python -m faust -A <module> worker``) from an app module written
into ``tmp_path``; the test produces input with kafka-python, reads the output topic and the table's
changelog, then stops the worker with SIGTERM. A second worker run checks that the committed
offsets and the changelog carry over: it recovers the table and counts on from where the first
one stopped, without re-processing what was committed, after its local rocksdb state is wiped.

The app installs ``streams.faustfix`` (faust's recovery could lose or repeat input records
fetched while it sought to the committed offsets: faust-streaming issue #596).
``test_restart_with_a_backlog_loses_and_repeats_nothing`` widens that window on purpose: each
committed-offset request of the worker waits, and each event takes a while, so records of the
backlog are fetched while faust seeks. Without the fix that test lost or stalled records in each
of three runs; with it, none.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_ID = "clickcount"
N_PARTITIONS = 3

APP_SOURCE = textwrap.dedent(
    '''
    """Counts clicks per user in a rocksdb-backed table and emits the running count."""
    import os

    import asyncio

    import aiokafka
    import faust

    from streams import faustfix

    faustfix.install()

    COMMITTED_DELAY_S = float(os.environ.get("FAUST_TEST_COMMITTED_DELAY_S", "0"))
    EVENT_DELAY_S = float(os.environ.get("FAUST_TEST_EVENT_DELAY_S", "0"))
    if COMMITTED_DELAY_S:  # a slow broker: faust's seek to the committed offsets takes a while
        _committed = aiokafka.AIOKafkaConsumer.committed

        async def _slow_committed(self, tp):
            await asyncio.sleep(COMMITTED_DELAY_S)
            return await _committed(self, tp)

        aiokafka.AIOKafkaConsumer.committed = _slow_committed

    app = faust.App(
        "clickcount",
        broker="kafka://" + os.environ["FAUST_TEST_BOOTSTRAP"],
        store="rocksdb://",
        datadir=os.environ["FAUST_TEST_DATADIR"],
        web_enabled=False,
        topic_partitions=3,
        topic_replication_factor=1,
        broker_heartbeat_interval=0.2,
        broker_commit_interval=0.2,
        consumer_auto_offset_reset="earliest",
    )
    clicks = app.topic("clicks", key_serializer="raw", value_serializer="raw")
    click_counts = app.topic("click-counts", key_serializer="raw", value_serializer="raw")
    counts = app.Table("counts", default=int, partitions=3)


    @app.agent(clicks)
    async def count_clicks(stream):
        async for key, _value in stream.items():
            user = key.decode()
            counts[user] += 1
            if EVENT_DELAY_S:
                await asyncio.sleep(EVENT_DELAY_S)
            await click_counts.send(key=key, value=str(counts[user]).encode())
    '''
)


def wait_until(cond, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               extra=lambda: ""):
    """Poll ``cond``; on failure say what was awaited, ``extra()`` (state seen by a fresh client) and the log."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"faust worker exited rc={proc.returncode} while waiting for {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} {extra()}:\n{tail(log)}")
        time.sleep(0.05)


def tail(log: Path | None, n_chars: int = 6000) -> str:
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-n_chars:]


class TopicReader:
    """Reads a whole topic (all partitions, from the beginning) without a consumer group."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._consumer.assign([TopicPartition(topic, p) for p in range(N_PARTITIONS)])
        self._consumer.seek_to_beginning()
        self.records: list[tuple[bytes, bytes]] = []

    def poll(self) -> list[tuple[bytes, bytes]]:
        for recs in self._consumer.poll(timeout_ms=50).values():
            self.records.extend((r.key, r.value) for r in recs)
        return self.records

    def close(self) -> None:
        self._consumer.close()


def start_worker(tmp_path: Path, bootstrap: str, run: int, **env_extra: str) -> tuple[subprocess.Popen, Path]:
    app_dir = tmp_path / "app"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "clickcount_app.py").write_text(APP_SOURCE)
    env = dict(os.environ)
    env.update(
        FAUST_TEST_BOOTSTRAP=bootstrap,
        FAUST_TEST_DATADIR=str(tmp_path / "faust-data"),
        PYTHONUNBUFFERED="1",  # the log tail shown on a failure must be complete
        PYTHONPATH=os.pathsep.join([str(app_dir), str(REPO_ROOT)]),
        **env_extra,
    )
    log = tmp_path / f"worker-{run}.log"
    proc = subprocess.Popen(
        # --without-web: faust's worker command would otherwise serve on 0.0.0.0:6066
        [sys.executable, "-m", "faust", "-A", "clickcount_app", "worker", "--without-web", "-l", "info"],
        cwd=app_dir, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    return proc, log


def stop_worker(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM, then wait for a clean exit (checked by ``assert_clean_exit`` once the run's checks pass)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"faust worker did not stop on SIGTERM:\n{tail(log)}")


def assert_clean_exit(proc: subprocess.Popen, log: Path) -> None:
    assert proc.returncode == 0, f"faust worker exited rc={proc.returncode}:\n{tail(log)}"


def create_clicks_topic(bootstrap: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic("clicks", num_partitions=N_PARTITIONS, replication_factor=1)])
    admin.close()


def produce_clicks(bootstrap: str, users: list[str]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i, user in enumerate(users):
        producer.send("clicks", key=user.encode(), value=f"click-{i}".encode())
    producer.flush()
    producer.close()


def latest_by_key(records: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {k: v for k, v in records}  # per key all records sit in one partition, in order


@pytest.mark.timeout(480)  # the waits below add up to more than 240 s on a slow machine
def test_faust_agent_counts_into_table_and_output_topic(broker, tmp_path):
    bootstrap = broker.bootstrap
    create_clicks_topic(bootstrap)
    first = ["u1", "u2", "u1", "u3", "u1", "u2", "u4", "u5", "u5", "u1"]
    produce_clicks(bootstrap, first)
    expected = Counter(first)

    out = TopicReader(bootstrap, "click-counts")
    proc, log = start_worker(tmp_path, bootstrap, run=1)
    try:
        wait_until(lambda: len(out.poll()) >= len(first), 120, "the first run's output", proc, log)
        changelog = TopicReader(bootstrap, f"{APP_ID}-counts-changelog")
        wait_until(lambda: len(changelog.poll()) >= len(first), 30, "the table changelog", proc, log)
        # the worker is up: commits of what it processed land while it runs
        wait_until(lambda: sum(group_offsets(bootstrap).values()) >= len(first), 30, "committed offsets", proc, log)
    finally:
        stop_worker(proc, log)

    assert_clean_exit(proc, log)
    outputs = out.poll()
    assert len(outputs) == len(first)
    assert running_counts(outputs) == {u.encode(): list(range(1, n + 1)) for u, n in expected.items()}
    table = {json.loads(k): json.loads(v) for k, v in latest_by_key(changelog.poll()).items()}
    assert table == dict(expected)
    assert group_offsets(bootstrap) == committed_clicks_per_partition(bootstrap)

    # second run, local rocksdb state wiped: it must rebuild the table from the changelog topic and
    # resume the input from the group's committed offsets
    shutil.rmtree(tmp_path / "faust-data")
    second = ["u1", "u6", "u2"]
    produce_clicks(bootstrap, second)
    expected.update(second)
    out.close()
    out = TopicReader(bootstrap, "click-counts")  # a fresh reader: the whole topic again from the start
    proc, log = start_worker(tmp_path, bootstrap, run=2)
    try:
        wait_until(lambda: len(out.poll()) >= len(first) + len(second), 120, "the second run's output", proc, log,
                   extra=lambda: f"click-counts end offsets={topic_end_offsets(bootstrap, 'click-counts')} "
                                 f"clicks committed={group_offsets(bootstrap)}")
    finally:
        stop_worker(proc, log)
    assert_clean_exit(proc, log)
    new_outputs = out.poll()[len(first):]
    assert sorted((k.decode(), int(v)) for k, v in new_outputs) == [("u1", 5), ("u2", 3), ("u6", 1)]
    table = {json.loads(k): json.loads(v) for k, v in latest_by_key(changelog.poll()).items()}
    assert table == dict(expected)
    out.close()
    changelog.close()


@pytest.mark.timeout(480)  # the waits below add up to more than 240 s on a slow machine
def test_restart_with_a_backlog_loses_and_repeats_nothing(broker, tmp_path):
    """A worker restarts onto 150 waiting clicks while its seek to the committed offsets is slow."""
    bootstrap = broker.bootstrap
    create_clicks_topic(bootstrap)
    first = [f"u{i % 7}" for i in range(20)]
    produce_clicks(bootstrap, first)
    out = TopicReader(bootstrap, "click-counts")
    proc, log = start_worker(tmp_path, bootstrap, run=1)
    try:
        wait_until(lambda: len(out.poll()) >= len(first), 120, "the first run's output", proc, log)
        wait_until(lambda: sum(group_offsets(bootstrap).values()) >= len(first), 30, "committed offsets", proc, log)
    finally:
        stop_worker(proc, log)
    assert_clean_exit(proc, log)

    shutil.rmtree(tmp_path / "faust-data")
    backlog = [f"u{i % 11}" for i in range(150)]
    produce_clicks(bootstrap, backlog)
    total = len(first) + len(backlog)
    # 0.3 s per committed-offset request: faust's seek over the 7 assigned partitions takes ~2 s,
    # while the backlog's records are fetched; 20 ms per event keeps some of them queued
    proc, log = start_worker(tmp_path, bootstrap, run=2,
                             FAUST_TEST_COMMITTED_DELAY_S="0.3", FAUST_TEST_EVENT_DELAY_S="0.02")
    try:
        wait_until(lambda: len(out.poll()) >= total and sum(group_offsets(bootstrap).values()) >= total, 120,
                   "every click processed and committed", proc, log,
                   extra=lambda: f"outputs={len(out.records)} of {total} clicks committed={group_offsets(bootstrap)}")
    finally:
        stop_worker(proc, log)
    assert_clean_exit(proc, log)
    expected = Counter(first + backlog)
    assert running_counts(out.poll()) == {u.encode(): list(range(1, n + 1)) for u, n in expected.items()}
    assert group_offsets(bootstrap) == committed_clicks_per_partition(bootstrap)
    out.close()


def running_counts(outputs: list[tuple[bytes, bytes]]) -> dict[bytes, list[int]]:
    """Per user, the counts the agent emitted, in order."""
    per_user: dict[bytes, list[int]] = {}
    for key, value in outputs:
        per_user.setdefault(key, []).append(int(value))
    return per_user


def group_offsets(bootstrap: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        got = admin.list_group_offsets({APP_ID: None})[APP_ID]
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in got.items() if tp.topic == "clicks"}


def topic_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(N_PARTITIONS)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def committed_clicks_per_partition(bootstrap: str) -> dict[int, int]:
    """End offsets of the input topic: everything produced so far was processed and committed."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition("clicks", p) for p in range(N_PARTITIONS)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items() if off > 0}
    finally:
        consumer.close()
