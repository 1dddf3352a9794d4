"""Produce and InitProducerId.

The hot path reads only the 61-byte header of each incoming record batch (producer id, epoch,
sequence, record count) and hands the raw bytes to the partition log, which validates framing and
assigns offsets. The append (write() done) completes before the response is encoded, so every
acknowledged batch is in the log.
"""
from __future__ import annotations

import logging

from kafka.protocol.producer import InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse

from streams.broker import error_codes as ec
from streams.broker.producers import BATCH_HEADER, BATCH_HEADER_BYTES
from streams.broker.server import Broker, CloseConnection, HandlerTable, RequestContext

logger = logging.getLogger(__name__)

_MAGIC_V2 = 2
_TopicResp = ProduceResponse.TopicProduceResponse
_PartResp = _TopicResp.PartitionProduceResponse


async def handle_produce(ctx: RequestContext, request: ProduceRequest) -> ProduceResponse | None:
    broker = ctx.broker
    acks = request.acks
    topics = broker.logs.topics()
    responses = []
    for topic_data in request.topic_data:
        name = topic_data.name
        n_partitions = topics.get(name)
        parts = []
        for pd in topic_data.partition_data:
            if acks not in (0, 1, -1):
                parts.append(_PartResp(index=pd.index, error_code=ec.INVALID_REQUIRED_ACKS, base_offset=-1))
            elif n_partitions is None or not 0 <= pd.index < n_partitions:
                parts.append(_PartResp(index=pd.index, error_code=ec.UNKNOWN_TOPIC_OR_PARTITION, base_offset=-1))
            else:
                parts.append(_append(broker, name, pd.index, pd.records))
        responses.append(_TopicResp(name=name, partition_responses=parts))
    if acks == 0:
        failed = [(t.name, p.index, p.error_code) for t in responses for p in t.partition_responses if p.error_code]
        if failed:
            raise CloseConnection(f"acks=0 produce failed partitions={failed[:5]}")
        return None
    return ProduceResponse(responses=responses, throttle_time_ms=0)


def _append(broker: Broker, topic: str, partition: int, data: bytes | None) -> _PartResp:
    from streams.broker.records import CorruptRecordError

    if not data or len(data) < BATCH_HEADER_BYTES:
        return _PartResp(index=partition, error_code=ec.CORRUPT_MESSAGE, base_offset=-1)
    (_, length, _, magic, _, _, last_delta, _, _, pid, epoch, first_seq, _) = BATCH_HEADER.unpack_from(data, 0)
    if magic != _MAGIC_V2:
        return _PartResp(index=partition, error_code=ec.UNSUPPORTED_FOR_MESSAGE_FORMAT, base_offset=-1)
    if len(data) > 12 + length:  # Produce v3+ carries exactly one batch per partition
        return _PartResp(index=partition, error_code=ec.INVALID_RECORD, base_offset=-1,
                         error_message="a produce request must hold exactly one record batch per partition")
    producers = broker.producers
    log = broker.logs.get(topic, partition)
    n_records = last_delta + 1
    if pid >= 0:
        verdict = producers.check(topic, partition, log, pid, epoch, first_seq, n_records)
        if verdict.duplicate_of is not None:
            return _ok(log, partition, verdict.duplicate_of)
        if verdict.error != ec.NONE:
            return _PartResp(index=partition, error_code=verdict.error, base_offset=-1)
    try:
        base_offset = log.append(data)
    except CorruptRecordError as exc:
        logger.debug("corrupt batch rejected topic=%s partition=%d error=%s", topic, partition, exc)
        return _PartResp(index=partition, error_code=ec.CORRUPT_MESSAGE, base_offset=-1, error_message=str(exc))
    except OSError:
        logger.exception("append failed topic=%s partition=%d", topic, partition)
        return _PartResp(index=partition, error_code=ec.KAFKA_STORAGE_ERROR, base_offset=-1)
    if pid >= 0:
        producers.record(topic, partition, pid, epoch, first_seq, n_records, base_offset)
    broker.notify_append(topic, partition)
    return _ok(log, partition, base_offset)


def _ok(log, partition: int, base_offset: int) -> _PartResp:
    return _PartResp(
        index=partition, error_code=ec.NONE, base_offset=base_offset, log_append_time_ms=-1,
        log_start_offset=log.log_start_offset,
    )


async def handle_init_producer_id(ctx: RequestContext, request: InitProducerIdRequest) -> InitProducerIdResponse:
    producers = ctx.broker.producers
    pid, epoch = request.producer_id, request.producer_epoch
    if ctx.api_version >= 3 and pid >= 0 and 0 <= epoch < 32766:
        new_pid, new_epoch = pid, epoch + 1  # epoch bump of a known producer (KIP-360)
    else:
        new_pid, new_epoch = producers.next_producer_id(), 0
    return InitProducerIdResponse(throttle_time_ms=0, error_code=ec.NONE, producer_id=new_pid, producer_epoch=new_epoch)


HANDLERS: HandlerTable = {
    ProduceRequest.API_KEY: (handle_produce, 3, 12),
    InitProducerIdRequest.API_KEY: (handle_init_producer_id, 0, 5),
}
