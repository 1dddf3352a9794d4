"""Real clients in consumer groups against the embedded broker over TCP.

kafka-python and aiokafka groups of two on a 3-partition topic (split, leave -> takeover, commit,
resume from the committed offsets), librdkafka (confluent-kafka) joining and committing, and kcat's
balanced consumer, and a member killed without LeaveGroup being expired. Everything waits by polling with a deadline.
"""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

N_PARTITIONS = 3
POLL_TIMEOUT_MS = 1000
FAST_GROUP = dict(heartbeat_interval_ms=100, session_timeout_ms=6000, max_poll_interval_ms=10_000)


def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)  # some conditions open an admin client: polling harder loads the broker


def produce(bootstrap: str, topic: str, tag: str, per_partition: int) -> list[bytes]:
    """``per_partition`` records into each partition; returns the values sent."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    values = []
    for i in range(per_partition):
        for p in range(N_PARTITIONS):
            value = f"{tag}-{p}-{i}".encode()
            producer.send(topic, value=value, partition=p)
            values.append(value)
    producer.flush()
    producer.close()
    return values


def create_topic(bootstrap: str, topic: str) -> None:
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=N_PARTITIONS, replication_factor=1)])
    finally:
        admin.close()


def committed_offsets(bootstrap: str, group: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        got = admin.list_group_offsets({group: None})[group]  # OffsetFetch v8+, all partitions
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in got.items()}


def describe(bootstrap: str, group: str) -> tuple[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        listed = {g["group_id"] for g in admin.list_groups()}
        info = admin.describe_groups([group])[group]
    finally:
        admin.close()
    if group not in listed:
        return "unlisted", 0
    return info["group_state"], len(info["members"])


class ConsumerThread:
    """One kafka-python group member polling (and committing after each batch) in its own thread."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self._args = (bootstrap, topic, group)
        self.values: list[bytes] = []
        self.assignment: set[int] = set()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        bootstrap, topic, group = self._args
        try:
            consumer = KafkaConsumer(
                topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                enable_auto_commit=False, **FAST_GROUP,
            )
            try:
                while not self._stop.is_set():
                    # kafka-python 3.0.12 can drop a finished JoinGroup/SyncGroup when poll() times
                    # out while a rejoin is in flight (the member then stops heartbeating and is
                    # expired); a poll timeout longer than a rebalance keeps clear of that client race.
                    batch = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
                    got = [r.value for recs in batch.values() for r in recs]
                    if got:
                        consumer.commit()
                    with self._lock:
                        self.values.extend(got)
                        self.assignment = {tp.partition for tp in consumer.assignment()}
            finally:
                consumer.close()  # sends LeaveGroup
        except BaseException as exc:  # surfaced by the test through .check()
            self.error = exc

    def snapshot(self) -> tuple[list[bytes], set[int]]:
        self.check()
        with self._lock:
            return list(self.values), set(self.assignment)

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"consumer thread failed: {self.error!r}") from self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.check()


def test_kafka_python_group_split_takeover_and_resume(broker):
    bootstrap, topic, group = broker.bootstrap, "kp-clicks", "kp-group"
    create_topic(bootstrap, topic)
    first = produce(bootstrap, topic, "a", per_partition=10)
    a = ConsumerThread(bootstrap, topic, group)
    b = ConsumerThread(bootstrap, topic, group)
    try:
        def split() -> bool:
            (_, pa), (_, pb) = a.snapshot(), b.snapshot()
            return bool(pa) and bool(pb) and not pa & pb and pa | pb == set(range(N_PARTITIONS))

        wait_until(split, what="both members to own disjoint partitions covering the topic")
        wait_until(lambda: describe(bootstrap, group) == ("Stable", 2), what="DescribeGroups: Stable, 2 members")
        wait_until(lambda: set(a.snapshot()[0]) | set(b.snapshot()[0]) >= set(first), what="first batch")
        b.close()  # LeaveGroup -> a takes over every partition
        wait_until(lambda: a.snapshot()[1] == set(range(N_PARTITIONS)), what="a to own all partitions")
        second = produce(bootstrap, topic, "b", per_partition=5)
        wait_until(lambda: set(a.snapshot()[0]) >= set(second), what="a to consume the second batch")
    finally:
        a.close()
        b.close()
    assert committed_offsets(bootstrap, group) == {p: 15 for p in range(N_PARTITIONS)}

    third = produce(bootstrap, topic, "c", per_partition=3)
    c = ConsumerThread(bootstrap, topic, group)
    try:
        wait_until(lambda: len(c.snapshot()[0]) >= len(third), what="c to consume the third batch")
        values, _ = c.snapshot()
    finally:
        c.close()
    # records come in offset order per partition: re-delivered ones would have come first
    assert sorted(values) == sorted(third)
    assert committed_offsets(bootstrap, group) == {p: 18 for p in range(N_PARTITIONS)}


def test_aiokafka_group_split_takeover_and_resume(broker):
    from aiokafka import AIOKafkaConsumer

    bootstrap, topic, group = broker.bootstrap, "aio-clicks", "aio-group"
    create_topic(bootstrap, topic)
    first = produce(bootstrap, topic, "a", per_partition=4)

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
            enable_auto_commit=False, **FAST_GROUP,
        )

    async def drain(c: AIOKafkaConsumer, seen: list[bytes], stop: asyncio.Event) -> None:
        while not stop.is_set():
            batch = await c.getmany(timeout_ms=50)
            got = [r.value for recs in batch.values() for r in recs]
            if got:
                await c.commit()
                seen.extend(got)

    async def await_until(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            await asyncio.sleep(0.02)

    async def body() -> list[bytes]:
        a, b = consumer(), consumer()
        await a.start()
        await b.start()
        seen_a: list[bytes] = []
        seen_b: list[bytes] = []
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        ta = asyncio.create_task(drain(a, seen_a, stop_a))
        tb = asyncio.create_task(drain(b, seen_b, stop_b))

        def parts(c: AIOKafkaConsumer) -> set[int]:
            return {tp.partition for tp in c.assignment()}

        try:
            await await_until(
                lambda: parts(a) and parts(b) and not parts(a) & parts(b)
                and parts(a) | parts(b) == set(range(N_PARTITIONS)),
                "both aiokafka members to own disjoint partitions",
            )
            await await_until(lambda: set(seen_a) | set(seen_b) >= set(first), "first batch")
            stop_b.set()
            await tb
            await b.stop()  # LeaveGroup
            await await_until(lambda: parts(a) == set(range(N_PARTITIONS)), "a to own all partitions")
            second = produce(bootstrap, topic, "b", per_partition=2)
            await await_until(lambda: set(seen_a) >= set(second), "a to consume the second batch")
        finally:
            stop_a.set()
            stop_b.set()
            await asyncio.gather(ta, tb, return_exceptions=True)
            await a.stop()
            await b.stop()

        third = produce(bootstrap, topic, "c", per_partition=2)
        c = consumer()
        await c.start()
        seen_c: list[bytes] = []
        stop_c = asyncio.Event()
        tc = asyncio.create_task(drain(c, seen_c, stop_c))
        try:
            await await_until(lambda: len(seen_c) >= len(third), "c to consume the third batch")
        finally:
            stop_c.set()
            await tc
            await c.stop()
        assert sorted(seen_c) == sorted(third)
        return seen_c

    asyncio.run(body())
    assert committed_offsets(bootstrap, group) == {p: 8 for p in range(N_PARTITIONS)}


def test_confluent_kafka_consumer_joins_group_and_commits(broker):
    from confluent_kafka import Consumer
    from confluent_kafka import TopicPartition as CkTopicPartition

    bootstrap, topic, group = broker.bootstrap, "rd-clicks", "rd-group"
    create_topic(bootstrap, topic)
    sent = produce(bootstrap, topic, "a", per_partition=4)
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 100,
        "broker.address.family": "v4",
    })
    got: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(got) < len(sent):
            if time.monotonic() > deadline:
                raise AssertionError(f"librdkafka consumer got {len(got)}/{len(sent)} records")
            msg = consumer.poll(0.1)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got.append(msg.value())
        assert {tp.partition for tp in consumer.assignment()} == set(range(N_PARTITIONS))
        consumer.commit(asynchronous=False)
        committed = consumer.committed([CkTopicPartition(topic, p) for p in range(N_PARTITIONS)], timeout=10)
        assert {tp.partition: tp.offset for tp in committed} == {p: 4 for p in range(N_PARTITIONS)}
    finally:
        consumer.close()
    assert sorted(got) == sorted(sent)
    assert committed_offsets(bootstrap, group) == {p: 4 for p in range(N_PARTITIONS)}


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed")
def test_kcat_balanced_consumer_joins_group(broker):
    bootstrap, topic, group = broker.bootstrap, "kcat-clicks", "kcat-group"
    create_topic(bootstrap, topic)
    sent = produce(bootstrap, topic, "a", per_partition=2)
    out = subprocess.run(
        ["kcat", "-b", bootstrap, "-G", group, "-o", "beginning", "-c", str(len(sent)), "-f", "%s\n",
         "-X", "broker.address.family=v4", "-X", "heartbeat.interval.ms=100", topic],
        capture_output=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert sorted(out.stdout.split()) == sorted(sent)
    # kcat commits automatically while consuming; what it read is committed for the group
    wait_until(lambda: sum(committed_offsets(bootstrap, group).values()) == len(sent), timeout_s=10,
               what="kcat's commits")


CRASHING_MEMBER = """
import sys, time
from kafka import KafkaConsumer
c = KafkaConsumer(sys.argv[2], bootstrap_servers=sys.argv[1], group_id=sys.argv[3], enable_auto_commit=False,
                  heartbeat_interval_ms=300, session_timeout_ms=6000, max_poll_interval_ms=30000)
deadline = time.monotonic() + 60
while not c.assignment() and time.monotonic() < deadline:
    c.poll(timeout_ms=1000)
print("assigned", sorted(tp.partition for tp in c.assignment()), flush=True)
while True:
    c.poll(timeout_ms=1000)
"""


def test_killed_member_expires_after_session_timeout(broker):
    """A member that dies without LeaveGroup is expired after its session; the survivor takes over."""
    bootstrap, topic, group = broker.bootstrap, "crash-clicks", "crash-group"
    create_topic(bootstrap, topic)
    survivor = ConsumerThread(bootstrap, topic, group)
    crashing = subprocess.Popen(
        [sys.executable, "-c", CRASHING_MEMBER, bootstrap, topic, group], stdout=subprocess.PIPE, text=True,
    )
    try:
        line = crashing.stdout.readline()  # blocks until the subprocess owns partitions (or dies)
        assert line.startswith("assigned ["), line
        wait_until(lambda: describe(bootstrap, group) == ("Stable", 2), what="a stable group of two")
        wait_until(lambda: 0 < len(survivor.snapshot()[1]) < N_PARTITIONS, what="the survivor to own a share")
        killed_at = time.monotonic()  # its last heartbeat was before this
        crashing.kill()  # no LeaveGroup
        crashing.wait(timeout=10)
        wait_until(lambda: survivor.snapshot()[1] == set(range(N_PARTITIONS)), timeout_s=60,
                   what="the survivor to own all partitions after the session timeout")
        # not before the dead member's 6 s session ran out (less its heartbeat interval; the
        # survivor learns on its next heartbeat)
        assert time.monotonic() - killed_at >= 3.0
    finally:
        if crashing.poll() is None:
            crashing.kill()
            crashing.wait()
        survivor.close()


def test_committed_offsets_survive_broker_restart(tmp_path):
    """Commits are durable: a restarted broker on the same data dir serves them to a new consumer."""
    from streams.broker import EmbeddedBroker
    from streams.broker.config import BrokerConfig

    config = BrokerConfig(data_dir=tmp_path / "broker", port=0)
    topic, group = "durable-clicks", "durable-group"
    with EmbeddedBroker(config) as first:
        create_topic(first.bootstrap, topic)
        sent = produce(first.bootstrap, topic, "a", per_partition=4)
        consumer = KafkaConsumer(topic, bootstrap_servers=first.bootstrap, group_id=group,
                                 auto_offset_reset="earliest", enable_auto_commit=False, **FAST_GROUP)
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline:
            got.extend(r.value for recs in consumer.poll(timeout_ms=POLL_TIMEOUT_MS).values() for r in recs)
        consumer.commit()
        consumer.close()
        assert sorted(got) == sorted(sent)
    with EmbeddedBroker(config) as second:
        assert committed_offsets(second.bootstrap, group) == {p: 4 for p in range(N_PARTITIONS)}
        more = produce(second.bootstrap, topic, "b", per_partition=1)
        resumed = ConsumerThread(second.bootstrap, topic, group)
        try:
            wait_until(lambda: len(resumed.snapshot()[0]) >= len(more), what="the resumed consumer")
            values, _ = resumed.snapshot()
        finally:
            resumed.close()
        assert sorted(values) == sorted(more)


def test_confluent_kafka_group_of_two_rebalances(broker):
    """librdkafka as leader and follower: the split, then a LeaveGroup hands everything to the survivor."""
    from confluent_kafka import Consumer

    bootstrap, topic, group = broker.bootstrap, "rd-pair-clicks", "rd-pair-group"
    create_topic(bootstrap, topic)

    def consumer() -> Consumer:
        c = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000, "heartbeat.interval.ms": 100, "broker.address.family": "v4",
        })
        c.subscribe([topic])
        return c

    def parts(c) -> set[int]:
        return {tp.partition for tp in c.assignment()}

    def poll_until(members, cond, what: str) -> None:
        deadline = time.monotonic() + 30
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {[parts(c) for c in members]}")
            for c in members:
                c.poll(0.05)

    a = consumer()
    b = None
    try:
        poll_until([a], lambda: parts(a) == set(range(N_PARTITIONS)), "a alone to own everything")
        b = consumer()
        poll_until([a, b], lambda: parts(a) and parts(b) and not parts(a) & parts(b)
                   and parts(a) | parts(b) == set(range(N_PARTITIONS)), "a split between a and b")
        b.close()  # LeaveGroup
        b = None
        poll_until([a], lambda: parts(a) == set(range(N_PARTITIONS)), "a to take everything back")
    finally:
        a.close()
        if b is not None:
            b.close()
