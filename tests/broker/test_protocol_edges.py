"""Wire-level behaviour over raw sockets: bad frames, unsupported APIs, pipelining, long poll, idempotence."""
from __future__ import annotations

import logging
import struct
import threading
import time

import pytest
from kafka import KafkaProducer
from kafka.protocol.consumer import FetchRequest, FetchResponse
from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse, MetadataRequest
from kafka.protocol.producer import InitProducerIdRequest, ProduceRequest

from streams.broker import error_codes as ec
from tests.broker.conftest import make_batch, metadata_request, produce_raw, wait_for


def _assert_broker_still_serves(broker) -> None:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
    try:
        meta = producer.send("after-abuse", b"ok", partition=0).get(timeout=10)
    finally:
        producer.close()
    assert meta.offset == 0


@pytest.mark.parametrize("payload", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http-garbage"),
    pytest.param(struct.pack(">i", 0x7FFFFFF0) + b"\x00" * 16, id="huge-length"),
    pytest.param(struct.pack(">i", -5) + b"\x00" * 16, id="negative-length"),
    pytest.param(struct.pack(">i", 3) + b"abc", id="shorter-than-a-header"),
    # Metadata v1 whose topics array claims 5 entries but the frame ends: the body cannot decode
    pytest.param(struct.pack(">ihhih", 14, 3, 1, 42, -1) + struct.pack(">i", 5), id="undecodable-body"),
    # api_key 999 exists nowhere in the protocol: no response format to answer with
    pytest.param(struct.pack(">ihhih", 10, 999, 0, 43, -1), id="unknown-api-key"),
])
def test_malformed_frame_closes_only_that_connection(broker, raw_client, payload, caplog):
    caplog.set_level(logging.WARNING, logger="streams.broker.server")
    bystander = raw_client()
    assert bystander.request(ApiVersionsRequest(), 0).error_code == 0
    bad = raw_client()
    bad.send_raw(payload)
    assert bad.is_closed_by_peer(timeout_s=5)
    assert any(r.levelno == logging.WARNING and "closing connection" in r.getMessage() for r in caplog.records)
    assert broker.broker.counters["connections", "malformed"] == 1
    assert bystander.request(metadata_request([]), 1).brokers[0].port == broker.port
    _assert_broker_still_serves(broker)


def test_unsupported_version_of_known_api_gets_error_response(broker, raw_client):
    client = raw_client()
    max_metadata = {k.api_key: k.max_version for k in client.request(ApiVersionsRequest(), 3).api_keys}[3]
    assert max_metadata < MetadataRequest.max_version, "test needs a Metadata version the broker does not serve"
    response = client.request(metadata_request(["x"]), MetadataRequest.max_version)
    assert response.error_code == ec.UNSUPPORTED_VERSION
    assert broker.broker.counters["requests", "unsupported"] == 1
    assert client.request(metadata_request([]), max_metadata).error_code == 0  # same connection still served


def test_unsupported_version_without_error_field_closes_connection(broker, raw_client):
    client = raw_client()
    fetch_v2 = FetchRequest(replica_id=-1, max_wait_ms=0, min_bytes=0, topics=[])
    client.send(fetch_v2, 2)  # below the broker's minimum (4); FetchResponse v2 has no top-level error
    assert client.is_closed_by_peer(timeout_s=5)
    _assert_broker_still_serves(broker)


def test_api_versions_from_the_future_answered_with_v0_and_the_supported_list(broker, raw_client):
    client = raw_client()
    # an ApiVersions v9 request header (flexible, as a newer client would send it), empty body
    header = struct.pack(">hhih", 18, 9, 77, 4) + b"test" + b"\x00"
    client.send_raw(struct.pack(">i", len(header) + 1) + header + b"\x00")
    frame = client.recv_frame()
    response = ApiVersionsResponse.decode(frame, version=0, header=True)
    assert response.header.correlation_id == 77
    assert response.error_code == ec.UNSUPPORTED_VERSION
    ranges = {k.api_key: (k.min_version, k.max_version) for k in response.api_keys}
    assert ranges[18] == (0, 4) and ranges[0][1] >= 9 and ranges[1][1] >= 11


def test_pipelined_requests_answered_in_order(broker, raw_client):
    client = raw_client()
    frames = []
    for cid, version in zip((11, 12, 13, 14), (0, 1, 2, 3)):
        req = ApiVersionsRequest() if version < 3 else ApiVersionsRequest(client_software_name="t", client_software_version="1")
        req.API_VERSION = version
        req.with_header(correlation_id=cid, client_id="pipeline")
        frames.append(bytes(req.encode(header=True, framed=True)))
    client.send_raw(b"".join(frames))
    got = [ApiVersionsResponse.decode(client.recv_frame(), version=v, header=True) for v in (0, 1, 2, 3)]
    assert [r.header.correlation_id for r in got] == [11, 12, 13, 14]
    assert all(r.error_code == 0 for r in got)


def _fetch(topic: str, offset: int, max_wait_ms: int) -> FetchRequest:
    part = FetchRequest.FetchTopic.FetchPartition(
        partition=0, current_leader_epoch=-1, fetch_offset=offset, last_fetched_epoch=-1, log_start_offset=-1,
        partition_max_bytes=1 << 20,
    )
    return FetchRequest(
        replica_id=-1, max_wait_ms=max_wait_ms, min_bytes=1, max_bytes=1 << 24, isolation_level=0, session_id=0,
        session_epoch=-1, topics=[FetchRequest.FetchTopic(topic=topic, partitions=[part])], forgotten_topics_data=[],
        rack_id="",
    )


def test_long_poll_fetch_returns_early_when_data_arrives(broker, raw_client):
    client = raw_client()
    client.request(metadata_request(["poll"]), 9)  # auto-creates the topic
    result: dict[str, object] = {}

    def fetch() -> None:
        t0 = time.monotonic()
        result["response"] = client.request(_fetch("poll", 0, 30_000), 12)
        result["elapsed"] = time.monotonic() - t0

    # the producer is connected before the fetch starts, so the wait measured is the broker's alone
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
    producer.partitions_for("poll")
    thread = threading.Thread(target=fetch)
    thread.start()
    wait_for(lambda: broker.broker.n_waiting_fetches == 1, 5, 0.005, "the fetch to start waiting")
    producer.send("poll", b"wake-up", partition=0).get(timeout=10)
    producer.close()
    thread.join(40)
    part = result["response"].responses[0].partitions[0]
    assert part.error_code == 0 and part.high_watermark == 1 and b"wake-up" in bytes(part.records)
    assert result["elapsed"] < 15, f"fetch took {result['elapsed']:.2f}s; max_wait was 30s"


def test_long_poll_fetch_waits_max_wait_when_nothing_arrives(broker, raw_client):
    client = raw_client()
    client.request(metadata_request(["idle"]), 9)
    t0 = time.monotonic()
    response: FetchResponse = client.request(_fetch("idle", 0, 300), 12)
    elapsed = time.monotonic() - t0
    part = response.responses[0].partitions[0]
    assert part.error_code == 0 and not part.records and response.session_id == 0
    assert 0.25 <= elapsed < 10
    out_of_range = client.request(_fetch("idle", 5, 300), 12).responses[0].partitions[0]
    assert out_of_range.error_code == ec.OFFSET_OUT_OF_RANGE
    unknown = client.request(_fetch("no-such-topic", 0, 300), 12).responses[0].partitions[0]
    assert unknown.error_code == ec.UNKNOWN_TOPIC_OR_PARTITION


def test_idempotent_retries_are_deduplicated_and_gaps_rejected(broker, raw_client):
    client = raw_client()
    client.request(metadata_request(["idem-raw"]), 9)
    init = client.request(InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000), 4)
    pid = init.producer_id
    assert init.error_code == 0 and init.producer_epoch == 0
    first = produce_raw(client, "idem-raw", make_batch(pid, 0, 0, [b"a", b"b"]))
    assert (first.error_code, first.base_offset) == (0, 0)
    retry = produce_raw(client, "idem-raw", make_batch(pid, 0, 0, [b"a", b"b"]))
    assert (retry.error_code, retry.base_offset) == (0, 0)  # duplicate: original offset, not appended again
    second = produce_raw(client, "idem-raw", make_batch(pid, 0, 2, [b"c"]))
    assert (second.error_code, second.base_offset) == (0, 2)
    gap = produce_raw(client, "idem-raw", make_batch(pid, 0, 7, [b"z"]))
    assert gap.error_code == ec.OUT_OF_ORDER_SEQUENCE_NUMBER
    assert broker.broker.logs.get("idem-raw", 0).log_end_offset == 3
    bumped = produce_raw(client, "idem-raw", make_batch(pid, 1, 0, [b"d"]))
    assert (bumped.error_code, bumped.base_offset) == (0, 3)
    fenced = produce_raw(client, "idem-raw", make_batch(pid, 0, 3, [b"e"]))
    assert fenced.error_code == ec.INVALID_PRODUCER_EPOCH
    second_pid = client.request(InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000), 4)
    assert second_pid.producer_id > pid


def test_corrupt_batch_rejected_with_corrupt_message(broker, raw_client):
    client = raw_client()
    client.request(metadata_request(["corrupt"]), 9)
    batch = bytearray(make_batch(-1, -1, -1, [b"payload"]))
    batch[-1] ^= 0xFF  # breaks the CRC
    assert produce_raw(client, "corrupt", bytes(batch)).error_code == ec.CORRUPT_MESSAGE
    assert produce_raw(client, "corrupt", b"\x00" * 20).error_code == ec.CORRUPT_MESSAGE
    two_batches = make_batch(-1, -1, -1, [b"x"]) + make_batch(-1, -1, -1, [b"y"])
    assert produce_raw(client, "corrupt", two_batches).error_code == ec.INVALID_RECORD
    assert produce_raw(client, "no-such-topic-here", make_batch(-1, -1, -1, [b"x"])).error_code == ec.UNKNOWN_TOPIC_OR_PARTITION
    assert broker.broker.logs.get("corrupt", 0).log_end_offset == 0


def test_acks_0_sends_no_response_and_a_failure_closes_the_connection(broker, raw_client):
    client = raw_client()
    client.request(metadata_request(["fire-and-forget"]), 9)
    R = ProduceRequest.TopicProduceData

    def produce_acks_0(topic: str) -> None:
        req = ProduceRequest(transactional_id=None, acks=0, timeout_ms=5000, topic_data=[
            R(name=topic, partition_data=[R.PartitionProduceData(index=0, records=make_batch(-1, -1, -1, [b"f"]))])])
        client.send(req, 9)

    produce_acks_0("fire-and-forget")
    cid = client.send(ApiVersionsRequest(), 0)
    assert ApiVersionsResponse.decode(client.recv_frame(), version=0, header=True).header.correlation_id == cid
    assert broker.broker.logs.get("fire-and-forget", 0).log_end_offset == 1
    produce_acks_0("no-such-topic-for-acks-0")
    assert client.is_closed_by_peer(timeout_s=5)
    assert broker.broker.counters["connections", "closed_by_handler"] == 1


def test_fetch_from_a_damaged_segment_answers_storage_error_and_keeps_serving(tmp_path, caplog):
    from streams.broker import EmbeddedBroker
    from streams.broker.config import BrokerConfig, LogConfig
    from tests.broker.conftest import RawClient

    config = BrokerConfig(data_dir=tmp_path / "b", port=0, log=LogConfig(segment_bytes=4096))
    with EmbeddedBroker(config) as broker:
        client = RawClient(broker.bootstrap)
        try:
            client.request(metadata_request(["damaged"]), 9)
            for i in range(20):  # ~20 batches of ~1 KiB: several closed segments
                assert produce_raw(client, "damaged", make_batch(-1, -1, -1, [bytes([i]) * 1000])).error_code == 0
            first_segment = sorted((config.data_dir / "logs" / "damaged" / "0").glob("*.log"))[0]
            with open(first_segment, "r+b") as fh:  # lose the closed segment's tail behind the broker's back
                fh.truncate(100)
            with caplog.at_level(logging.ERROR, logger="streams.broker.handlers_fetch"):
                part = client.request(_fetch("damaged", 0, 0), 12).responses[0].partitions[0]
            assert part.error_code == ec.KAFKA_STORAGE_ERROR
            assert "fetch read failed" in caplog.text
            later = client.request(_fetch("damaged", 19, 0), 12).responses[0].partitions[0]
            assert later.error_code == 0 and bytes([19]) * 1000 in bytes(later.records)
        finally:
            client.close()
