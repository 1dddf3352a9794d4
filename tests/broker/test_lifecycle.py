"""EmbeddedBroker lifecycle: restart on the same data dir, bind failures, the advertised API table."""
from __future__ import annotations

import socket

import pytest
from kafka.protocol.metadata import ApiVersionsRequest
from kafka.protocol.producer import InitProducerIdRequest

from streams.broker import BrokerError, EmbeddedBroker
from streams.broker.config import BrokerConfig
from streams.broker.server import load_handlers
from tests.broker.conftest import RawClient, make_batch, metadata_request, produce_raw


def _pid(client: RawClient) -> int:
    return client.request(InitProducerIdRequest(transactional_id=None, transaction_timeout_ms=60000), 4).producer_id


def test_restart_keeps_data_producer_ids_and_idempotent_state(tmp_path):
    config = BrokerConfig(data_dir=tmp_path / "broker", port=0)
    with EmbeddedBroker(config) as first:
        client = RawClient(first.bootstrap)
        client.request(metadata_request(["kept"]), 9)
        pid = _pid(client)
        assert produce_raw(client, "kept", make_batch(pid, 0, 0, [b"a", b"b", b"c"])).base_offset == 0
        client.close()
    with EmbeddedBroker(config) as second:
        client = RawClient(second.bootstrap)
        assert _pid(client) > pid
        retry = produce_raw(client, "kept", make_batch(pid, 0, 0, [b"a", b"b", b"c"]))  # ack lost before the restart
        assert (retry.error_code, retry.base_offset) == (0, 0)
        assert second.broker.logs.get("kept", 0).log_end_offset == 3
        assert produce_raw(client, "kept", make_batch(pid, 0, 3, [b"d"])).base_offset == 3
        client.close()


def test_start_fails_clearly_when_the_port_is_taken(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        broker = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "b", port=holder.getsockname()[1]))
        with pytest.raises(BrokerError, match="failed to start"):
            broker.start()
        broker.stop()  # nothing to stop; must not raise
    finally:
        holder.close()


def test_api_versions_advertises_exactly_the_handler_table(broker):
    client = RawClient(broker.bootstrap)
    try:
        advertised = {k.api_key: (k.min_version, k.max_version) for k in client.request(ApiVersionsRequest(), 2).api_keys}
    finally:
        client.close()
    assert advertised == {key: (lo, hi) for key, (_h, lo, hi) in load_handlers().items()}
    for key in (0, 1, 2, 3, 18, 19, 20, 22, 32):  # the data plane served by this package
        assert key in advertised


def test_stop_is_idempotent_and_bootstrap_needs_a_started_broker(tmp_path):
    b = EmbeddedBroker(BrokerConfig(data_dir=tmp_path / "b", port=0))
    with pytest.raises(BrokerError, match="not started"):
        _ = b.bootstrap
    b.start()
    assert b.port > 0
    b.stop()
    b.stop()
