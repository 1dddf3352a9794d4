"""Fetch (with long poll), ListOffsets and OffsetForLeaderEpoch.

Fetch returns whole stored batches as they lie in the log. When fewer than ``min_bytes`` are
available it waits on the broker's append notifications for the requested partitions until
``max_wait_ms`` passes, then reads again. Incremental fetch sessions are declined by answering
session id 0, which makes clients send full fetch requests.

A response carries at most the broker's ``fetch_max_bytes`` of records (plus one oversized batch,
KIP-74), whatever ``max_bytes`` the request names. A partition named more than once is read only
for its first appearance; the repeats are answered with no records. A negative
``partition_max_bytes`` counts as 0 (at most one batch).
"""
from __future__ import annotations

import asyncio
import logging

from kafka.protocol.consumer import (
    FetchRequest,
    FetchResponse,
    ListOffsetsRequest,
    ListOffsetsResponse,
    OffsetForLeaderEpochRequest,
    OffsetForLeaderEpochResponse,
)

from streams.broker import error_codes as ec
from streams.broker.server import Broker, HandlerTable, RequestContext

logger = logging.getLogger(__name__)

LEADER_EPOCH = 0
_INT32_MAX = (1 << 31) - 1
_TopicData = FetchResponse.FetchableTopicResponse
_PartData = _TopicData.PartitionData


async def handle_fetch(ctx: RequestContext, request: FetchRequest) -> FetchResponse:
    broker = ctx.broker
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(request.max_wait_ms, 0) / 1000.0
    asked = request.max_bytes if ctx.api_version >= 3 and request.max_bytes > 0 else _INT32_MAX
    max_bytes = min(asked, broker.config.fetch_max_bytes)
    keys = [(t.topic, p.partition) for t in request.topics for p in t.partitions]
    while True:
        responses, n_bytes, has_error = _read_all(broker, request, max_bytes)
        if n_bytes >= request.min_bytes or has_error or not keys:
            break
        if not await broker.wait_for_append(keys, deadline - loop.time()):
            break
    return FetchResponse(throttle_time_ms=0, error_code=ec.NONE, session_id=0, responses=responses)


def _read_all(broker: Broker, request: FetchRequest, max_bytes: int) -> tuple[list[_TopicData], int, bool]:
    from streams.broker.log import LogClosedError, OffsetOutOfRangeError
    from streams.broker.records import CorruptRecordError

    logs = broker.logs
    topics = logs.topics()
    remaining = max_bytes
    total = 0
    has_error = False
    out = []
    seen: set[tuple[str, int]] = set()  # a repeated partition would multiply the response
    for fetch_topic in request.topics:
        name = fetch_topic.topic
        n_partitions = topics.get(name)
        parts = []
        for fp in fetch_topic.partitions:
            index = fp.partition
            if n_partitions is None or not 0 <= index < n_partitions:
                parts.append(_error_part(index, ec.UNKNOWN_TOPIC_OR_PARTITION))
                has_error = True
                continue
            log = logs.get(name, index)
            end = log.log_end_offset
            start = log.log_start_offset
            offset = fp.fetch_offset
            records = b""
            error = ec.NONE
            if offset < start or offset > end:
                error = ec.OFFSET_OUT_OF_RANGE
            elif offset < end and remaining > 0 and (name, index) not in seen:
                seen.add((name, index))
                try:
                    records = log.read(offset, max(0, min(fp.partition_max_bytes, remaining)))
                except OffsetOutOfRangeError:
                    error = ec.OFFSET_OUT_OF_RANGE
                except LogClosedError:  # the topic was deleted while this fetch waited
                    error = ec.UNKNOWN_TOPIC_OR_PARTITION
                except CorruptRecordError as exc:  # a damaged closed segment: say so, keep serving
                    logger.error("fetch read failed topic=%s partition=%d offset=%d error=%s",
                                 name, index, offset, exc)
                    error = ec.KAFKA_STORAGE_ERROR
                remaining -= len(records)
                total += len(records)
            has_error = has_error or error != ec.NONE
            parts.append(_PartData(
                partition_index=index, error_code=error, high_watermark=end, last_stable_offset=end,
                log_start_offset=start, aborted_transactions=None, preferred_read_replica=-1, records=records,
            ))
        out.append(_TopicData(topic=name, partitions=parts))
    return out, total, has_error


def _error_part(index: int, error: int) -> _PartData:
    return _PartData(
        partition_index=index, error_code=error, high_watermark=-1, last_stable_offset=-1, log_start_offset=-1,
        aborted_transactions=None, preferred_read_replica=-1, records=b"",
    )


async def handle_list_offsets(ctx: RequestContext, request: ListOffsetsRequest) -> ListOffsetsResponse:
    logs = ctx.broker.logs
    topics = logs.topics()
    TopicResp = ListOffsetsResponse.ListOffsetsTopicResponse
    PartResp = TopicResp.ListOffsetsPartitionResponse
    out = []
    for topic in request.topics:
        n_partitions = topics.get(topic.name)
        parts = []
        for p in topic.partitions:
            index = p.partition_index
            if n_partitions is None or not 0 <= index < n_partitions:
                parts.append(PartResp(partition_index=index, error_code=ec.UNKNOWN_TOPIC_OR_PARTITION))
                continue
            offset, ts = _lookup_offset(logs.get(topic.name, index), p.timestamp)
            parts.append(PartResp(
                partition_index=index, error_code=ec.NONE, timestamp=ts, offset=offset,
                leader_epoch=LEADER_EPOCH if offset >= 0 else -1,
            ))
        out.append(TopicResp(name=topic.name, partitions=parts))
    return ListOffsetsResponse(throttle_time_ms=0, topics=out)


def _lookup_offset(log, spec: int) -> tuple[int, int]:
    """(offset, timestamp) for a ListOffsets spec: -1 latest, -2/-4 earliest, -3 max timestamp, >=0 by time."""
    if spec == -1:
        return log.log_end_offset, -1
    if spec in (-2, -4):
        return log.log_start_offset, -1
    if spec == -3:
        found = log.max_timestamp_offset()
        return (found[0], found[1]) if found is not None else (-1, -1)
    if spec >= 0:
        found = log.offset_for_timestamp(spec)
        return (found[0], found[1]) if found is not None else (-1, -1)
    return -1, -1


async def handle_offset_for_leader_epoch(ctx: RequestContext, request: OffsetForLeaderEpochRequest) -> OffsetForLeaderEpochResponse:
    logs = ctx.broker.logs
    topics = logs.topics()
    TopicResp = OffsetForLeaderEpochResponse.OffsetForLeaderTopicResult
    PartResp = TopicResp.EpochEndOffset
    out = []
    for topic in request.topics:
        n_partitions = topics.get(topic.topic)
        parts = []
        for p in topic.partitions:
            if n_partitions is None or not 0 <= p.partition < n_partitions:
                parts.append(PartResp(error_code=ec.UNKNOWN_TOPIC_OR_PARTITION, partition=p.partition))
            elif p.leader_epoch > LEADER_EPOCH:
                parts.append(PartResp(error_code=ec.NONE, partition=p.partition, leader_epoch=-1, end_offset=-1))
            else:
                end = logs.get(topic.topic, p.partition).log_end_offset
                parts.append(PartResp(error_code=ec.NONE, partition=p.partition, leader_epoch=LEADER_EPOCH, end_offset=end))
        out.append(TopicResp(topic=topic.topic, partitions=parts))
    return OffsetForLeaderEpochResponse(throttle_time_ms=0, topics=out)


HANDLERS: HandlerTable = {
    FetchRequest.API_KEY: (handle_fetch, 4, 12),
    ListOffsetsRequest.API_KEY: (handle_list_offsets, 1, 9),
    OffsetForLeaderEpochRequest.API_KEY: (handle_offset_for_leader_epoch, 2, 4),
}
