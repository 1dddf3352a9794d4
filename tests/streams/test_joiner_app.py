"""The faust joiner on the embedded broker: the bundled slice replayed into three partitions, one
worker subprocess (``python -m streamrec.commands.joiner``), the ``samples`` topic read back.

* exactly one sample per impression, equal to the offline builder's with three partitions byte for
  byte, except the T1/T3 bits of samples judged on shared statistics that had not all arrived
  (``shared_oracle.check_within_bound``: each such difference is explained by the contributions
  the sample's header names); garbage on ``clicks`` lands in ``clicks.dlq`` with its reason and is
  counted (web /counters and the printed summary); a click for an emitted impression goes to
  ``clicks.late``, a click for an impression that never comes to ``joiner.orphans``;
* a worker killed with SIGKILL mid-stream and restarted emits no duplicate and misses nothing;
* one worker and two workers on the same input give the same samples, up to that bound, and the
  shared statistics are used (the samples differ from per-partition statistics).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams.broker import EmbeddedBroker
from streams.broker.config import BrokerConfig
from streams.contracts import EVENT_TOPICS, Click, Impression, encode, key_for
from streams.joiner.app import free_port
from streams.joiner.pipeline import PipelineConfig
from streams.joiner.worker import build_samples, shared_contributions
from streams.replay import ReplayConfig, iter_events, run_replay
from streams.samples import decode
from streams.samples_file import read_samples
from tests.streams.shared_oracle import SharedStatsOracle, check_within_bound

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"
N_PARTITIONS = 3
UNTIL = "2022-04-25T12:00:00Z"  # about 15k events, 8k impressions: keeps each test short


def wait_until(cond, timeout_s: float, what: str, procs=()):
    deadline = time.monotonic() + timeout_s
    while not cond():
        for proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited rc={proc.returncode} while waiting for {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n"
                                 + "\n".join(tail(log) for _, log in procs))
        time.sleep(0.1)


def tail(log: Path, n: int = 5000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


class TopicReader:
    """Every record of a topic (all partitions, from the beginning), no consumer group."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.consumer.assign([TopicPartition(topic, p) for p in range(N_PARTITIONS)])
        self.consumer.seek_to_beginning()
        self.records = []

    def poll(self):
        for recs in self.consumer.poll(timeout_ms=100).values():
            self.records.extend(recs)
        return self.records

    def values(self):
        return [r.value for r in self.poll()]

    def close(self):
        self.consumer.close()


def start_worker(bootstrap: str, data_dir: Path, log: Path, web_port: int | None = None, batch_max: int = 10_000,
                 delivery: str = "batch"):
    cmd = [sys.executable, "-m", "streamrec.commands.joiner", "--bootstrap", bootstrap, "--data-dir", str(data_dir),
           "--idle-flush-s", "2", "--batch-max", str(batch_max), "--session-timeout-s", "6", "--delivery", delivery]
    if web_port is not None:
        cmd += ["--web-port", str(web_port)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return proc, log


def stop_worker(proc, log) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"worker ignored SIGTERM:\n{tail(log)}")


def replay(bootstrap: str, tmp_path: Path) -> list:
    run_replay(ReplayConfig(paths=(SLICE,), bootstrap=bootstrap, partitions=N_PARTITIONS, until_ms=UNTIL,
                            state_path=tmp_path / "replay-state.json", progress=False))
    return list(iter_events([SLICE], until_ms=UNTIL))


def produce(bootstrap: str, items) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for topic, key, value in items:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def offline(events, tmp_path: Path, name: str, config: PipelineConfig | None = None) -> dict[int, bytes]:
    """The offline builder's samples (all shared contributions of earlier epochs) by impression id."""
    build_samples(events, tmp_path / f"{name}.bin", tmp_path / f"{name}-work", config or PipelineConfig(),
                  n_partitions=N_PARTITIONS)
    return {decode(v).impression_id: v for v in read_samples(tmp_path / f"{name}.bin")}


def oracle(events) -> SharedStatsOracle:
    return SharedStatsOracle(shared_contributions(events, PipelineConfig(), N_PARTITIONS), PipelineConfig())


def check_samples(records, expected: dict[int, bytes], events):
    """One sample per impression, each the offline one or explained by its stats header."""
    ids = [decode(r.value).impression_id for r in records]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate samples"
    assert set(ids) == expected.keys()
    return check_within_bound(records, expected, oracle(events))


@pytest.mark.timeout(200)
def test_worker_emits_the_offline_samples_routes_bad_late_orphan_and_rebuilds_lost_state(broker, tmp_path):
    events = replay(broker.bootstrap, tmp_path)
    imps = [e for e in events if type(e) is Impression]
    t_max = events[-1].ts_ms
    # an impression closed (30 min) but still remembered (1 h) when t_max arrives: its new click is late
    target = next(i for i in reversed(imps) if i.ts_ms + 30 * 60_000 + 60_000 < t_max - 10_000)
    late = Click(event_id=2**62 + 1, ts_ms=t_max, impression_id=target.impression_id,
                 user_id=target.user_id, item_id=target.item_id)
    orphan = Click(event_id=2**62 + 2, ts_ms=t_max, impression_id=12345, user_id=target.user_id, item_id=1)
    produce(broker.bootstrap, [("clicks", b"712", b"junk"), ("clicks", key_for(late), encode(late)),
                               ("clicks", key_for(orphan), encode(orphan))])
    expected = offline(events + [late, orphan], tmp_path, "offline")
    assert len(expected) == len(imps)

    samples, dlq = TopicReader(broker.bootstrap, "samples"), TopicReader(broker.bootstrap, "clicks.dlq")
    lates, orphans = TopicReader(broker.bootstrap, "clicks.late"), TopicReader(broker.bootstrap, "joiner.orphans")
    port = free_port("127.0.0.1")
    proc, log = start_worker(broker.bootstrap, tmp_path / "joiner", tmp_path / "worker.log", web_port=port)
    try:
        wait_until(lambda: len(samples.values()) >= len(imps) and orphans.values(), 90, "every sample", [(proc, log)])
        counters = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/counters", timeout=10).read())
        progress = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=10).read())
    finally:
        stop_worker(proc, log)
    assert proc.returncode == 0, tail(log)
    report = check_samples(samples.poll(), expected, events + [late, orphan])
    assert report.n_equal > len(imps) // 2, report

    for reader in (dlq, lates, orphans):
        wait_until(lambda: reader.poll(), 20, "the routed message")
    (dead,) = dlq.poll()
    headers = dict(dead.headers)
    assert dead.value == b"junk" and headers["reason"].startswith(b"bad_magic")
    assert [decode_event(r.value) for r in lates.poll()] == [late]
    assert dict(lates.records[0].headers)["reason"] == b"after_emit"
    assert [decode_event(r.value) for r in orphans.poll()] == [orphan]
    total = counters["total"]
    assert (total["samples"], total["dead_letter"], total["dead_letter.clicks.bad_magic"]) == (len(imps), 1, 1)
    assert (total["late"], total["orphan"], total["pending"]) == (1, 1, 0)
    assert set(counters["partitions"]) == {"0", "1", "2"}
    # /progress: per partition, its events count after each commit, non-decreasing in time, and
    # the last of each is the partition's count
    steps = progress["steps"]
    assert steps and all(t <= progress["monotonic_s"] for t, _, _ in steps)
    assert [t for t, _, _ in steps] == sorted(t for t, _, _ in steps)
    last = {}
    for _, p, n in steps:
        assert n >= last.get(p, 0)
        last[p] = n
    assert {str(p): n for p, n in last.items()} == {p: c["events"] for p, c in counters["partitions"].items()}
    assert f"samples={len(imps)}" in tail(log) and "dead_letter=1" in tail(log)

    # the stores are lost (a partition moved to a host without them): the worker restores them
    # from the changelog, to where they were; nothing is read again and nothing emitted again
    shutil.rmtree(tmp_path / "joiner" / "stores")
    proc, log = start_worker(broker.bootstrap, tmp_path / "joiner", tmp_path / "worker-rebuild.log", web_port=port)
    try:
        wait_until(lambda: counters_of(port).get("samples", 0) >= len(imps), 90, "the rebuild", [(proc, log)])
        rebuilt = read_counters(port)
        time.sleep(1)  # a duplicate would be produced before the counters move
    finally:
        stop_worker(proc, log)
    assert (rebuilt["samples"], rebuilt["late"], rebuilt["orphan"], rebuilt["dead_letter"]) == (len(imps), 1, 1, 1)
    assert rebuilt["restored_from_changelog"] == N_PARTITIONS
    opened = [line for line in log.read_text(errors="replace").splitlines() if "partition_assigned" in line]
    # every partition opened (more than once only if a missed session under load rebalanced the group)
    assert {partition_of(line) for line in opened} == set(range(N_PARTITIONS))
    assert not any("'impressions': 0," in line for line in opened), opened
    assert len(samples.poll()) == len(imps)  # nothing emitted twice
    assert len(dlq.poll()) == len(lates.poll()) == len(orphans.poll()) == 1
    for r in (samples, dlq, lates, orphans):
        r.close()


def counters_of(port: int) -> dict:
    """The worker's total counters, or {} when its page does not answer within 5 s."""
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/counters", timeout=5).read())["total"]
    except OSError:
        return {}


def read_counters(port: int, timeout_s: float = 60.0) -> dict:
    """The worker's total counters, asked again until its page answers (a busy worker's web
    endpoint can miss one 5 s read)."""
    from tests.broker.conftest import wait_for
    return wait_for(lambda: counters_of(port), timeout_s, 0.2, f"the counters page on port {port}")


def decode_event(value: bytes):
    from streams.contracts import decode as decode_contract
    return decode_contract(value)


@pytest.mark.timeout(150)
def test_faust_stream_path_delivers_every_record(broker, tmp_path):
    """``--delivery stream`` (faust's per-record path, kept for comparison): the same samples. It
    once stalled: the topic registered with the conductor as well as by the agent was a channel
    nobody iterated, each record offered to it raised, and once it was full faust paused the
    partition for good."""
    events = replay(broker.bootstrap, tmp_path)
    expected = offline(events, tmp_path, "offline")
    samples = TopicReader(broker.bootstrap, "samples")
    proc, log = start_worker(broker.bootstrap, tmp_path / "joiner", tmp_path / "worker.log", delivery="stream")
    try:
        wait_until(lambda: len(samples.values()) >= len(expected), 120, "every sample", [(proc, log)])
    finally:
        stop_worker(proc, log)
    check_samples(samples.poll(), expected, events)
    assert "Cannot put on Topic channel" not in log.read_text(errors="replace")
    samples.close()


@pytest.mark.timeout(150)
def test_sigkill_mid_stream_then_restart_emits_each_sample_once(broker, tmp_path):
    events = replay(broker.bootstrap, tmp_path)
    expected = offline(events, tmp_path, "offline")
    samples = TopicReader(broker.bootstrap, "samples")
    # small batches: many commits, so the kill lands between them
    proc, log = start_worker(broker.bootstrap, tmp_path / "joiner", tmp_path / "worker-1.log", batch_max=200)
    try:
        # a tenth: early enough that a slow test process still kills before the end of the stream
        wait_until(lambda: len(samples.values()) >= len(expected) // 10, 90, "a tenth of the samples", [(proc, log)])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_at_kill = len(samples.values())
    assert n_at_kill < len(expected), "the kill came after the end of the stream"
    proc, log = start_worker(broker.bootstrap, tmp_path / "joiner", tmp_path / "worker-2.log", batch_max=200)
    try:
        wait_until(lambda: len(samples.values()) >= len(expected), 90, "the rest of the samples", [(proc, log)])
        deadline = time.monotonic() + 3  # anything extra (a duplicate) would show up now
        while time.monotonic() < deadline:
            samples.poll()
            time.sleep(0.1)
    finally:
        stop_worker(proc, log)
    check_samples(samples.poll(), expected, events)
    resumed = [line for line in log.read_text(errors="replace").splitlines() if "partition_assigned" in line]
    assert {partition_of(line) for line in resumed} == set(range(N_PARTITIONS))
    assert any("'impressions': 0," not in line for line in resumed), resumed
    samples.close()


@pytest.mark.timeout(200)
def test_worker_without_the_store_restores_it_from_the_changelog(broker, tmp_path):
    """A worker stops mid-stream and its stores are lost; a worker with another data dir restores
    them from joiner-store-changelog, resumes from their offsets (not from 0) and the samples are
    the offline builder's, each once."""
    events = replay(broker.bootstrap, tmp_path)
    expected = offline(events, tmp_path, "offline")
    samples = TopicReader(broker.bootstrap, "samples")
    proc, log = start_worker(broker.bootstrap, tmp_path / "host-a", tmp_path / "worker-a.log", batch_max=200)
    try:
        wait_until(lambda: len(samples.poll()) >= len(expected) // 4, 90, "a quarter of the samples", [(proc, log)])
    finally:
        stop_worker(proc, log)
    n_before = len(samples.poll())
    assert n_before < len(expected), "the first worker reached the end of the stream"
    group = committed_offsets(broker.bootstrap, "streamrec-joiner")  # what the first worker committed
    shutil.rmtree(tmp_path / "host-a")
    port = free_port("127.0.0.1")
    proc, log = start_worker(broker.bootstrap, tmp_path / "host-b", tmp_path / "worker-b.log", web_port=port,
                             batch_max=200)
    try:
        wait_until(lambda: len(samples.poll()) >= len(expected), 90, "the rest of the samples", [(proc, log)])
        counters = read_counters(port)
        deadline = time.monotonic() + 2  # a duplicate would show up now
        while time.monotonic() < deadline:
            samples.poll()
            time.sleep(0.1)
    finally:
        stop_worker(proc, log)
    check_samples(samples.poll(), expected, events)
    lines = log.read_text(errors="replace").splitlines()
    restored = {partition_of(line) for line in lines if "store_restored" in line}
    opened = {partition_of(line): line for line in lines if "partition_assigned" in line}
    assert restored and sorted(opened) == list(range(N_PARTITIONS)), lines
    for p, line in opened.items():  # a restored store resumes where it was, not from offset 0
        assert ("{'impressions': 0, 'clicks': 0, 'dwell': 0, 'feedback': 0}" in line) == (p not in restored), line
    # the group's committed offsets never pass the store's (= the changelog's): acks follow commits
    for p in restored:
        for topic in EVENT_TOPICS:
            store_offset = int(re.search(rf"'{topic}': (\d+)", opened[p]).group(1))
            assert group.get((topic, p), 0) <= store_offset, (topic, p, group.get((topic, p)), opened[p])
    # A restored partition resumes at its restored offsets: the gap path (events past the next
    # expected offset, e.g. after a fetch dropped in a rebalance) may seek it back to them, never
    # below. A partition that had not committed may meet events past offset 0 (the group moved on
    # while its store stayed empty) and is sought back to 0, which rebuilds it; check_samples above
    # holds either way.
    for line in lines:
        if "offset_gap" in line and partition_of(line) in restored:
            topic = re.search(r"topic=(\S+)", line).group(1)
            seek_to = int(re.search(r"seek_to=(\d+)", line).group(1))
            resumed = int(re.search(rf"'{topic}': (\d+)", opened[partition_of(line)]).group(1))
            assert seek_to >= resumed > 0, (line, opened[partition_of(line)])
    assert counters["restored_from_changelog"] == len(restored) and counters["samples"] == len(expected)
    samples.close()


@pytest.mark.timeout(240)
def test_one_worker_and_two_workers_agree_up_to_the_staleness_bound(broker, tmp_path):
    """The same input on two brokers: one worker on the first, two on the second. Every sample
    that differs between the runs differs in T1/T3 bits only, and in at least one run it carries
    the stats header and its dwell lies between the thresholds from the contributions it had and
    from all contributions of earlier epochs."""
    events = replay(broker.bootstrap, tmp_path)
    expected = offline(events, tmp_path, "offline")
    local = offline(events, tmp_path, "local", PipelineConfig(shared_stats=False))
    runs, owners, counters = [], [], []
    with EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "broker2", port=0)) as broker2:
        (tmp_path / "r2").mkdir()
        replay(broker2.bootstrap, tmp_path / "r2")
        for bootstrap, n_workers in ((broker.bootstrap, 1), (broker2.bootstrap, 2)):
            samples = TopicReader(bootstrap, "samples")
            data_dir = tmp_path / f"joiner-{n_workers}"
            ports = [free_port("127.0.0.1") for _ in range(n_workers)]
            procs = [start_worker(bootstrap, data_dir, tmp_path / f"worker-{n_workers}-{i}.log", web_port=port,
                                  batch_max=500) for i, port in enumerate(ports)]
            try:
                wait_until(lambda: len(samples.poll()) >= len(expected), 120, "every sample", procs)
                counters.append(merge_totals(read_counters(port) for port in ports))
            finally:
                for proc, log in procs:
                    stop_worker(proc, log)
            runs.append({decode(r.value).impression_id: r for r in samples.poll()})
            owners.append([{int(line.split("partition=")[1].split()[0]) for line in tail(log, 10**7).splitlines()
                            if "partition_assigned" in line} for _, log in procs])
            samples.close()
    assert owners[1][0] and owners[1][1], owners  # both workers held partitions
    assert owners[1][0] | owners[1][1] == set(range(N_PARTITIONS))
    reports = [check_samples(list(run.values()), expected, events) for run in runs]
    one, two = runs
    differing = [k for k in one if one[k].value != two[k].value]
    for k in differing:  # each difference is one the bound explains, in one run or both
        assert k in reports[0].explained or k in reports[1].explained, k
    # the shared statistics are used: remote contributions were applied, and the samples differ
    # from those of per-partition statistics
    for c in counters:
        assert c.get("stats_remote_applied", 0) > 0 and c.get("stats_feed_messages", 0) > 0, c
        assert c.get("stats_feed_pruned", 0) > 0, c  # the table does not keep what was applied
    assert sum(expected[k] != local[k] for k in expected) > 100
    assert sum(one[k].value != local[k] for k in one) > 100
    print(f"differing={len(differing)} explained={[r.n_explained for r in reports]} "
          f"with_header={[r.n_headers for r in reports]} counters={[{k: v for k, v in c.items() if 'stats' in k} for c in counters]}")


def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """The group's committed offsets, ``(topic, partition) -> offset``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:  # an offset fetch: the consumer never joins the group
        found = {(t, p): consumer.committed(TopicPartition(t, p)) for t in EVENT_TOPICS for p in range(N_PARTITIONS)}
        return {k: v for k, v in found.items() if v is not None}
    finally:
        consumer.close()


def partition_of(line: str) -> int:
    return int(line.split("partition=")[1].split()[0])


def merge_totals(totals) -> dict:
    out: dict = {}
    for t in totals:
        for k, v in t.items():
            out[k] = out.get(k, 0) + v
    return out


def test_the_worker_consumer_long_polls_at_most_fetch_max_wait_ms():
    """faust hard-codes fetch_max_wait_ms=1500 in the consumer it builds; the joiner's wrapper sets
    its own (streams/joiner/fetch.py), and a second call replaces the first instead of stacking."""
    import asyncio

    import faust

    from streams.joiner.fetch import cap_fetch_wait

    async def built(ms: int) -> int:
        cap_fetch_wait(ms)
        app = faust.App("fetch-wait-check", broker="kafka://127.0.0.1:1", store="memory://", autodiscover=False,
                        web_enabled=False)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()

    assert asyncio.run(built(123)) == 123
    assert asyncio.run(built(100)) == 100
