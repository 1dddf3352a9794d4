"""Dead-letter routing over the embedded broker, and ``streamrec tail`` on event and .dlq topics."""
from __future__ import annotations

import base64
import doctest
import json
import time
from collections import Counter, defaultdict

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

import streams.dlq as dlq_module
from streams.contracts import (
    TOPIC_IMPRESSIONS,
    Click,
    ContractError,
    Impression,
    decode,
    encode,
    key_for,
    record_dtype,
    to_records,
)
from streams.dlq import DeadLetter, DeadLetterRouter, decode_or_route, dlq_topic, is_dlq_topic
from streamrec.cli import main as cli_main

DEADLINE_S = 20.0


def _record(topic="impressions", partition=0, offset=0, key=b"1", value=b"", headers=()):
    return ConsumerRecord(topic, partition, -1, offset, 0, 0, key, value, list(headers), None, -1, -1, -1)


def test_doctests_run_and_pass():
    result = doctest.testmod(dlq_module)
    assert result.attempted >= 5 and result.failed == 0


def test_dlq_topic_names():
    assert dlq_topic("clicks") == "clicks.dlq" and is_dlq_topic("clicks.dlq") and not is_dlq_topic("clicks")
    for bad in ("", "clicks.dlq"):
        with pytest.raises(ValueError, match=repr(bad)):
            dlq_topic(bad)


def test_dead_letter_without_reason_header_is_named():
    record = _record(topic="clicks.dlq", offset=3, headers=[("source.topic", b"clicks")])
    with pytest.raises(ValueError, match="offset=3 lacks header 'reason'"):
        DeadLetter.from_record(record)


GOOD_HEADERS = [("reason", b"empty: no bytes"), ("source.topic", b"clicks"), ("source.partition", b"0"),
                ("source.offset", b"7")]


@pytest.mark.parametrize("name", ["reason", "source.topic", "source.partition", "source.offset",
                                  "source.timestamp_ms", "dlq.ts_ms"])
def test_dead_letter_with_a_null_header_is_a_value_error_naming_it(name):
    """Kafka allows null header values; one is a malformed dead letter, not an AttributeError."""
    headers = [(k, v) for k, v in GOOD_HEADERS if k != name] + [(name, None)]
    record = _record(topic="clicks.dlq", offset=4, headers=headers)
    with pytest.raises(ValueError, match=f"offset=4 has a null header '{name}'"):
        DeadLetter.from_record(record)


def test_dead_letter_with_a_malformed_header_is_a_value_error_naming_it():
    bad_int = [(k, b"zero" if k == "source.partition" else v) for k, v in GOOD_HEADERS]
    with pytest.raises(ValueError, match="header 'source.partition'=b'zero', not an integer"):
        DeadLetter.from_record(_record(topic="clicks.dlq", headers=bad_int))
    bad_text = [(k, b"\xff" if k == "reason" else v) for k, v in GOOD_HEADERS]
    with pytest.raises(ValueError, match=r"has header 'reason'=b'\\xff', not utf-8 text"):
        DeadLetter.from_record(_record(topic="clicks.dlq", headers=bad_text))
    assert DeadLetter.from_record(_record(topic="clicks.dlq", headers=GOOD_HEADERS)).source_offset == 7


def test_tail_renders_a_dead_letter_with_a_null_header_as_unreadable():
    from streamrec.commands.tail import render_dead_letter

    record = _record(topic="clicks.dlq", offset=4, value=b"junk",
                     headers=[("reason", None), *GOOD_HEADERS[1:]])
    row = render_dead_letter(record)
    assert row["reason"] == "unreadable dead letter: dead letter at offset=4 has a null header 'reason'"
    assert row["headers"]["reason"] is None and base64.b64decode(row["value_b64"]) == b"junk"


def test_decode_or_route_refuses_mixed_topics_and_unknown_empty_kind():
    with pytest.raises(ValueError, match="mix topics 'impressions' and 'clicks'"):
        decode_or_route([_record(), _record(topic="clicks")], DeadLetterRouter(None))
    with pytest.raises(ValueError, match="kind=None"):
        decode_or_route([], DeadLetterRouter(None))
    assert decode_or_route([], DeadLetterRouter(None), Click).dtype == record_dtype(Click)


def _consume_all(bootstrap: str, topic: str, expected: int) -> list:
    """Every record of ``topic`` once ``expected`` have arrived (polled with a deadline)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=50)
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert tps, f"topic {topic!r} never appeared"
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records = []
        while len(records) < expected and time.monotonic() < deadline:
            for rs in consumer.poll(timeout_ms=200).values():
                records.extend(rs)
        assert sum(consumer.end_offsets(tps).values()) == len(records) == expected
        return records
    finally:
        consumer.close()


GOOD = [
    Impression(event_id=i, ts_ms=1_000 + i, user_id=i % 5, item_id=100 + i, impression_id=500 + i,
               activeness=i % 9, age_group=i % 7 - 1, item_duration_ms=15_000, item_category=i % 3)
    for i in range(24)
]
GARBAGE = [
    (b"u1", b""),
    (b"u2", b"not an event at all"),
    (b"u3", encode(GOOD[0])[:-4]),
    (b"u4", encode(Click(1, 2, 3, 4, 5))),  # a valid click on the impressions topic
    (b"u5", encode(GOOD[1])[:1] + b"\x07" + encode(GOOD[1])[2:]),  # version 7
    (b"u7", encode(GOOD[2])[:2] + b"\x09" + encode(GOOD[2])[3:]),  # event type 9
    (b"u6", None),  # a tombstone: no value at all
]


@pytest.fixture
def routed(broker):
    """Good and garbage impressions produced, consumed and routed; returns what each step saw."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0)
    try:
        sends = [(key_for(e), encode(e)) for e in GOOD]
        for k, (key, value) in enumerate(GARBAGE):
            sends.insert(3 + 5 * k, (key, value))
        for key, value in sends:
            producer.send(TOPIC_IMPRESSIONS, key=key, value=value)
        producer.flush(timeout=DEADLINE_S)

        records = _consume_all(broker.bootstrap, TOPIC_IMPRESSIONS, len(sends))
        by_partition = defaultdict(list)
        for r in records:
            by_partition[r.partition].append(r)
        router = DeadLetterRouter(producer)
        good_rows = [decode_or_route(sorted(rs, key=lambda r: r.offset), router)
                     for _p, rs in sorted(by_partition.items())]
        router.flush(timeout_s=DEADLINE_S)
        dead = _consume_all(broker.bootstrap, dlq_topic(TOPIC_IMPRESSIONS), len(GARBAGE))
        yield broker, records, good_rows, router, dead
    finally:
        producer.close()


def _reason(value):
    with pytest.raises(ContractError) as info:
        decode(value, Impression)
    return info.value.reason


def test_dlq_holds_exactly_the_garbage_with_reasons_and_original_bytes(routed):
    _broker, records, good_rows, router, dead = routed

    decoded = sorted((row for rows in good_rows for row in rows.tolist()), key=lambda row: row[0])
    assert decoded == to_records(GOOD, Impression).tolist()

    source = {(r.topic, r.partition, r.offset): r for r in records}
    letters = [DeadLetter.from_record(r) for r in dead]
    assert sorted((d.key, d.value or b"", d.reason) for d in letters) == sorted(
        (key, value or b"", _reason(value)) for key, value in GARBAGE
    )
    for d in letters:
        original = source[(d.source_topic, d.source_partition, d.source_offset)]
        assert (original.key, original.value) == (d.key, d.value)
        assert d.source_timestamp_ms == original.timestamp and d.dlq_ts_ms > 0
    assert any(d.value is None for d in letters)  # the tombstone stayed a tombstone

    expected_counts = Counter((TOPIC_IMPRESSIONS, _reason(v).split(":")[0]) for _k, v in GARBAGE)
    assert router.counts() == dict(expected_counts)
    assert set(code for _t, code in expected_counts) == {
        "empty", "bad_magic", "wrong_length", "wrong_type", "unknown_version", "unknown_type"
    }


def test_a_users_events_share_a_partition_on_the_broker(routed):
    _broker, records, _good, _router, _dead = routed
    partitions = defaultdict(set)
    for r in records:
        if r.key and r.key.isdigit():
            partitions[r.key].add(r.partition)
    assert len(partitions) == 5 and all(len(ps) == 1 for ps in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # and users do spread


def _tail(capsys, *argv):
    status = cli_main(["tail", *argv])
    lines = capsys.readouterr().out.splitlines()
    return status, lines


def test_tail_prints_dead_letters_with_reason_and_original_bytes(routed, capsys):
    broker = routed[0]
    status, lines = _tail(capsys, dlq_topic(TOPIC_IMPRESSIONS), "--bootstrap", broker.bootstrap,
                          "--from-beginning", "--max", str(len(GARBAGE)), "--timeout-s", "10")
    assert status == 0
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len(GARBAGE)
    shown = sorted((r["key"], r["value_b64"], r["reason"]) for r in rows)
    expected = sorted(
        (key.decode(), None if value is None else base64.b64encode(value).decode(), _reason(value))
        for key, value in GARBAGE
    )
    assert shown == expected
    assert all(r["headers"]["source.topic"] == TOPIC_IMPRESSIONS for r in rows)


def test_tail_prints_events_and_flags_contract_violations(routed, capsys):
    broker = routed[0]
    total = len(GOOD) + len(GARBAGE)
    status, lines = _tail(capsys, TOPIC_IMPRESSIONS, "--bootstrap", broker.bootstrap,
                          "--offset", "0", "--max", str(total), "--timeout-s", "10")
    assert status == 0
    rows = [json.loads(line) for line in lines]
    assert len(rows) == total
    events = sorted((r for r in rows if "error" not in r), key=lambda r: r["event_id"])
    assert [r["type"] for r in events] == ["impression"] * len(GOOD)
    assert [(r["event_id"], r["user_id"], r["item_category"]) for r in events] == [
        (e.event_id, e.user_id, e.item_category) for e in GOOD
    ]
    assert sorted(r["error"] for r in rows if "error" in r) == sorted(_reason(v) for _k, v in GARBAGE)

    status, lines = _tail(capsys, TOPIC_IMPRESSIONS, "--bootstrap", broker.bootstrap,
                          "--from-beginning", "--max", "3", "--format", "text")
    assert status == 0 and len(lines) == 3
    assert all(line.startswith(f"{TOPIC_IMPRESSIONS}/") for line in lines)


def test_tail_prints_other_topics_raw(broker, capsys):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        producer.send("misc", key=b"k", value=b"\x00\xffraw", headers=[("h", b"v")])
        producer.flush(timeout=DEADLINE_S)
    finally:
        producer.close()
    status, lines = _tail(capsys, "misc", "--bootstrap", broker.bootstrap, "--from-beginning",
                          "--max", "1", "--timeout-s", "10")
    assert status == 0
    (row,) = [json.loads(line) for line in lines]
    assert (row["key"], row["headers"], base64.b64decode(row["value_b64"])) == ("k", {"h": "v"}, b"\x00\xffraw")


def test_tail_goes_on_past_a_dead_letter_with_a_null_header(broker, capsys):
    """kafka-python's producer refuses null header values, other clients send them: the batch is
    built by hand and produced over the wire."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    from tests.broker.conftest import RawClient, metadata_request, produce_raw

    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    builder.append(0, timestamp=1_000, key=b"1", value=b"a", headers=[("reason", None), *GOOD_HEADERS[1:]])
    builder.append(1, timestamp=1_001, key=b"2", value=b"b", headers=GOOD_HEADERS)
    client = RawClient(broker.bootstrap)
    try:
        client.request(metadata_request(["clicks.dlq"]), 9)
        assert produce_raw(client, "clicks.dlq", bytes(builder.build())).error_code == 0
    finally:
        client.close()
    status, lines = _tail(capsys, "clicks.dlq", "--bootstrap", broker.bootstrap, "--from-beginning",
                          "--max", "2", "--timeout-s", "10")
    assert status == 0
    rows = [json.loads(line) for line in lines]
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("1", "unreadable dead letter: dead letter at offset=0 has a null header 'reason'"),
        ("2", "empty: no bytes"),
    ]
    assert rows[0]["headers"]["reason"] is None


def test_flush_raises_when_a_dead_letter_was_not_acknowledged(broker):
    """A dead letter whose send failed (here: it expired, the broker gone) makes flush raise, so
    the caller never commits past its source record; a later flush starts afresh."""
    from streams.dlq import DeadLetterError

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0, request_timeout_ms=1000,
                             delivery_timeout_ms=2000, retry_backoff_ms=100)
    try:
        router = DeadLetterRouter(producer)
        router.route(topic="clicks", partition=0, offset=1, key=b"1", value=b"x" * 10, reason="bad: a")
        router.flush(timeout_s=DEADLINE_S)  # it landed
        broker.stop()
        router.route(topic="clicks", partition=0, offset=2, key=b"2", value=b"x" * 10, reason="bad: b")
        with pytest.raises(DeadLetterError, match="1 of 1 dead letters were not acknowledged"):
            router.flush(timeout_s=DEADLINE_S)
        router.flush(timeout_s=DEADLINE_S)  # nothing pending any more
        assert router.counts() == {("clicks", "bad"): 2}
    finally:
        producer.close(timeout=2)
