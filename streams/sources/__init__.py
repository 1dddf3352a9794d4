"""Historical event sources for replay: detect a file's format, read it, merge in event-time order.

Two formats are understood (see each module's docstring for the exact mapping):

* the KuaiRand standard/random exposure log (``streams.sources.kuairand``), recognised by its
  header (``user_id,video_id,...,time_ms,is_click,...``);
* generic one-event-per-line files (``streams.sources.generic``): JSON Lines whose first
  non-blank character is ``{``, or CSV whose header has a ``type`` column.

Any of them may be gzip-compressed (detected by the gzip magic bytes, not by the file name).

Ordering. Every source yields ``(ts_ms, rank, seq, event)`` tuples sorted by that key, where
``rank`` is 0 for an impression, 1 click, 2 dwell, 3 feedback and ``seq`` is unique within the
source. :func:`merge_sources` merges sources on ``(ts_ms, rank, source index, seq)``, so at equal
event time every impression comes before every click, dwell and feedback (in particular before
its own), and the order is fully deterministic: the same inputs always give the same sequence.
"""
from __future__ import annotations

import gzip
import hashlib
import heapq
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

from streams import StreamsError
from streams.contracts import Click, Dwell, Event, Feedback, Impression, topic_for

if TYPE_CHECKING:
    from streams.sources.kuairand import KuaiRandOptions

RANKS: dict[type, int] = {Impression: 0, Click: 1, Dwell: 2, Feedback: 3}
KeyedEvent = tuple[int, int, int, Event]  # (ts_ms, rank, seq, event)


class SourceError(StreamsError):
    """An input file cannot be read as a replay source; the message names the file (and line)."""


@dataclass
class SourceCounters:
    """What a source read and what it set aside; every row is accounted for in one counter."""

    rows: int = 0  # data rows / lines read (header and blank lines excluded)
    duplicates_dropped: int = 0  # exact duplicate rows not replayed (KuaiRand)
    bad_lines: int = 0  # malformed lines skipped (generic, only with skip_bad_lines)
    first_bad_line: str = ""  # "path:line: reason" of the first skipped line


class Source(Protocol):
    """One input file, read as a stream of keyed events in ``(ts_ms, rank, seq)`` order."""

    path: Path
    counters: SourceCounters

    def fingerprint(self) -> str:
        """Hex digest of everything that determines the event sequence (contents and options)."""
        ...

    def keyed_events(self) -> Iterator[KeyedEvent]:
        ...


@dataclass(frozen=True)
class GenericOptions:
    """How generic JSONL/CSV files are read."""

    skip_bad_lines: bool = False  # False: the first malformed line raises SourceError (file:line)


def open_text(path: Path) -> TextIO:
    """Open ``path`` as UTF-8 text, transparently un-gzipping it when it starts with gzip magic."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(2)
    except OSError as exc:
        raise SourceError(f"cannot open {str(path)!r}: {exc.strerror or exc}") from None
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def file_digest(*paths: Path | None) -> hashlib._Hash:
    """sha256 over the bytes of each path (``None`` hashes as absent)."""
    digest = hashlib.sha256()
    for p in paths:
        if p is None:
            digest.update(b"\0none\0")
            continue
        digest.update(b"\0file\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest


def _first_line(path: Path) -> str:
    with open_text(path) as fh:
        try:
            for line in fh:
                if line.strip():
                    return line.strip()
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise SourceError(f"{path}: cannot read: {exc}") from None
    return ""


def open_source(path: str | Path, *, kuairand: KuaiRandOptions | None = None,
                generic: GenericOptions | None = None) -> Source:
    """Detect the format of ``path`` from its first line and return a source for it.

    ``kuairand`` is a :class:`streams.sources.kuairand.KuaiRandOptions` (defaults when None).
    """
    from streams.sources import generic as generic_mod
    from streams.sources import kuairand as kuairand_mod

    p = Path(path)
    if not p.is_file():
        raise SourceError(f"input {str(p)!r} is not a file")
    first = _first_line(p)
    if not first or first.startswith("{"):  # an empty file is an empty event stream
        return generic_mod.JsonlSource(p, generic or GenericOptions())
    header = [c.strip() for c in first.split(",")]
    if kuairand_mod.is_kuairand_header(header):
        return kuairand_mod.KuaiRandSource(p, kuairand or kuairand_mod.KuaiRandOptions())
    if "type" in header:
        return generic_mod.CsvSource(p, generic or GenericOptions())
    raise SourceError(
        f"{p}: unknown format; first line {first[:80]!r} is neither a KuaiRand log header, "
        "a JSON object (JSONL) nor a CSV header with a 'type' column"
    )


def parse_time_ms(value: int | float | str | None) -> int | None:
    """Epoch milliseconds from an int, a digit string or ISO-8601 (naive means UTC).

    >>> parse_time_ms("2022-04-25T00:00:00Z"), parse_time_ms("1650844800000"), parse_time_ms(None)
    (1650844800000, 1650844800000, None)
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            pass
        else:
            return int((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp() * 1000)
    raise ValueError(f"time={value!r} is neither epoch milliseconds nor an ISO-8601 timestamp")


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Inputs as files: a directory stands for the KuaiRand logs (``log_*.csv*``) and ``*.jsonl*`` in it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted({*p.glob("log_*.csv*"), *p.glob("*.jsonl*")})
            if not found:
                raise SourceError(f"directory {str(p)!r} holds no log_*.csv* or *.jsonl* input")
            out.extend(found)
        else:
            out.append(p)
    return out


def open_sources(paths: Sequence[str | Path], kuairand: KuaiRandOptions | None = None,
                 generic: GenericOptions | None = None) -> list[Source]:
    """:func:`open_source` for each input of :func:`expand_paths`."""
    return [open_source(p, kuairand=kuairand, generic=generic) for p in expand_paths(paths)]


def window(events: Iterator[Event], from_ms: int | None, until_ms: int | None,
           filtered: dict[str, int] | None = None) -> Iterator[Event]:
    """The events with ``from_ms <= ts_ms < until_ms``; stops reading at the first one past the end.

    Events before ``from_ms`` are counted per topic in ``filtered``.
    """
    for event in events:
        ts = event.ts_ms
        if until_ms is not None and ts >= until_ms:
            return
        if from_ms is not None and ts < from_ms:
            if filtered is not None:
                topic = topic_for(event)
                filtered[topic] = filtered.get(topic, 0) + 1
            continue
        yield event


def merge_sources(sources: Sequence[Source]) -> Iterator[Event]:
    """All events of ``sources`` in ``(ts_ms, rank, source index, seq)`` order."""
    if len(sources) == 1:
        for item in sources[0].keyed_events():
            yield item[3]
        return
    streams = [_tagged(src, i) for i, src in enumerate(sources)]
    for item in heapq.merge(*streams):
        yield item[4]


def _tagged(source: Source, index: int) -> Iterator[tuple[int, int, int, int, Event]]:
    for ts, rank, seq, event in source.keyed_events():
        yield ts, rank, index, seq, event
