"""The broker as a subprocess (``streamrec broker``): kill -9 loses no acknowledged record, ids persist."""
from __future__ import annotations

import threading
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.protocol.producer import InitProducerIdRequest

from tests.broker.conftest import BrokerProcess, RawClient, wait_for

N_PARTITIONS = 3


def _init_producer_id(bootstrap: str) -> int:
    client = RawClient(bootstrap)
    try:
        return client.request(InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000), 4).producer_id
    finally:
        client.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # producer __del__ after the kill
def test_kill_9_loses_no_acknowledged_record(tmp_path):
    data_dir = tmp_path / "data"
    first = BrokerProcess(data_dir, tmp_path / "broker.log", ["--partitions", str(N_PARTITIONS)]).start()
    pid_before = _init_producer_id(first.bootstrap)
    acked: dict[tuple[int, int], bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    # delivery_timeout_ms: the batches in flight when the broker dies expire within seconds, so
    # close() below completes and the producer's thread ends (with the default 120 s, flush() in
    # close() timed out and left the thread retrying for the rest of the session)
    producer = KafkaProducer(bootstrap_servers=first.bootstrap, acks=1, linger_ms=1, retries=0,
                             max_block_ms=2000, request_timeout_ms=2000, delivery_timeout_ms=3000)

    def on_ack(value: bytes):
        def record(meta) -> None:
            with lock:
                acked[(meta.partition, meta.offset)] = value
        return record

    def produce_forever() -> None:
        i = 0
        while not stop.is_set():
            value = f"value-{i}".encode()
            try:
                producer.send("durable", key=f"k{i % 11}".encode(), value=value).add_callback(on_ack(value))
            except Exception:
                if stop.is_set():
                    return  # the broker is gone
                time.sleep(0.05)  # a full buffer or slow metadata on a loaded machine: try again
                continue
            i += 1

    sender = threading.Thread(target=produce_forever)
    sender.start()
    wait_for(lambda: len(acked) >= 3000, 60, 0.01, "3000 acknowledged records before the kill")
    first.kill()  # SIGKILL while the producer is still sending
    stop.set()
    sender.join(10)
    producer.close(timeout=30)  # batches in flight when the broker died expire; only acknowledged ones count
    assert not producer._sender.is_alive()
    with lock:
        acknowledged = dict(acked)
    assert len(acknowledged) >= 3000

    second = BrokerProcess(data_dir, tmp_path / "broker.log").start()
    try:
        consumer = KafkaConsumer(bootstrap_servers=second.bootstrap, enable_auto_commit=False,
                                 auto_offset_reset="earliest")
        try:
            tps = [TopicPartition("durable", p) for p in range(N_PARTITIONS)]
            ends = consumer.end_offsets(tps)
            consumer.assign(tps)
            stored: dict[tuple[int, int], bytes] = {}

            def drained() -> bool:
                for records in consumer.poll(timeout_ms=200).values():
                    stored.update({(r.partition, r.offset): r.value for r in records})
                return all(consumer.position(tp) >= ends[tp] for tp in tps)

            wait_for(drained, 60, 0, "the restarted broker to serve every stored record")
        finally:
            consumer.close()
        missing = [k for k in acknowledged if k not in stored]
        assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:5]}"
        assert all(stored[k] == v for k, v in acknowledged.items())
        assert _init_producer_id(second.bootstrap) > pid_before  # producer ids never repeat
    finally:
        assert second.terminate() == 0  # SIGTERM: clean shutdown, exit status 0
