"""Admin and offset-lookup APIs through kafka-python's KafkaAdminClient and consumer."""
from __future__ import annotations

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import (
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidTopicError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from kafka.protocol.consumer import ListOffsetsRequest
from kafka.protocol.metadata import MetadataRequest

from streams.broker import error_codes as ec
from tests.broker.conftest import wait_for


@pytest.fixture
def admin(broker):
    client = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    yield client
    client.close()


def test_create_and_delete_topics(broker, admin):
    admin.create_topics([NewTopic("orders", 5, 1), NewTopic("events", -1, 1, topic_configs={"retention.ms": "60000"})])
    assert broker.broker.logs.topics()["orders"] == 5
    assert broker.broker.logs.topics()["events"] == broker.config.default_partitions
    assert {"orders", "events"} <= set(admin.list_topics())

    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics([NewTopic("orders", 1, 1)])
    with pytest.raises(InvalidTopicError):
        admin.create_topics([NewTopic("bad/name", 1, 1)])
    with pytest.raises(InvalidPartitionsError):
        admin.create_topics([NewTopic("zero-partitions", 0, 1)])

    admin.create_topics([NewTopic("dry-run", 2, 1)], validate_only=True)
    assert "dry-run" not in broker.broker.logs.topics()
    with pytest.raises(InvalidConfigurationError):
        admin.create_topics([NewTopic("bad-config", 1, 1, topic_configs={"retention.ms": "soon"})], validate_only=True)
    with pytest.raises(InvalidConfigurationError):
        admin.create_topics([NewTopic("bad-config", 1, 1, topic_configs={"cleanup.policy": "shred"})])
    assert "bad-config" not in broker.broker.logs.topics()

    admin.delete_topics(["orders"])
    assert "orders" not in broker.broker.logs.topics()
    wait_for(lambda: "orders" not in admin.list_topics(), 10, 0.05, "orders to disappear from metadata")
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.delete_topics(["orders"])


def test_describe_configs_for_topic_and_broker(broker, admin):
    admin.create_topics([NewTopic("configured", 1, 1, topic_configs={"retention.ms": "123456"})])
    result = admin.describe_configs([
        ConfigResource(ConfigResourceType.TOPIC, "configured"),
        ConfigResource(ConfigResourceType.BROKER, str(broker.config.node_id)),
    ], config_filter="all")
    text = repr(result)
    assert "123456" in text and "cleanup.policy" in text and "num.partitions" in text
    cluster = admin.describe_cluster()
    assert cluster["controller_id"] == broker.config.node_id
    assert [(b["broker_id"], b["port"]) for b in cluster["brokers"]] == [(broker.config.node_id, broker.port)]


def test_list_offsets_earliest_latest_and_by_timestamp(broker, raw_client):
    topic = "timed"
    base_ts = 1_700_000_000_000
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=0)
    for i in range(50):
        producer.send(topic, value=f"{i}".encode(), partition=0, timestamp_ms=base_ts + i * 1000).get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        tp = TopicPartition(topic, 0)
        assert consumer.beginning_offsets([tp]) == {tp: 0}
        assert consumer.end_offsets([tp]) == {tp: 50}
        found = consumer.offsets_for_times({tp: base_ts + 20_500})[tp]
        assert (found.offset, found.timestamp) == (21, base_ts + 21_000)
        assert consumer.offsets_for_times({tp: base_ts})[tp].offset == 0
        assert consumer.offsets_for_times({tp: base_ts + 10**9})[tp] is None
    finally:
        consumer.close()
    late = KafkaProducer(bootstrap_servers=broker.bootstrap, acks=1)
    late.send(topic, value=b"late", partition=0, timestamp_ms=base_ts - 5000).get(timeout=10)  # offset 50, older
    late.close()
    T = ListOffsetsRequest.ListOffsetsTopic
    request = ListOffsetsRequest(replica_id=-1, isolation_level=0, topics=[T(name=topic, partitions=[
        T.ListOffsetsPartition(partition_index=0, current_leader_epoch=-1, timestamp=-3)])])
    part = raw_client().request(request, 7).topics[0].partitions[0]
    assert (part.error_code, part.offset, part.timestamp) == (0, 49, base_ts + 49_000)  # KIP-734 max timestamp


def test_metadata_without_auto_create_reports_unknown_topic(broker, raw_client):
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, allow_auto_create_topics=False)
    try:
        assert not consumer.partitions_for_topic("never-created")
    finally:
        consumer.close()
    assert "never-created" not in broker.broker.logs.topics()
    request = MetadataRequest(topics=[MetadataRequest.MetadataRequestTopic(name="never-created")],
                              allow_auto_topic_creation=False)
    topic = raw_client().request(request, 12).topics[0]
    assert (topic.name, topic.error_code, topic.partitions) == ("never-created", ec.UNKNOWN_TOPIC_OR_PARTITION, [])
    request.allow_auto_topic_creation = True
    created = raw_client().request(request, 12).topics[0]
    assert created.error_code == 0 and len(created.partitions) == broker.config.default_partitions
    assert all(p.leader_id == broker.config.node_id for p in created.partitions)


def test_librdkafka_admin_client(broker):
    ck_admin = pytest.importorskip("confluent_kafka.admin")
    admin = ck_admin.AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([ck_admin.NewTopic("ck-a", 4, 1), ck_admin.NewTopic("ck-b", 2, 1)]).values():
        assert future.result(10) is None
    with pytest.raises(Exception, match="already exists"):
        admin.create_topics([ck_admin.NewTopic("ck-a", 1, 1)])["ck-a"].result(10)
    listed = admin.list_topics(timeout=10).topics
    assert {t: len(m.partitions) for t, m in listed.items() if t.startswith("ck-")} == {"ck-a": 4, "ck-b": 2}
    resource = ck_admin.ConfigResource("topic", "ck-a")
    configs = admin.describe_configs([resource])[resource].result(10)
    assert configs["cleanup.policy"].value == "delete"
    assert admin.delete_topics(["ck-b"])["ck-b"].result(10) is None
    assert "ck-b" not in broker.broker.logs.topics()
