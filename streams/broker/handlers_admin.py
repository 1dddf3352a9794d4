"""Admin APIs: CreateTopics, DeleteTopics, DescribeConfigs, DescribeCluster.

Topic configs are whatever the log layer keeps for a topic; DescribeConfigs reports them over the
broker's defaults (from ``LogConfig``) under their Apache Kafka names. CreateTopics refuses more
than ``MAX_PARTITIONS_PER_TOPIC`` partitions (INVALID_PARTITIONS) and answers a create that failed
on the disk or the open-files limit with KAFKA_STORAGE_ERROR; such a create leaves nothing behind.
"""
from __future__ import annotations

import logging
import re
import uuid

from kafka.protocol.admin import (
    CreateTopicsRequest,
    CreateTopicsResponse,
    DeleteTopicsRequest,
    DeleteTopicsResponse,
    DescribeClusterRequest,
    DescribeClusterResponse,
    DescribeConfigsRequest,
    DescribeConfigsResponse,
)

from streams.broker import error_codes as ec
from streams.broker.config import MAX_PARTITIONS_PER_TOPIC
from streams.broker.log_manager import TopicStorageError
from streams.broker.server import Broker, HandlerTable, RequestContext

logger = logging.getLogger(__name__)

_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_TOPIC_ID_NAMESPACE = uuid.UUID("6f1c3d1e-5b7a-4c55-9c1e-2f3a8b9d0e11")
RESOURCE_TOPIC = 2
RESOURCE_BROKER = 4
SOURCE_TOPIC = 1
SOURCE_STATIC_BROKER = 4
SOURCE_DEFAULT = 5


def topic_uuid(name: str) -> uuid.UUID:
    """A stable non-zero topic id derived from the name (this broker addresses topics by name)."""
    return uuid.uuid5(_TOPIC_ID_NAMESPACE, name)


def topic_name_problem(name: str | None) -> str | None:
    """Why ``name`` is not a legal Kafka topic name, or None when it is."""
    if not name:
        return "topic name is empty"
    if name in (".", ".."):
        return f"topic name {name!r} is not allowed"
    if not _TOPIC_NAME.fullmatch(name):
        return f"topic name {name!r} must be 1..249 characters of [a-zA-Z0-9._-]"
    return None


async def handle_create_topics(ctx: RequestContext, request: CreateTopicsRequest) -> CreateTopicsResponse:
    from streams.broker.log import InvalidConfigError, InvalidTopicError, TopicExistsError

    broker = ctx.broker
    Result = CreateTopicsResponse.CreatableTopicResult
    counts: dict[str, int] = {}
    for t in request.topics:
        counts[t.name] = counts.get(t.name, 0) + 1
    results = []
    answered: set[str] = set()
    for t in request.topics:
        name = t.name
        if name in answered:
            continue  # a duplicated name gets one result (INVALID_REQUEST), as Kafka answers
        answered.add(name)
        n_partitions = len(t.assignments) if t.assignments else t.num_partitions
        if n_partitions == -1:
            n_partitions = broker.config.default_partitions
        configs = {c.name: c.value for c in t.configs if c.value is not None}  # null = the default
        error, message = ec.NONE, None
        if counts[name] > 1:
            error, message = ec.INVALID_REQUEST, f"topic {name!r} appears {counts[name]} times in the request"
        elif (problem := topic_name_problem(name)) is not None:
            error, message = ec.INVALID_TOPIC_EXCEPTION, problem
        elif n_partitions < 1:
            error, message = ec.INVALID_PARTITIONS, f"num_partitions={t.num_partitions} must be -1 or > 0"
        elif n_partitions > MAX_PARTITIONS_PER_TOPIC:
            error, message = ec.INVALID_PARTITIONS, (
                f"num_partitions={n_partitions} is more than this broker's {MAX_PARTITIONS_PER_TOPIC} per topic"
            )
        elif t.replication_factor not in (-1, 1):
            error, message = ec.INVALID_REPLICATION_FACTOR, (
                f"replication_factor={t.replication_factor} larger than the 1 available broker"
            )
        elif name in broker.logs.topics():
            error, message = ec.TOPIC_ALREADY_EXISTS, f"topic {name!r} already exists"
        elif (problem := _config_problem(broker, configs)) is not None:
            error, message = ec.INVALID_CONFIG, problem
        elif not request.validate_only:
            try:
                broker.logs.create_topic(name, n_partitions, configs)
            except TopicExistsError:
                error, message = ec.TOPIC_ALREADY_EXISTS, f"topic {name!r} already exists"
            except InvalidTopicError as exc:
                error, message = ec.INVALID_TOPIC_EXCEPTION, str(exc)
            except TopicStorageError as exc:
                error, message = ec.KAFKA_STORAGE_ERROR, f"topic {name!r} could not be created: {exc}"
            except (InvalidConfigError, ValueError) as exc:
                error, message = ec.INVALID_CONFIG, str(exc)
        ok = error == ec.NONE
        results.append(Result(
            name=name, topic_id=topic_uuid(name) if ok else None, error_code=error, error_message=message,
            num_partitions=n_partitions if ok else -1, replication_factor=1 if ok else -1,
            configs=[
                Result.CreatableTopicConfigs(name=k, value=v, read_only=False, config_source=s, is_sensitive=False)
                for k, (v, s) in _topic_config_values(broker, configs).items()
            ] if ok else [],
        ))
    return CreateTopicsResponse(throttle_time_ms=0, topics=results)


async def handle_delete_topics(ctx: RequestContext, request: DeleteTopicsRequest) -> DeleteTopicsResponse:
    from streams.broker.log import UnknownTopicError

    broker = ctx.broker
    Result = DeleteTopicsResponse.DeletableTopicResult
    if ctx.api_version >= 6:
        wanted = [(t.name, t.topic_id) for t in request.topics]
    else:
        wanted = [(n, None) for n in request.topic_names]
    results = []
    for name, topic_id in wanted:
        if name is None:
            by_id = {topic_uuid(n): n for n in broker.logs.topics()}
            name = by_id.get(topic_id)
            if name is None:
                results.append(Result(name=None, topic_id=topic_id, error_code=ec.UNKNOWN_TOPIC_ID,
                                      error_message=f"no topic with id {topic_id}"))
                continue
        try:
            broker.logs.delete_topic(name)
        except UnknownTopicError:
            results.append(Result(name=name, topic_id=topic_id, error_code=ec.UNKNOWN_TOPIC_OR_PARTITION,
                                  error_message=f"topic {name!r} does not exist"))
            continue
        broker.producers.forget_topic(name)
        results.append(Result(name=name, topic_id=topic_uuid(name), error_code=ec.NONE, error_message=None))
    return DeleteTopicsResponse(throttle_time_ms=0, responses=results)


def _config_problem(broker: Broker, configs: dict[str, str]) -> str | None:
    from streams.broker.log import InvalidConfigError, topic_log_config

    try:
        topic_log_config(broker.config.log, configs)
    except InvalidConfigError as exc:
        return str(exc)
    return None


def _topic_defaults(broker: Broker) -> dict[str, str]:
    log = broker.config.log
    return {
        "cleanup.policy": "delete",
        "compression.type": "producer",
        "retention.ms": str(log.retention_ms),
        "retention.bytes": str(log.retention_bytes),
        "segment.bytes": str(log.segment_bytes),
        "index.interval.bytes": str(log.index_interval_bytes),
        "flush.ms": str(log.fsync_interval_ms) if log.fsync == "interval" else ("0" if log.fsync == "always" else "9223372036854775807"),
        "max.message.bytes": str(broker.config.max_request_bytes),
        "message.timestamp.type": "CreateTime",
        "min.insync.replicas": "1",
    }


def _topic_config_values(broker: Broker, overrides: dict[str, str]) -> dict[str, tuple[str, int]]:
    values = {k: (v, SOURCE_DEFAULT) for k, v in _topic_defaults(broker).items()}
    values.update({k: (str(v), SOURCE_TOPIC) for k, v in overrides.items()})
    return values


def _broker_config_values(broker: Broker) -> dict[str, tuple[str, int]]:
    cfg = broker.config
    static = {
        "broker.id": str(cfg.node_id),
        "node.id": str(cfg.node_id),
        "num.partitions": str(cfg.default_partitions),
        "auto.create.topics.enable": str(cfg.auto_create_topics).lower(),
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "message.max.bytes": str(cfg.max_request_bytes),
        "socket.request.max.bytes": str(cfg.max_request_bytes),
        "log.retention.ms": str(cfg.log.retention_ms),
        "log.retention.bytes": str(cfg.log.retention_bytes),
        "log.segment.bytes": str(cfg.log.segment_bytes),
        "log.dirs": str(cfg.data_dir),
        "group.min.session.timeout.ms": str(cfg.groups.min_session_timeout_ms),
        "group.max.session.timeout.ms": str(cfg.groups.max_session_timeout_ms),
        "group.initial.rebalance.delay.ms": str(cfg.groups.initial_rebalance_delay_ms),
    }
    return {k: (v, SOURCE_STATIC_BROKER) for k, v in static.items()}


async def handle_describe_configs(ctx: RequestContext, request: DescribeConfigsRequest) -> DescribeConfigsResponse:
    broker = ctx.broker
    Result = DescribeConfigsResponse.DescribeConfigsResult
    Entry = Result.DescribeConfigsResourceResult
    results = []
    for res in request.resources:
        error, message, values = ec.NONE, None, {}
        if res.resource_type == RESOURCE_TOPIC:
            if res.resource_name in broker.logs.topics():
                values = _topic_config_values(broker, dict(broker.logs.topic_configs(res.resource_name) or {}))
            else:
                error, message = ec.UNKNOWN_TOPIC_OR_PARTITION, f"topic {res.resource_name!r} does not exist"
        elif res.resource_type == RESOURCE_BROKER:
            if res.resource_name in ("", str(broker.node_id)):
                values = _broker_config_values(broker)
            else:
                error, message = ec.INVALID_REQUEST, f"broker {res.resource_name!r} is not node {broker.node_id}"
        else:
            error, message = ec.INVALID_REQUEST, f"resource_type={res.resource_type} is not supported"
        keys = res.configuration_keys
        if keys is not None:
            values = {k: v for k, v in values.items() if k in keys}
        results.append(Result(
            error_code=error, error_message=message, resource_type=res.resource_type, resource_name=res.resource_name,
            configs=[
                Entry(name=k, value=v, read_only=s != SOURCE_TOPIC, config_source=s, is_default=s == SOURCE_DEFAULT,
                      is_sensitive=False, synonyms=[], config_type=0, documentation=None)
                for k, (v, s) in sorted(values.items())
            ],
        ))
    return DescribeConfigsResponse(throttle_time_ms=0, results=results)


async def handle_describe_cluster(ctx: RequestContext, request: DescribeClusterRequest) -> DescribeClusterResponse:
    broker = ctx.broker
    return DescribeClusterResponse(
        throttle_time_ms=0, error_code=ec.NONE, error_message=None, endpoint_type=1, cluster_id=broker.cluster_id,
        controller_id=broker.node_id,
        brokers=[DescribeClusterResponse.DescribeClusterBroker(
            broker_id=broker.node_id, host=broker.advertised_host, port=broker.port, rack=None, is_fenced=False,
        )],
    )


HANDLERS: HandlerTable = {
    CreateTopicsRequest.API_KEY: (handle_create_topics, 2, 7),
    DeleteTopicsRequest.API_KEY: (handle_delete_topics, 1, 6),
    DescribeConfigsRequest.API_KEY: (handle_describe_configs, 1, 4),
    DescribeClusterRequest.API_KEY: (handle_describe_cluster, 0, 1),
}
