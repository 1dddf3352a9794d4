"""Data-plane request table of the broker: ApiVersions and Metadata here, the rest merged in.

``HANDLERS`` maps api_key -> (handler, min_version, max_version) for every data-plane API:
ApiVersions and Metadata (this module), Produce and InitProducerId (``handlers_produce``), Fetch,
ListOffsets and OffsetForLeaderEpoch (``handlers_fetch``), CreateTopics, DeleteTopics,
DescribeConfigs and DescribeCluster (``handlers_admin``). CreatePartitions is not served. Version
ranges stop where a protocol version starts addressing topics by id only (Produce v13, Fetch v13).
A topic that Metadata auto-creates but cannot be created on disk (e.g. too many open files) is
answered with KAFKA_STORAGE_ERROR, and one over the partition cap with INVALID_PARTITIONS.
"""
from __future__ import annotations

import logging
import uuid

from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse

from streams.broker import error_codes as ec
from streams.broker import handlers_admin, handlers_fetch, handlers_produce
from streams.broker.server import Broker, HandlerTable, RequestContext

logger = logging.getLogger(__name__)

LEADER_EPOCH = 0  # one node that never changes leadership: epoch 0 forever
_ZERO_UUID = uuid.UUID(int=0)


async def handle_api_versions(ctx: RequestContext, request: ApiVersionsRequest) -> ApiVersionsResponse:
    return api_versions_response(ctx.broker)


def api_versions_response(broker: Broker, error_code: int = ec.NONE) -> ApiVersionsResponse:
    """Every API this broker serves with its version range (also sent with UNSUPPORTED_VERSION)."""
    keys = [
        ApiVersionsResponse.ApiVersion(api_key=key, min_version=lo, max_version=hi)
        for key, (_handler, lo, hi) in sorted(broker.handlers.items())
    ]
    return ApiVersionsResponse(error_code=error_code, api_keys=keys, throttle_time_ms=0)


async def handle_metadata(ctx: RequestContext, request: MetadataRequest) -> MetadataResponse:
    broker = ctx.broker
    logs = broker.logs
    existing = logs.topics()
    if request.topics is None or (ctx.api_version == 0 and not request.topics):
        wanted: list[str | None] = sorted(existing)
    else:
        wanted = [t.name for t in request.topics]
    allow_create = broker.config.auto_create_topics and (ctx.api_version < 4 or request.allow_auto_topic_creation)
    R = MetadataResponse
    topics = []
    for name in wanted:
        if name is None:
            topics.append(R.MetadataResponseTopic(error_code=ec.UNKNOWN_TOPIC_ID, name=None, partitions=[]))
            continue
        n_partitions = existing.get(name)
        error = ec.NONE
        if n_partitions is None:
            n_partitions, error = _auto_create(broker, name) if allow_create else (0, ec.UNKNOWN_TOPIC_OR_PARTITION)
        topics.append(topic_metadata(broker, name, n_partitions, error))
    return R(
        throttle_time_ms=0,
        brokers=[R.MetadataResponseBroker(node_id=broker.node_id, host=broker.advertised_host, port=broker.port, rack=None)],
        cluster_id=broker.cluster_id,
        controller_id=broker.node_id,
        topics=topics,
        error_code=ec.NONE,
    )


def topic_metadata(broker: Broker, name: str, n_partitions: int, error: int) -> MetadataResponse.MetadataResponseTopic:
    R = MetadataResponse
    node = [broker.node_id]
    partitions = [
        R.MetadataResponseTopic.MetadataResponsePartition(
            error_code=ec.NONE, partition_index=i, leader_id=broker.node_id, leader_epoch=LEADER_EPOCH,
            replica_nodes=node, isr_nodes=node, offline_replicas=[],
        )
        for i in range(n_partitions)
    ]
    return R.MetadataResponseTopic(
        error_code=error, name=name, topic_id=handlers_admin.topic_uuid(name) if error == ec.NONE else _ZERO_UUID,
        is_internal=False, partitions=partitions,
    )


def _auto_create(broker: Broker, name: str) -> tuple[int, int]:
    from streams.broker.log import InvalidTopicError, TopicExistsError
    from streams.broker.log_manager import TopicStorageError

    n_partitions = broker.config.default_partitions
    try:
        broker.logs.create_topic(name, n_partitions, {})
    except TopicExistsError:
        return broker.logs.topics().get(name, 0), ec.NONE
    except InvalidTopicError:
        return 0, ec.INVALID_TOPIC_EXCEPTION
    except TopicStorageError as exc:
        logger.warning("topic auto-create failed topic=%s partitions=%d error=%s", name, n_partitions, exc)
        return 0, ec.KAFKA_STORAGE_ERROR
    logger.info("topic auto-created topic=%s partitions=%d client_request=metadata", name, n_partitions)
    return n_partitions, ec.NONE


HANDLERS: HandlerTable = {
    ApiVersionsRequest.API_KEY: (handle_api_versions, 0, 4),
    MetadataRequest.API_KEY: (handle_metadata, 0, 12),
    **handlers_produce.HANDLERS,
    **handlers_fetch.HANDLERS,
    **handlers_admin.HANDLERS,
}
