"""Generic event files: one event per line, as JSON Lines or CSV (optionally gzipped).

Each line names its event ``type`` (``impression``, ``click``, ``dwell`` or ``feedback``) and
carries that type's fields from :mod:`streams.contracts`, all integers:

=============  ===========================================================================
type           fields (optional ones in brackets, with their default)
=============  ===========================================================================
impression     event_id, ts_ms, user_id, item_id, impression_id, [activeness=0],
               [age_group=-1], [item_duration_ms=0], [item_category=-1]
click          event_id, ts_ms, impression_id, user_id, item_id
dwell          event_id, ts_ms, impression_id, user_id, item_id, dwell_ms
feedback       event_id, ts_ms, user_id, item_id, kind, [impression_id=null]
=============  ===========================================================================

``kind`` is ``"like"`` / ``"dislike"`` (any case) or 1 / 2. JSONL example::

    {"type": "impression", "event_id": 1, "ts_ms": 1650812741436, "user_id": 7, "item_id": 3, "impression_id": 1}
    {"type": "click", "event_id": 2, "ts_ms": 1650812741436, "impression_id": 1, "user_id": 7, "item_id": 3}

CSV: a header row with a ``type`` column and any of the field names; a cell left empty means
"not given" (the default, or an error for a required field). A non-empty cell in a column the
row's type does not have is an error, and so is an unknown column in the header.

Blank lines are ignored, and an empty file is an empty stream. A line is malformed when it is not
a JSON object / not a full CSV row, names an unknown type or field, lacks a required field, holds
a non-integer or out-of-range value, or repeats an ``event_id`` already seen in the same file. By default the first malformed
line raises :class:`SourceError` reading ``path:line: reason``; with ``skip_bad_lines=True`` such
lines are skipped and counted (``counters.bad_lines``, first reason in ``first_bad_line``) and a
warning with the count is logged when the file is done.

The whole file is read into memory and sorted by ``(ts_ms, rank, line)``, so the lines need not be
in time order; generic files are meant for test fixtures and modest exports, not for logs too
large to hold in memory (use a time-sorted format such as the KuaiRand reader for those).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
>>> _ = p.write_text(
...     '{"type": "click", "event_id": 2, "ts_ms": 5, "impression_id": 1, "user_id": 7, "item_id": 3}\\n'
...     '{"type": "impression", "event_id": 1, "ts_ms": 5, "user_id": 7, "item_id": 3, "impression_id": 1}\\n')
>>> [type(e).__name__ for _ts, _r, _s, e in JsonlSource(p, GenericOptions()).keyed_events()]
['Impression', 'Click']
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streams.contracts import Click, Dwell, Event, Feedback, FeedbackKind, Impression
from streams.sources import RANKS, GenericOptions, KeyedEvent, SourceCounters, SourceError, file_digest, open_text

logger = logging.getLogger(__name__)

TYPES: dict[str, type] = {"impression": Impression, "click": Click, "dwell": Dwell, "feedback": Feedback}
_FIELDS = {name: {f.name: f for f in dataclasses.fields(kind)} for name, kind in TYPES.items()}
ALL_FIELDS = frozenset(n for fs in _FIELDS.values() for n in fs)
_KINDS = {"like": FeedbackKind.LIKE, "dislike": FeedbackKind.DISLIKE}


class BadLine(ValueError):
    """One line cannot be turned into an event; the message is the reason."""


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise BadLine(f"{name}={value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise BadLine(f"{name}={value!r} is not an integer")


def make_event(fields: dict[str, Any]) -> Event:
    """Build an event from ``{"type": ..., field: value}``; ``None`` values mean "not given"."""
    type_name = fields.get("type")
    kind = TYPES.get(type_name) if isinstance(type_name, str) else None
    if kind is None:
        raise BadLine(f"type={type_name!r} is not one of {sorted(TYPES)}")
    known = _FIELDS[type_name]
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "type" or value is None:
            continue
        if name not in known:
            raise BadLine(f"field {name!r} does not belong to type {type_name} (fields: {sorted(known)})")
        if name == "kind" and isinstance(value, str) and value.strip().lower() in _KINDS:
            kwargs[name] = _KINDS[value.strip().lower()]
        else:
            kwargs[name] = _int(name, value)
    missing = [n for n, f in known.items() if n not in kwargs and f.default is dataclasses.MISSING]
    if missing:
        raise BadLine(f"{type_name} lacks required field(s) {missing}")
    try:
        return kind(**kwargs)
    except ValueError as exc:
        raise BadLine(str(exc)) from None


class _GenericSource:
    """Shared reading, validation, error policy and sorting of the generic formats."""

    format_name = ""

    def __init__(self, path: Path, options: GenericOptions) -> None:
        self.path = Path(path)
        self.options = options
        self.counters = SourceCounters()

    def fingerprint(self) -> str:
        digest = file_digest(self.path)
        digest.update(f"{self.format_name} skip_bad_lines={self.options.skip_bad_lines}".encode())
        return digest.hexdigest()

    def _lines(self) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
        raise NotImplementedError

    def keyed_events(self) -> Iterator[KeyedEvent]:
        counters = self.counters
        keyed: list[KeyedEvent] = []
        seen_ids: set[int] = set()
        for line_no, fields in self._lines():
            counters.rows += 1
            try:
                if isinstance(fields, BadLine):
                    raise fields
                event = make_event(fields)
                if event.event_id in seen_ids:
                    raise BadLine(f"event_id={event.event_id} repeats an earlier line")
            except BadLine as exc:
                where = f"{self.path}:{line_no}: {exc}"
                if not self.options.skip_bad_lines:
                    raise SourceError(where) from None
                counters.bad_lines += 1
                counters.first_bad_line = counters.first_bad_line or where
                continue
            seen_ids.add(event.event_id)
            keyed.append((event.ts_ms, RANKS[type(event)], line_no, event))
        if counters.bad_lines:
            logger.warning("generic source skipped bad lines path=%s n_bad_lines=%d first=%r",
                           self.path, counters.bad_lines, counters.first_bad_line)
        keyed.sort(key=lambda k: k[:3])
        yield from keyed


class JsonlSource(_GenericSource):
    """JSON Lines: one JSON object per line."""

    format_name = "jsonl"

    def _lines(self) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
        with open_text(self.path) as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, BadLine(f"not valid JSON: {exc.msg} at column {exc.colno}")
                    continue
                yield line_no, obj if isinstance(obj, dict) else BadLine(
                    f"expected a JSON object, got {type(obj).__name__}")


class CsvSource(_GenericSource):
    """CSV with a header row that has a ``type`` column; empty cells mean "not given"."""

    format_name = "csv"

    def _lines(self) -> Iterator[tuple[int, dict[str, Any] | BadLine]]:
        with open_text(self.path) as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            unknown = [c for c in header if c != "type" and c not in ALL_FIELDS]
            if "type" not in header or unknown:
                raise SourceError(f"{self.path}:1: header needs a 'type' column and only event fields; "
                                  f"unknown column(s) {unknown}")
            start = reader.line_num
            for row in reader:
                line_no, start = start + 1, reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield line_no, BadLine(f"{len(row)} cells, header has {len(header)}")
                    continue
                yield line_no, {c: (v if v.strip() else None) for c, v in zip(header, row)}
