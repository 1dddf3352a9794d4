"""Where the joiner's outputs go and how they are produced: topic names, the records of one step
of a partition, and the produce calls (outputs, then the store changelog) with their acks.

Every output goes to the source's partition: ``samples``, ``<topic>.late``, ``joiner.orphans``,
``<topic>.dlq``, ``joiner.dwell`` (each created with the event topics' partition count). A dead
letter keeps its key and bytes with ``reason`` and ``source.*`` headers; late events and orphans
carry a ``reason`` header.

>>> late_topic("clicks")
'clicks.late'
"""
from __future__ import annotations

import time
from typing import Any

from streams.contracts import EVENT_TOPICS, encode, topic_for
from streams.dlq import dlq_topic
from streams.joiner.changelog import HEADER_TAG, TOPIC_STORE_CHANGELOG, marker_key
from streams.joiner.pipeline import PipelineOutput
from streams.joiner.shared import TOPIC_DWELL_STATS
from streams.joiner.state import Entry, OutputLedger
from streams.samples import TOPIC_SAMPLES

TOPIC_ORPHANS = "joiner.orphans"
LATE_SUFFIX = ".late"
#: (topic, key, value, headers) of one output message
Record = tuple[str, bytes | None, bytes, Any]


def late_topic(topic: str) -> str:
    return topic + LATE_SUFFIX


def output_topics() -> list[str]:
    """Every topic the joiner writes, each with as many partitions as the event topics."""
    return [TOPIC_SAMPLES, TOPIC_ORPHANS, *map(late_topic, EVENT_TOPICS), *map(dlq_topic, EVENT_TOPICS),
            TOPIC_DWELL_STATS]


def dead_letter_record(p: int, e: Entry) -> Record:
    """The ``<topic>.dlq`` record of an undecodable message of partition ``p``."""
    headers = [("reason", e.reason.encode()), ("source.topic", e.topic.encode()),
               ("source.partition", str(p).encode()), ("source.offset", str(e.offset).encode())]
    return dlq_topic(e.topic), e.key, e.value if e.value is not None else b"", headers


def output_records(p: int, out: PipelineOutput) -> list[Record]:
    """The records of what partition ``p``'s pipeline produced in one step."""
    records: list[Record] = [(TOPIC_SAMPLES, k, v, h) for k, v, h in zip(out.keys, out.samples, out.headers)]
    records += [(TOPIC_DWELL_STATS, str(p).encode(), v, None) for v in out.stats]
    records += [(late_topic(topic_for(x.event)), str(x.event.user_id).encode(), encode(x.event),
                 [("reason", x.reason.encode())]) for x in out.late]
    records += [(TOPIC_ORPHANS, str(x.event.user_id).encode(), encode(x.event),
                 [("reason", x.reason.encode()), ("source.topic", topic_for(x.event).encode())])
                for x in out.orphans]
    return records


async def produce(send, p: int, ledger: OutputLedger, records: list[Record]) -> None:
    """Produce ``records`` to partition ``p`` (those the ledger does not suppress), wait for every
    ack and record the end offsets in ``ledger``."""
    futures = []
    for topic, key, value, headers in records:
        if ledger.should_send(topic, value):
            futures.append((topic, await send(topic, key, value, p, headers)))
    for topic, fut in futures:
        meta = await fut
        ledger.record(topic, meta.offset + 1)


async def produce_changelog(send, p: int, tag: bytes, changes) -> int:
    """Produce one commit's records and its marker; returns the offset after the marker."""
    headers = [(HEADER_TAG, tag)]
    futures = [await send(TOPIC_STORE_CHANGELOG, k, v, p, headers) for k, v in changes]
    futures.append(await send(TOPIC_STORE_CHANGELOG, marker_key(tag), b"", p, headers))
    meta = None
    for fut in futures:
        meta = await fut
    return meta.offset + 1


def output_reader(bootstrap: str):
    """``read_back(topic, partition, from_offset)``: the values of an output topic's partition from
    that offset to its current end (blocking, kafka-python), for the ledger after a restart."""
    def read_back(topic: str, partition: int, from_offset: int) -> list[bytes]:
        from kafka import KafkaConsumer, TopicPartition
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        try:
            tp = TopicPartition(topic, partition)
            end = consumer.end_offsets([tp]).get(tp, 0)
            if end <= from_offset:
                return []
            consumer.assign([tp])
            consumer.seek(tp, from_offset)
            values: list[bytes] = []
            deadline = time.monotonic() + 60
            while consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading back {topic}[{partition}] from {from_offset} to {end}")
                for recs in consumer.poll(timeout_ms=200).values():
                    values += [r.value for r in recs if r.offset < end]
            return values
        finally:
            consumer.close()
    return read_back
