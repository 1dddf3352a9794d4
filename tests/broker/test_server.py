"""Real Kafka clients against the embedded broker over TCP: kafka-python, aiokafka, librdkafka, kcat."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import defaultdict

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tests.broker.conftest import wait_for


def _consume_all(bootstrap: str, topic: str, n_partitions: int, expected: int, timeout_s: float = 20.0):
    """Every record of ``topic`` via a manually assigned kafka-python consumer (no group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(n_partitions)])
        got = []

        def drained() -> bool:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
            return len(got) >= expected

        wait_for(drained, timeout_s, 0, f"{expected} records from {topic}")
        return got
    finally:
        consumer.close()


def test_kafka_python_round_trip_three_partitions(broker):
    topic = "round-trip"
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=5)
    sent_partition: dict[bytes, set[int]] = defaultdict(set)
    futures = []
    for i in range(600):
        key = f"user-{i % 17}".encode()
        futures.append((key, producer.send(topic, key=key, value=f"{i}".encode())))
    producer.flush()
    for key, fut in futures:
        sent_partition[key].add(fut.get(timeout=10).partition)
    producer.close()
    assert all(len(parts) == 1 for parts in sent_partition.values())
    assert len({p for parts in sent_partition.values() for p in parts}) == 3  # 17 keys spread over 3 partitions

    got = _consume_all(broker.bootstrap, topic, 3, 600)
    assert len(got) == 600
    by_partition: dict[int, list[int]] = defaultdict(list)
    for r in got:
        assert r.partition in sent_partition[r.key]
        by_partition[r.partition].append(int(r.value))
    for values in by_partition.values():
        assert values == sorted(values)  # produced in increasing order, so read back in order
    assert sorted(v for vs in by_partition.values() for v in vs) == list(range(600))
    offsets = [r.offset for r in got if r.partition == got[0].partition]
    assert offsets == list(range(len(offsets)))


@pytest.mark.parametrize("acks", [0, 1, "all"])
def test_acks_modes(broker, acks):
    topic = f"acks-{acks}"
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=acks)
    results = [producer.send(topic, value=f"v{i}".encode(), partition=0) for i in range(200)]
    producer.flush()
    metas = [f.get(timeout=10) for f in results]
    producer.close()
    if acks != 0:
        assert [m.offset for m in metas] == list(range(200))
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        tp = TopicPartition(topic, 0)
        wait_for(lambda: consumer.end_offsets([tp])[tp] == 200, 10, 0.05, "acks=0 records to land")
    finally:
        consumer.close()
    assert [r.value for r in _consume_all(broker.bootstrap, topic, 1, 200)] == [f"v{i}".encode() for i in range(200)]


def test_kafka_python_idempotent_producer(broker):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=True, acks="all")
    futures = [producer.send("idem-kp", value=f"{i}".encode(), partition=i % 3) for i in range(300)]
    producer.flush()
    assert all(f.get(timeout=10).offset >= 0 for f in futures)
    producer.close()
    got = _consume_all(broker.bootstrap, "idem-kp", 3, 300)
    assert sorted(int(r.value) for r in got) == list(range(300))


def test_confluent_idempotent_produce_and_consume(broker):
    ck = pytest.importorskip("confluent_kafka")
    producer = ck.Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 5})
    delivered = []

    def on_delivery(err, msg):
        assert err is None, err
        delivered.append((msg.partition(), msg.offset()))

    for i in range(500):
        producer.produce("ck-topic", key=f"k{i % 7}".encode(), value=f"{i}".encode(), on_delivery=on_delivery)
    assert producer.flush(20) == 0
    assert len(delivered) == 500
    consumer = ck.Consumer({
        "bootstrap.servers": broker.bootstrap, "group.id": "unused-manual-assign", "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    try:
        consumer.assign([ck.TopicPartition("ck-topic", p, ck.OFFSET_BEGINNING) for p in range(3)])
        values = []

        def drained() -> bool:
            for m in consumer.consume(num_messages=500, timeout=0.2):
                assert m.error() is None, m.error()
                values.append(int(m.value()))
            return len(values) >= 500

        wait_for(drained, 20, 0, "librdkafka consumer to read 500 records")
    finally:
        consumer.close()
    assert sorted(values) == list(range(500))


def test_aiokafka_produce_and_consume(broker):
    aiokafka = pytest.importorskip("aiokafka")

    async def main() -> list[bytes]:
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            for i in range(100):
                await producer.send("aio-topic", value=f"a{i}".encode(), partition=1)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                                             enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([aiokafka.TopicPartition("aio-topic", 1)])
            values: list[bytes] = []
            async with asyncio.timeout(20):
                while len(values) < 100:
                    batch = await consumer.getmany(timeout_ms=200)
                    values.extend(r.value for records in batch.values() for r in records)
            return values
        finally:
            await consumer.stop()

    assert asyncio.run(main()) == [f"a{i}".encode() for i in range(100)]


def test_kcat_produce_and_consume(broker, tmp_path):
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.skip("kcat is not on PATH; install kcat to run the C-client smoke test")
    lines = [f"line-{i}" for i in range(1000)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    subprocess.run([kcat, "-P", "-b", broker.bootstrap, "-t", "kcat-topic", "-p", "0", "-l", str(src)],
                   check=True, timeout=60)
    out = subprocess.run([kcat, "-C", "-b", broker.bootstrap, "-t", "kcat-topic", "-p", "0", "-o", "beginning",
                          "-e", "-q"], check=True, timeout=60, capture_output=True, text=True)
    assert out.stdout.splitlines() == lines
