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

from typing import Any

from streams.contracts import EVENT_TOPICS, encode, topic_for
from streams.dlq import dlq_topic
from streams.joiner.changelog import HEADER_TAG, TOPIC_STORE_CHANGELOG, marker_key, parse_tag
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


def owned_topics() -> list[str]:
    """:func:`output_topics` and the store changelog: the joiner writes partition p's records of
    each to partition p."""
    return [*output_topics(), TOPIC_STORE_CHANGELOG]


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


def per_record(send):
    """``send_many`` over a per-record ``send(topic, key, value, partition, headers)``: each record
    is its own request, so ``whole`` holds only for a single record."""
    async def send_many(topic: str, partition: int, records, whole: bool = False) -> list[tuple[Any, int]] | None:
        if whole and len(records) != 1:
            return None
        return [(await send(topic, key, value, partition, headers), 1) for key, value, headers in records]
    return send_many


async def produce(send, p: int, ledger: OutputLedger, records: list[Record], send_many=None) -> None:
    """Produce ``records`` to partition ``p`` (those the ledger does not suppress), wait for every
    ack and record the end offsets in ``ledger``.

    ``send_many(topic, partition, [(key, value, headers)])`` produces one topic's records in a few
    record batches and returns ``[(ack awaitable, n records)]``; without it, ``send`` per record
    (:func:`per_record`)."""
    send_many = send_many or per_record(send)
    by_topic: dict[str, list[tuple[bytes | None, bytes, Any]]] = {}
    for topic, key, value, headers in records:
        if ledger.should_send(topic, value):
            by_topic.setdefault(topic, []).append((key, value, headers))
    futures = [(topic, fut, n) for topic, recs in by_topic.items() for fut, n in await send_many(topic, p, recs)]
    for topic, fut, n in futures:
        meta = await fut
        ledger.record(topic, meta.offset + n)


SEND_BATCH_BYTES = 1 << 20  # the record batches of ``batch_sender`` in the worker


async def produce_changelog(send, p: int, tag: bytes, changes, send_many=None) -> int:
    """Produce one commit's records and its marker; returns the offset after the marker.

    The marker completes the commit for a restore (``ChangelogIndex``), so it must not land unless
    every record of the commit did. Kafka appends one record batch whole or not at all, but two
    batches independently: when a commit's records are split over several, the first can fail
    (too large, expired) while a later one, the marker's, is still sent. So a commit that fits one
    record batch of ``send_many`` (asked with ``whole=True``: it sends nothing when they do not fit)
    goes as one batch with its marker; any other is produced and acked first, and the marker
    follows alone (one more round trip)."""
    headers = [(HEADER_TAG, tag)]
    records = [(k, v, headers) for k, v in changes]
    marker = (marker_key(parse_tag(tag)[0]), tag, headers)
    send_many = send_many or per_record(send)
    whole = await send_many(TOPIC_STORE_CHANGELOG, p, [*records, marker], whole=True)
    if whole is not None:
        ((fut, n),) = whole
        return (await fut).offset + n
    for fut, _ in await send_many(TOPIC_STORE_CHANGELOG, p, records):
        await fut  # raises when a record did not land: the marker is then never sent
    ((fut, n),) = await send_many(TOPIC_STORE_CHANGELOG, p, [marker])
    return (await fut).offset + n


def batch_sender(producer, max_batch_bytes: int):
    """``send_many`` over an aiokafka producer: one topic partition's records appended to record
    batches of up to ``max_batch_bytes`` (an empty batch takes any record, so a larger record goes
    alone in one), each submitted with one call; returns ``[(ack future, n records)]``, the ack carrying the batch's
    base offset. With ``whole=True`` the records go only if they fit one batch: else nothing is
    sent and it returns None."""
    from aiokafka.producer.message_accumulator import BatchBuilder

    codec = producer._compression_type  # the producer's codec name, None: none
    compression = producer._COMPRESSORS[codec][1] if codec else 0

    async def send_many(topic: str, partition: int, records, whole: bool = False) -> list[tuple[Any, int]] | None:
        batches = []
        i, n = 0, len(records)
        while i < n:
            builder = BatchBuilder(max_batch_bytes, compression)
            start = i
            while i < n:
                key, value, headers = records[i]
                if builder.append(timestamp=None, key=key, value=value, headers=headers or []) is None:
                    break
                i += 1
            if whole and i < n:
                return None
            builder.close()
            batches.append((builder, i - start))
        return [(await producer.send_batch(builder, topic, partition=partition), k) for builder, k in batches]
    return send_many
