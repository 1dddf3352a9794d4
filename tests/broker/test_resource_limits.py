"""Open-file limits and partition caps, per-group offset expiry, the advertised host flag."""
from __future__ import annotations

import asyncio
import errno
import resource
import subprocess
import sys
from functools import partial

import pytest
from kafka.protocol.admin import CreateTopicsRequest

from streamrec.cli import build_parser
from streamrec.commands.broker import build_config
from streams.broker import EmbeddedBroker, error_codes as ec
from streams.broker import log_manager
from streams.broker.config import BrokerConfig, GroupConfig
from streams.broker.groups import GroupCoordinator
from streams.broker.log_manager import MAX_PARTITIONS_PER_TOPIC
from streams.broker.offsets_store import CommittedOffset
from tests.broker.conftest import REPO_ROOT, BrokerProcess, RawClient, metadata_request


def create_topics_request(name: str, n_partitions: int) -> CreateTopicsRequest:
    T = CreateTopicsRequest.CreatableTopic
    topic = T(name=name, num_partitions=n_partitions, replication_factor=1, assignments=[], configs=[])
    return CreateTopicsRequest(topics=[topic], timeout_ms=5000, validate_only=False)


def topic_dirs(data_dir) -> set[str]:
    logs = data_dir / "logs"
    return {p.name for p in logs.iterdir() if p.is_dir()} if logs.exists() else set()


class FailingPartitionLogs:
    """Stands in for ``PartitionLog`` in ``log_manager``: the ``fail_at``-th open raises EMFILE."""

    def __init__(self, real: type, fail_at: int) -> None:
        self.real, self.fail_at = real, fail_at
        self.opened: list = []

    def __call__(self, *args, **kwargs):
        if len(self.opened) + 1 == self.fail_at:
            self.fail_at = -1  # once
            raise OSError(errno.EMFILE, "Too many open files")
        log = self.real(*args, **kwargs)
        self.opened.append(log)
        return log


@pytest.fixture
def failing_open(monkeypatch):
    fake = FailingPartitionLogs(log_manager.PartitionLog, fail_at=3)
    monkeypatch.setattr(log_manager, "PartitionLog", fake)
    return fake


def test_partition_count_over_the_cap_is_refused(broker, raw_client):
    topic = raw_client().request(create_topics_request("huge", MAX_PARTITIONS_PER_TOPIC + 1), 5).topics[0]
    assert topic.error_code == ec.INVALID_PARTITIONS
    assert str(MAX_PARTITIONS_PER_TOPIC) in topic.error_message
    assert "huge" not in broker.broker.logs.topics()
    assert "huge" not in topic_dirs(broker.config.data_dir)


def test_failed_create_leaves_nothing_and_the_broker_keeps_serving(tmp_path, failing_open, monkeypatch):
    config = BrokerConfig(data_dir=tmp_path / "broker", port=0)
    with EmbeddedBroker(config) as b:
        client = RawClient(b.bootstrap)
        try:
            topic = client.request(create_topics_request("big", 5), 5).topics[0]
            assert topic.error_code == ec.KAFKA_STORAGE_ERROR
            assert "Too many open files" in topic.error_message
            assert all(log._closed for log in failing_open.opened)  # the two opened before the failure
            assert "big" not in b.broker.logs.topics()
            assert topic_dirs(config.data_dir) == set()  # neither big nor big~new
            # the same connection is still served, and the name can be created now
            assert client.request(create_topics_request("big", 5), 5).topics[0].error_code == ec.NONE
            assert client.request(metadata_request(["big"]), 12).topics[0].error_code == ec.NONE
        finally:
            client.close()
    monkeypatch.undo()
    with EmbeddedBroker(config) as again:
        assert again.broker.logs.topics() == {"big": 5}


def test_failed_auto_create_answers_storage_error(tmp_path, failing_open):
    config = BrokerConfig(data_dir=tmp_path / "broker", port=0, default_partitions=4)
    with EmbeddedBroker(config) as b:
        client = RawClient(b.bootstrap)
        try:
            topic = client.request(metadata_request(["auto"]), 12).topics[0]
            assert (topic.error_code, topic.partitions) == (ec.KAFKA_STORAGE_ERROR, [])
            assert topic_dirs(config.data_dir) == set()
            assert client.request(metadata_request(["auto"]), 12).topics[0].error_code == ec.NONE  # retry works
        finally:
            client.close()
    assert topic_dirs(config.data_dir) == {"auto"}


def test_real_emfile_in_a_limited_process(tmp_path, monkeypatch):
    """A broker process allowed 256 files: a 200-partition topic (600 files) fails cleanly."""
    n_files = 256

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n_files, n_files))

    data_dir = tmp_path / "broker"
    proc = BrokerProcess(data_dir, tmp_path / "broker.log")
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", partial(subprocess.Popen, preexec_fn=limit))
        proc.start()
    try:
        client = RawClient(proc.bootstrap)
        try:
            topic = client.request(create_topics_request("big", 200), 5).topics[0]
            assert topic.error_code == ec.KAFKA_STORAGE_ERROR, topic
            # the files of the failed create were released: a small topic still fits
            assert client.request(create_topics_request("small", 5), 5).topics[0].error_code == ec.NONE
        finally:
            client.close()
        second = RawClient(proc.bootstrap)  # new connections are accepted
        second.close()
    finally:
        assert proc.terminate() == 0
    assert topic_dirs(data_dir) == {"small"}
    with monkeypatch.context() as m:
        m.setattr(subprocess, "Popen", partial(subprocess.Popen, preexec_fn=limit))
        restarted = BrokerProcess(data_dir, tmp_path / "broker.log").start()
    try:
        client = RawClient(restarted.bootstrap)
        try:
            topics = client.request(metadata_request(None), 12).topics
            assert {(t.name, len(t.partitions)) for t in topics} == {("small", 5)}
        finally:
            client.close()
    finally:
        assert restarted.terminate() == 0


def test_open_files_limit_raised_to_the_hard_limit():
    script = (
        "import resource\n"
        "from streams.broker import raise_open_files_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    returned, soft, hard = (int(x) for x in out.stdout.split())
    assert returned == soft
    assert soft == hard if hard != resource.RLIM_INFINITY else soft > 64


def test_active_group_keeps_offsets_of_quiet_partitions(tmp_path):
    async def body():
        now = [1_000_000]
        retention_ms = 1000

        async def started() -> GroupCoordinator:
            coord = GroupCoordinator(GroupConfig(offsets_retention_ms=retention_ms), tmp_path / "__groups",
                                     lambda: now[0], tick_interval_ms=3_600_000)
            await coord.start()
            return coord

        coord = await started()
        await coord.commit_offsets("g", -1, "", None, {("t", 0): CommittedOffset(5)})
        await coord.commit_offsets("idle", -1, "", None, {("t", 0): CommittedOffset(7)})
        now[0] += retention_ms + 500
        await coord.commit_offsets("g", -1, "", None, {("t", 1): CommittedOffset(9)})  # p0 is quiet
        await coord.stop()

        again = await started()
        assert {tp: c.offset for tp, c in again.fetch_offsets("g", None).items()} == {("t", 0): 5, ("t", 1): 9}
        assert again.fetch_offsets("idle", None) == {}  # nothing within retention: all gone
        await again.stop()

        now[0] += retention_ms  # the newest commit of g is now past retention too
        last = await started()
        assert last.fetch_offsets("g", None) == {}
        await last.stop()

    asyncio.run(body())


def test_advertised_host_flag():
    config = build_config(build_parser().parse_args(["broker", "--host", "0.0.0.0", "--advertised-host", "b.example"]))
    assert (config.host, config.advertised_host) == ("0.0.0.0", "b.example")
    assert build_config(build_parser().parse_args(["broker"])).advertised_host is None


def test_metadata_advertises_the_advertised_host(tmp_path):
    config = BrokerConfig(data_dir=tmp_path / "broker", port=0, advertised_host="localhost")
    with EmbeddedBroker(config) as b:
        client = RawClient(f"127.0.0.1:{b.port}")
        try:
            assert [x.host for x in client.request(metadata_request([]), 12).brokers] == ["localhost"]
        finally:
            client.close()
