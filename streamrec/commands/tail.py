"""``streamrec tail TOPIC``: print a topic's records, decoded by its contract.

Event topics print their events; ``samples`` its samples; ``<topic>.late`` and ``joiner.orphans``
the events with the joiner's reason; ``joiner.dwell`` the shared statistics messages;
``<topic>.dlq`` topics print the reason, the headers and the original bytes (base64); any other
topic prints its raw bytes (base64). How a topic is rendered is
looked up in ``RENDERERS`` (exact topic name), so a new contract is one entry there.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from streams.contracts import EVENT_TOPICS, ContractError, FeedbackKind, decode, kind_of
from streams.dlq import DeadLetter, is_dlq_topic

logger = logging.getLogger(__name__)

Renderer = Callable[[Any], dict[str, Any]]


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="backslashreplace")


def _position(record: Any) -> dict[str, Any]:
    return {
        "topic": record.topic, "partition": record.partition, "offset": record.offset,
        "timestamp_ms": record.timestamp, "key": _text(record.key),
    }


def _event_fields(out: dict[str, Any], value: bytes, expected: type | None) -> dict[str, Any]:
    """``out`` with the event's type and fields, or the contract violation and the raw bytes."""
    try:
        event = decode(value, expected)
    except ContractError as exc:
        out.update(error=exc.reason, value_b64=_b64(value))
        return out
    out["type"] = type(event).__name__.lower()
    for name, field_value in dataclasses.asdict(event).items():
        out[name] = field_value.name.lower() if isinstance(field_value, FeedbackKind) else field_value
    return out


def render_event(record: Any) -> dict[str, Any]:
    """An event topic's record: its fields, or the contract violation and the raw bytes."""
    return _event_fields(_position(record), record.value, kind_of(record.topic))


def render_dead_letter(record: Any) -> dict[str, Any]:
    """A ``.dlq`` record: why it was rejected, where it came from, and its original bytes."""
    out = _position(record)
    try:
        out["reason"] = DeadLetter.from_record(record).reason
    except ValueError as exc:
        out["reason"] = f"unreadable dead letter: {exc}"
    out["headers"] = {k: _text(v) for k, v in (record.headers or [])}
    out["value_b64"] = _b64(record.value)
    return out


def render_raw(record: Any) -> dict[str, Any]:
    out = _position(record)
    out["headers"] = {k: _text(v) for k, v in (record.headers or [])}
    out["value_b64"] = _b64(record.value)
    return out


def render_sample(record: Any) -> dict[str, Any]:
    """A ``samples`` record: labels, rules, NDT weight and the point-in-time snapshot."""
    from streams import samples as sample_contract

    out = _position(record)
    try:
        sample = sample_contract.decode(record.value)
    except ContractError as exc:
        out.update(error=exc.reason, value_b64=_b64(record.value))
        return out
    out["type"] = "sample"
    row = dataclasses.asdict(sample)
    snapshot = row.pop("snapshot")
    out.update(row)
    out["snapshot"] = {k: list(v) if isinstance(v, tuple) else v for k, v in snapshot.items()}
    return out


def render_joiner_event(record: Any) -> dict[str, Any]:
    """A ``<topic>.late`` or ``joiner.orphans`` record: the event (its type is in its bytes) and
    the joiner's headers (``reason``, and for orphans ``source.topic``)."""
    out = _position(record)
    out.update({k: _text(v) for k, v in (record.headers or [])})
    return _event_fields(out, record.value, None)


def render_dwell_stats(record: Any) -> dict[str, Any]:
    """A ``joiner.dwell`` record: the source partition, the statistics epochs it completes and
    its dwell contributions (epoch, item_id, dwell_ms, click_ts_ms)."""
    from streams.joiner.shared import SharedStatsError, decode_message

    out = _position(record)
    try:
        source, lo, hi, recs = decode_message(record.value)
    except SharedStatsError as exc:
        out.update(error=str(exc), value_b64=_b64(record.value))
        return out
    out.update(type="dwell_stats", source=source, from_epoch=lo, to_epoch=hi, n=len(recs),
               contributions=[list(r) for r in recs.tolist()])
    return out


RENDERERS: dict[str, Renderer] = {topic: render_event for topic in EVENT_TOPICS}
RENDERERS["samples"] = render_sample
# the joiner's outputs besides samples (names as in streams.joiner.outputs and .shared)
RENDERERS.update({f"{topic}.late": render_joiner_event for topic in EVENT_TOPICS})
RENDERERS["joiner.orphans"] = render_joiner_event
RENDERERS["joiner.dwell"] = render_dwell_stats


def renderer_for(topic: str) -> Renderer:
    if topic in RENDERERS:
        return RENDERERS[topic]
    if is_dlq_topic(topic):
        return render_dead_letter
    return render_raw


def format_line(row: dict[str, Any], fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps(row, separators=(",", ":"))
    head = f"{row['topic']}/{row['partition']}@{row['offset']} key={row['key']}"
    rest = " ".join(f"{k}={v}" for k, v in row.items() if k not in ("topic", "partition", "offset", "key"))
    return f"{head} {rest}"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tail", help="print a topic's records, decoded by its contract")
    p.add_argument("topic", metavar="TOPIC")
    p.add_argument("--bootstrap", default="127.0.0.1:9092", metavar="HOST:PORT")
    p.add_argument("--format", choices=("jsonl", "text"), default="jsonl")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true", help="start at each partition's first offset")
    start.add_argument("--offset", type=int, metavar="N", help="start at offset N in every partition")
    p.add_argument("--max", type=int, metavar="N", help="stop after N records")
    p.add_argument("--timeout-s", type=float, metavar="S", help="stop after S seconds without a record")
    p.add_argument("--connect-timeout-s", type=float, default=10.0, metavar="S",
                   help="give up when no bootstrap server answers within S seconds (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from kafka import KafkaConsumer, TopicPartition

    out = out or sys.stdout
    if args.max is not None and args.max < 0:
        print(f"streamrec tail: --max={args.max} < 0", file=sys.stderr)
        return 2
    if args.offset is not None and args.offset < 0:
        print(f"streamrec tail: --offset={args.offset} < 0", file=sys.stderr)
        return 2
    if not args.connect_timeout_s > 0:
        print(f"streamrec tail: --connect-timeout-s={args.connect_timeout_s} must be > 0", file=sys.stderr)
        return 2
    render = renderer_for(args.topic)
    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap, group_id=None, enable_auto_commit=False,
        client_id="streamrec-tail", bootstrap_timeout_ms=int(args.connect_timeout_s * 1000),
    )
    try:
        deadline = time.monotonic() + (args.timeout_s if args.timeout_s is not None else 30.0)
        partitions = consumer.partitions_for_topic(args.topic)
        while not partitions and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100)  # drives a metadata refresh
            partitions = consumer.partitions_for_topic(args.topic)
        if not partitions:
            print(f"streamrec tail: topic {args.topic!r} not found at {args.bootstrap}", file=sys.stderr)
            return 1
        tps = [TopicPartition(args.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if args.from_beginning:
            consumer.seek_to_beginning(*tps)
        elif args.offset is not None:
            for tp in tps:
                consumer.seek(tp, args.offset)
        else:
            consumer.seek_to_end(*tps)
        logger.info("tail_start topic=%s partitions=%d", args.topic, len(tps))
        n, last = 0, time.monotonic()
        while args.max is None or n < args.max:
            polled = consumer.poll(timeout_ms=200)
            records = sorted((r for rs in polled.values() for r in rs), key=lambda r: (r.partition, r.offset))
            if not records:
                if args.timeout_s is not None and time.monotonic() - last > args.timeout_s:
                    break
                continue
            last = time.monotonic()
            for record in records[: None if args.max is None else args.max - n]:
                print(format_line(render(record), args.format), file=out, flush=True)
                n += 1
        return 0
    finally:
        consumer.close()
