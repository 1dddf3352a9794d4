"""On-disk partition logs of the embedded broker: segments of raw v2 record batches plus sparse indexes.

Layout: ``<data_dir>/<topic>/meta.json`` (partition count and topic configs, written atomically)
and ``<data_dir>/<topic>/<partition>/`` holding segments named by their base offset::

    00000000000000000000.log        batches exactly as produced, base offsets rewritten
    00000000000000000000.index      8-byte entries (relative offset u32, position u32),
                                    one per ``index_interval_bytes`` of log data
    00000000000000000000.timeindex  12-byte entries (max timestamp so far i64, offset of the
                                    batch holding it as relative u32), one per index entry,
                                    plus a final one when the segment is sealed

Durability: every append is one ``os.write`` of the whole request that completes before
``append`` returns, so an acknowledged append survives ``kill -9`` (the page cache belongs to the
kernel). ``fsync=always`` also fsyncs the log before returning (survives power loss);
``interval`` fsyncs when ``maybe_flush`` finds ``fsync_interval_ms`` elapsed (the server calls it
from a timer; ``append`` checks too); ``never`` leaves it to the OS. A sealed segment is fsynced
when it is rolled unless the policy is ``never``.

Recovery on open: each flush writes ``recovery-point`` (the log end offset at the last completed
fsync). Sealed segments are trusted (their indexes are rebuilt from batch headers when missing or
inconsistent). In the last segment, index entries are kept up to the last one at or below the
recovery point that points at a batch header with the expected offset; every batch from there
on is checked for framing, offset continuity and CRC, and the log is truncated at the first bad
one (a torn or unsynced tail), logged at WARNING. So under ``interval`` a power loss loses at most
what was written since the last fsync, and damage there is found even in the middle of the
segment. Not detected: damage to sealed segments (possible after a power loss under ``never``,
which skips the fsync at roll) and whatever a disk that ignores fsync does.

Retention (``enforce_retention``) deletes whole sealed segments, oldest first: by time when a
segment's largest record timestamp is older than ``retention_ms``, by size while the partition
stays at or above ``retention_bytes`` without it. The active segment is never deleted. Topics
whose ``cleanup.policy`` lacks ``delete`` (e.g. ``compact``, faust changelogs) are exempt from
retention; compaction itself is not performed, so such topics grow without bound. Time
retention follows record timestamps, as in Kafka: replayed history carrying old event times
expires as soon as its segment is sealed, so give replay topics ``retention.ms=-1``.

Reads return whole batches from one segment. ``LogManager`` holds an exclusive ``flock`` on
``<data_dir>/~lock`` so two brokers cannot share a data directory. Not thread-safe: call from one
thread (the broker's event loop); every method is synchronous and cheap except fsync.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import struct
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from streams import StreamsError
from streams.broker.config import LogConfig
from streams.broker.records import (
    BATCH_HEADER_BYTES,
    CorruptRecordError,
    UnsupportedCompressionError,
    batch_size_at,
    crc32c,
    iter_batches,
    parse_header,
    record_timestamps,
    set_base_offset,
)

logger = logging.getLogger(__name__)

_INDEX = struct.Struct(">II")
_TIMEINDEX = struct.Struct(">qI")
_LOCATE = struct.Struct(">qi11xi")  # base_offset, batch_length, .., last_offset_delta (27 bytes)
_NO_TS = -1
_RECOVERY_POINT = "recovery-point"  # log end offset at the last completed fsync


class OffsetOutOfRangeError(StreamsError):
    """A fetch offset below the log start or beyond the log end."""


class UnknownTopicError(StreamsError):
    """The topic does not exist."""


class TopicExistsError(StreamsError):
    """A topic with this name already exists."""


class InvalidTopicError(StreamsError):
    """A topic name outside Kafka's rules ([a-zA-Z0-9._-], 1..249 characters, not '.' or '..')."""


class InvalidConfigError(StreamsError):
    """A topic config value that cannot be parsed or is out of range."""


class DataDirLockedError(StreamsError):
    """Another LogManager (usually another broker process) holds this data directory; stop it first."""


class CorruptTopicMetaError(StreamsError):
    """A topic's meta.json cannot be read; restore or remove that topic directory."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Segment:
    """One ``.log`` file and its two sparse indexes, kept in memory as arrays and on disk."""

    def __init__(self, directory: Path, base_offset: int, now_ms: int, interval: int) -> None:
        self.base_offset = base_offset
        self._interval = interval
        self.stem = directory / f"{base_offset:020d}"
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        self.fd = os.open(self.stem.with_suffix(".log"), flags, 0o644)
        self.index_fd = os.open(self.stem.with_suffix(".index"), flags, 0o644)
        self.time_fd = os.open(self.stem.with_suffix(".timeindex"), flags, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.next_offset = base_offset
        self.created_ms = now_ms
        self.idx_offsets, self.idx_positions = array("q"), array("q")
        self.time_ts, self.time_offsets = array("q"), array("q")
        self.bytes_since_index = 0
        self.max_ts, self.max_ts_offset = _NO_TS, base_offset

    # --- indexes -----------------------------------------------------------------------------
    def _load_indexes(self) -> bool:
        """Read both index files (whole entries) into memory; False when they look inconsistent."""
        raw = os.pread(self.index_fd, os.fstat(self.index_fd).st_size, 0)
        traw = os.pread(self.time_fd, os.fstat(self.time_fd).st_size, 0)
        whole = not (len(raw) % _INDEX.size or len(traw) % _TIMEINDEX.size)
        for rel, pos in _INDEX.iter_unpack(raw[: len(raw) - len(raw) % _INDEX.size]):
            self.idx_offsets.append(self.base_offset + rel)
            self.idx_positions.append(pos)
        for ts, rel in _TIMEINDEX.iter_unpack(traw[: len(traw) - len(traw) % _TIMEINDEX.size]):
            self.time_ts.append(ts)
            self.time_offsets.append(self.base_offset + rel)
        n = self._n_increasing()
        return whole and n == len(self.idx_offsets) and (not n or self.idx_positions[-1] < self.size)

    def _n_increasing(self) -> int:
        """Length of the prefix of offset-index entries that increase in both offset and position."""
        for i in range(1, len(self.idx_offsets)):
            if self.idx_offsets[i] <= self.idx_offsets[i - 1] or self.idx_positions[i] <= self.idx_positions[i - 1]:
                return i
        return len(self.idx_offsets)

    def _reset_indexes(self, n_entries: int) -> None:
        """Keep the first ``n_entries`` offset/time entries in memory and on disk."""
        del self.idx_offsets[n_entries:], self.idx_positions[n_entries:]
        del self.time_ts[n_entries:], self.time_offsets[n_entries:]
        os.ftruncate(self.index_fd, n_entries * _INDEX.size)
        os.ftruncate(self.time_fd, n_entries * _TIMEINDEX.size)

    def _note_batch(self, pos: int, base: int, size: int, max_ts: int, idx: bytearray, tidx: bytearray) -> None:
        """Account one batch stored at ``pos``; add index entries to ``idx``/``tidx`` when due."""
        if max_ts > self.max_ts:
            self.max_ts, self.max_ts_offset = max_ts, base
        if self.bytes_since_index >= self._interval:
            self.idx_offsets.append(base)
            self.idx_positions.append(pos)
            self.time_ts.append(self.max_ts)
            self.time_offsets.append(self.max_ts_offset)
            idx += _INDEX.pack(base - self.base_offset, pos)
            tidx += _TIMEINDEX.pack(self.max_ts, self.max_ts_offset - self.base_offset)
            self.bytes_since_index = 0
        self.bytes_since_index += size

    def lookup(self, offset: int) -> int:
        """Position of an indexed batch whose base offset is <= ``offset`` (0 if none)."""
        i = bisect_right(self.idx_offsets, offset) - 1
        return self.idx_positions[i] if i >= 0 else 0

    # --- open / recover ----------------------------------------------------------------------
    def open_sealed(self, next_offset: int) -> None:
        consistent = self._load_indexes()
        if not consistent or not self.time_ts or (not self.idx_offsets and self.size > self._interval):
            self._reset_indexes(0)
            end = self._scan(0, verify_crc=False)
            self.seal(fsync=False)
            level = logging.WARNING if (end, self.next_offset) != (self.size, next_offset) else logging.INFO
            logger.log(
                level, "segment indexes rebuilt path=%s valid_bytes=%d file_bytes=%d next_offset=%d expected=%d",
                self.stem.with_suffix(".log"), end, self.size, self.next_offset, next_offset,
            )
        self._close_index_fds()  # a sealed segment is never written again: one fd per segment
        self.next_offset = next_offset
        self.max_ts, self.max_ts_offset = max(zip(self.time_ts, self.time_offsets), key=lambda e: e[0])

    def recover(self, recovery_offset: int) -> None:
        """Validate the last segment after ``recovery_offset``, truncating a torn or corrupt tail.

        Batches from the last index entry at or below ``recovery_offset`` (the log end at the last
        completed fsync) are checked for framing, offset continuity and CRC.
        """
        self._load_indexes()
        n = min(self._n_increasing(), len(self.time_ts))
        while n > 0 and (self.idx_offsets[n - 1] > recovery_offset or not self._entry_valid(n - 1)):
            n -= 1
        while True:
            self._reset_indexes(n)
            if n:
                self.max_ts, self.max_ts_offset = self.time_ts[n - 1], self.time_offsets[n - 1]
                start, self.next_offset = self.idx_positions[n - 1], self.idx_offsets[n - 1]
            else:
                self.max_ts, self.max_ts_offset, start, self.next_offset = _NO_TS, self.base_offset, 0, self.base_offset
            self.bytes_since_index = 0
            end = self._scan(start, verify_crc=True)
            if end > start or n == 0 or start == self.size:
                break
            n -= 1  # the indexed batch itself is bad: step back one entry
        if end < self.size:
            logger.warning(
                "log truncated path=%s valid_bytes=%d file_bytes=%d next_offset=%d",
                self.stem.with_suffix(".log"), end, self.size, self.next_offset,
            )
            os.ftruncate(self.fd, end)
            self.size = end

    def _entry_valid(self, i: int) -> bool:
        pos = self.idx_positions[i]
        head = os.pread(self.fd, BATCH_HEADER_BYTES, pos)
        try:
            return parse_header(head).base_offset == self.idx_offsets[i]
        except CorruptRecordError:
            return False

    def _scan(self, pos: int, verify_crc: bool) -> int:
        """Walk batches from ``pos``, rebuilding index entries; returns the end of the valid part."""
        idx, tidx = bytearray(), bytearray()
        expected = self.next_offset
        while pos < self.size:
            head = os.pread(self.fd, BATCH_HEADER_BYTES, pos)
            try:
                h = parse_header(head)
            except CorruptRecordError:
                break
            if pos + h.size > self.size or h.base_offset != expected or h.last_offset_delta < 0:
                break
            if verify_crc and crc32c(os.pread(self.fd, h.size - 21, pos + 21)) != h.crc:
                break
            self._note_batch(pos, h.base_offset, h.size, h.max_timestamp, idx, tidx)
            expected = h.base_offset + h.last_offset_delta + 1
            pos += h.size
        self.next_offset = expected
        _write_all(self.index_fd, idx)
        _write_all(self.time_fd, tidx)
        return pos

    # --- data path ---------------------------------------------------------------------------
    def append(self, buf: bytearray, batches: list[tuple[int, int, int, int]]) -> None:
        """Write ``buf``; ``batches`` holds (position in buf, base offset, size, max timestamp).

        On an OSError (disk full, file size limit) the segment is put back as it was: a partial
        write is truncated away so later appends and the indexes stay consistent.
        """
        saved = (self.size, len(self.idx_offsets), len(self.time_ts), self.bytes_since_index, self.max_ts, self.max_ts_offset)
        idx, tidx = bytearray(), bytearray()
        for pos, base, size, max_ts in batches:
            self._note_batch(self.size + pos, base, size, max_ts, idx, tidx)
        try:
            _write_all(self.fd, buf)
            if idx:
                _write_all(self.index_fd, idx)
                _write_all(self.time_fd, tidx)
        except OSError:
            self.size, n_idx, n_time, self.bytes_since_index, self.max_ts, self.max_ts_offset = saved
            os.ftruncate(self.fd, self.size)
            del self.idx_offsets[n_idx:], self.idx_positions[n_idx:], self.time_ts[n_time:], self.time_offsets[n_time:]
            os.ftruncate(self.index_fd, n_idx * _INDEX.size)
            os.ftruncate(self.time_fd, n_time * _TIMEINDEX.size)
            raise
        self.size += len(buf)

    def locate(self, offset: int) -> tuple[int, int]:
        """(position, size) of the batch containing ``offset``, which must be in this segment."""
        pos = self.lookup(offset)
        while True:
            if pos + _LOCATE.size > self.size:  # only after damage the recovery could not repair
                raise CorruptRecordError(f"offset={offset} is missing from segment path={self.stem}.log")
            base, length, last_delta = _LOCATE.unpack(os.pread(self.fd, _LOCATE.size, pos))
            if base + last_delta >= offset:
                return pos, 12 + length
            pos += 12 + length

    def read(self, offset: int, max_bytes: int) -> bytes:
        pos, first = self.locate(offset)
        want = max(first, min(max_bytes, self.size - pos))
        buf = os.pread(self.fd, want, pos)
        if want == first or len(buf) == self.size - pos:
            return buf
        cut = first
        while cut + 12 <= len(buf):
            nxt = cut + batch_size_at(buf, cut)
            if nxt > len(buf):
                break
            cut = nxt
        return buf[:cut]

    def find_timestamp(self, ts_ms: int) -> tuple[int, int] | None:
        i = bisect_left(self.time_ts, ts_ms) - 1  # last entry whose max is still below ts_ms
        pos = self.lookup(self.time_offsets[i]) if i >= 0 else 0
        while pos < self.size:
            h = parse_header(os.pread(self.fd, BATCH_HEADER_BYTES, pos))
            if h.max_timestamp >= ts_ms:
                return _first_at_or_after(os.pread(self.fd, h.size, pos), h.base_offset, h.max_timestamp, ts_ms)
            pos += h.size
        return None

    def batch_at_offset(self, offset: int) -> bytes:
        pos, size = self.locate(offset)
        return os.pread(self.fd, size, pos)

    # --- lifecycle ---------------------------------------------------------------------------
    def seal(self, fsync: bool) -> None:
        """Record the final max timestamp, then keep only the log's fd (indexes live in memory)."""
        if self.max_ts != _NO_TS or not self.time_ts:
            self.time_ts.append(self.max_ts)
            self.time_offsets.append(self.max_ts_offset)
            _write_all(self.time_fd, _TIMEINDEX.pack(self.max_ts, self.max_ts_offset - self.base_offset))
        if fsync:
            self.fsync()
        self._close_index_fds()

    def _close_index_fds(self) -> None:
        for fd in (self.index_fd, self.time_fd):
            if fd >= 0:
                os.close(fd)
        self.index_fd = self.time_fd = -1

    def fsync(self) -> None:
        for fd in (self.fd, self.index_fd, self.time_fd):
            if fd >= 0:
                os.fsync(fd)

    def close(self) -> None:
        self._close_index_fds()
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def unlink(self) -> None:
        self.close()
        for suffix in (".log", ".index", ".timeindex"):  # .log first: a crash leaves orphan indexes
            self.stem.with_suffix(suffix).unlink(missing_ok=True)


def _first_at_or_after(batch: bytes, base: int, max_ts: int, ts_ms: int) -> tuple[int, int]:
    """First record of ``batch`` with timestamp >= ``ts_ms``; batch granularity if undecodable."""
    try:
        return next(((o, t) for o, t in record_timestamps(batch) if t >= ts_ms), (base, max_ts))
    except (UnsupportedCompressionError, CorruptRecordError):
        return base, max_ts


def _first_with(batch: bytes, base: int, max_ts: int) -> tuple[int, int]:
    """First record of ``batch`` carrying ``max_ts``; batch granularity if undecodable."""
    try:
        return next(((o, t) for o, t in record_timestamps(batch) if t == max_ts), (base, max_ts))
    except (UnsupportedCompressionError, CorruptRecordError):
        return base, max_ts


class LogClosedError(StreamsError):
    """The partition log was closed or deleted."""


class PartitionLog:
    """The log of one partition: an ordered list of segments, the last one active."""

    def __init__(self, directory: Path, config: LogConfig, now_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.directory = Path(directory)
        self.config = config
        self._now_ms = now_ms
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segments: list[_Segment] = []
        self._bases: list[int] = []
        self._unsynced: set[int] = set()  # base offsets of segments written since their last fsync
        self._last_flush_ms = now_ms()
        self._closed = False
        self._load()

    def _load(self) -> None:
        now, interval = self._now_ms(), self.config.index_interval_bytes
        bases = sorted(int(p.stem) for p in self.directory.glob("*.log") if p.stem.isdigit() and len(p.stem) == 20)
        for path in self.directory.iterdir():
            if path.suffix in (".index", ".timeindex") and path.stem.isdigit() and int(path.stem) not in bases:
                path.unlink()  # left behind by a segment deletion cut short
        try:
            recovery_offset = int((self.directory / _RECOVERY_POINT).read_text())
        except (OSError, ValueError):
            recovery_offset = 0  # unknown: check the whole last segment
        for i, base in enumerate(bases or [0]):
            seg = _Segment(self.directory, base, now, interval)
            if i < len(bases) - 1:
                seg.open_sealed(bases[i + 1])
            else:
                seg.recover(recovery_offset)
            self._segments.append(seg)
            self._bases.append(base)
        if not bases and self.config.fsync != "never":
            _fsync_dir(self.directory)
        self._checkpointed = -1
        logger.info(
            "log opened dir=%s segments=%d log_start_offset=%d log_end_offset=%d size_bytes=%d",
            self.directory, len(self._segments), self.log_start_offset, self.log_end_offset, self.size_bytes,
        )

    @property
    def log_start_offset(self) -> int:
        return self._segments[0].base_offset

    @property
    def log_end_offset(self) -> int:
        return self._segments[-1].next_offset

    @property
    def size_bytes(self) -> int:
        return sum(seg.size for seg in self._segments)

    @property
    def n_segments(self) -> int:
        return len(self._segments)

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError(f"log dir={self.directory} is closed")

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Store one or more v2 batches (a Produce request's records); returns the first base offset.

        All batches are validated (framing, record count, and CRC when ``verify_crc_on_append``)
        before anything is written: on ``CorruptRecordError`` nothing is stored.
        """
        self._check_open()
        view = memoryview(data).cast("B")
        batches = list(iter_batches(view))
        if not batches:
            raise CorruptRecordError("produce payload holds no record batch")
        n_records = 0
        for pos, h in batches:
            if h.records_count < 1 or h.last_offset_delta != h.records_count - 1:
                raise CorruptRecordError(
                    f"records_count={h.records_count} last_offset_delta={h.last_offset_delta} at pos={pos}"
                )
            if self.config.verify_crc_on_append and crc32c(view[pos + 21 : pos + h.size]) != h.crc:
                raise CorruptRecordError(f"crc mismatch in batch at pos={pos} crc={h.crc}")
            n_records += h.records_count
        buf = bytearray(view)
        now = self._now_ms()
        seg = self._segments[-1]
        if seg.size > 0 and (
            seg.size + len(buf) > self.config.segment_bytes
            or now - seg.created_ms >= self.config.segment_ms
            or seg.next_offset + n_records - seg.base_offset >= 2**32  # relative offsets are u32
        ):
            seg = self._roll(now)
        base = offset = seg.next_offset
        entries = []
        for pos, h in batches:
            set_base_offset(buf, pos, offset)
            entries.append((pos, offset, h.size, h.max_timestamp))
            offset += h.records_count
        seg.append(buf, entries)
        seg.next_offset = offset
        if self.config.fsync == "always":
            os.fsync(seg.fd)
        else:
            self._unsynced.add(seg.base_offset)
            if self.config.fsync == "interval":
                self.maybe_flush(now)
        return base

    def _roll(self, now: int) -> _Segment:
        old = self._segments[-1]
        old.seal(fsync=self.config.fsync != "never")
        if self.config.fsync != "never":
            self._unsynced.discard(old.base_offset)
        seg = _Segment(self.directory, old.next_offset, now, self.config.index_interval_bytes)
        self._segments.append(seg)
        self._bases.append(seg.base_offset)
        if self.config.fsync != "never":
            _fsync_dir(self.directory)
        logger.info("segment rolled dir=%s base_offset=%d segments=%d", self.directory, seg.base_offset, len(self._segments))
        return seg

    def read(self, offset: int, max_bytes: int) -> bytes:
        """Whole batches starting with the one containing ``offset``, up to ``max_bytes``.

        Returns at least one batch when ``offset < log_end_offset`` even if it is larger than
        ``max_bytes`` (KIP-74), ``b""`` at the log end. Never crosses a segment boundary.
        """
        self._check_open()
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} < 0")
        if not self.log_start_offset <= offset <= self.log_end_offset:
            raise OffsetOutOfRangeError(
                f"offset={offset} not in [{self.log_start_offset}, {self.log_end_offset}] dir={self.directory}"
            )
        if offset == self.log_end_offset:
            return b""
        return self._segments[bisect_right(self._bases, offset) - 1].read(offset, max_bytes)

    def offset_for_timestamp(self, ts_ms: int) -> tuple[int, int] | None:
        """Earliest ``(offset, timestamp)`` whose record timestamp is >= ``ts_ms``, or None."""
        self._check_open()
        if ts_ms < 0:
            raise ValueError(f"ts_ms={ts_ms!r} < 0")
        for seg in self._segments:
            if seg.max_ts >= ts_ms:
                found = seg.find_timestamp(ts_ms)
                if found is not None:
                    return found
        return None

    def max_timestamp_offset(self) -> tuple[int, int] | None:
        """``(offset, timestamp)`` of the first record carrying the largest timestamp, or None."""
        self._check_open()
        best = None
        for seg in self._segments:
            if seg.max_ts != _NO_TS and (best is None or seg.max_ts > best.max_ts):
                best = seg
        if best is None:
            return None
        return _first_with(best.batch_at_offset(best.max_ts_offset), best.max_ts_offset, best.max_ts)

    def maybe_flush(self, now_ms: int | None = None) -> bool:
        """fsync when the ``interval`` policy is due; True if it did.

        Under ``always`` (every append already fsynced) it only refreshes the recovery point on
        the same schedule, which keeps the CRC scan after a crash short.
        """
        if self._closed or self.config.fsync == "never":
            return False
        now = self._now_ms() if now_ms is None else now_ms
        if now - self._last_flush_ms < self.config.fsync_interval_ms:
            return False
        if self.config.fsync == "always":
            self._last_flush_ms = now
            self._write_recovery_point()
            return False
        if not self._unsynced:
            return False
        self.flush(now)
        return True

    def flush(self, now_ms: int | None = None) -> None:
        """fsync every segment written since its last fsync (whatever the policy)."""
        self._check_open()
        for seg in self._segments:
            if seg.base_offset in self._unsynced:
                seg.fsync()
        self._unsynced.clear()
        self._last_flush_ms = self._now_ms() if now_ms is None else now_ms
        self._write_recovery_point()

    def _write_recovery_point(self) -> None:
        """Record that everything below the log end is durable (called only after an fsync)."""
        if self._checkpointed == self.log_end_offset:
            return
        tmp = self.directory / (_RECOVERY_POINT + ".tmp")
        tmp.write_text(str(self.log_end_offset))
        os.replace(tmp, self.directory / _RECOVERY_POINT)  # a stale value only lengthens recovery
        self._checkpointed = self.log_end_offset

    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Delete sealed segments past ``retention_ms`` / ``retention_bytes``; returns how many."""
        self._check_open()
        now = self._now_ms() if now_ms is None else now_ms
        retention_ms, retention_bytes = self.config.retention_ms, self.config.retention_bytes
        total, deleted = self.size_bytes, 0
        while len(self._segments) > 1:
            seg = self._segments[0]
            newest_ms = seg.max_ts if seg.max_ts != _NO_TS else os.fstat(seg.fd).st_mtime_ns // 1_000_000
            by_time = retention_ms != -1 and now - newest_ms > retention_ms
            by_size = retention_bytes != -1 and total - seg.size >= retention_bytes
            if not (by_time or by_size):
                break
            self._segments.pop(0)
            self._bases.pop(0)
            self._unsynced.discard(seg.base_offset)
            seg.unlink()
            total -= seg.size
            deleted += 1
        if deleted:
            logger.info(
                "retention deleted dir=%s segments=%d log_start_offset=%d size_bytes=%d",
                self.directory, deleted, self.log_start_offset, total,
            )
        return deleted

    def close(self) -> None:
        """Flush and release file descriptors; further calls raise ``LogClosedError``."""
        if self._closed:
            return
        self.flush()
        for seg in self._segments:
            seg.close()
        self._closed = True

    def delete(self) -> None:
        """Close and remove the partition directory with everything in it."""
        if not self._closed:
            for seg in self._segments:
                seg.close()
            self._closed = True
        shutil.rmtree(self.directory, ignore_errors=True)
        logger.info("log deleted dir=%s", self.directory)


_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_META = "meta.json"
_LOCK = "~lock"  # flock'ed while a LogManager owns the directory ('~' never appears in topic names)
_INT_CONFIGS = {
    "retention.ms": "retention_ms",
    "retention.bytes": "retention_bytes",
    "segment.bytes": "segment_bytes",
    "segment.ms": "segment_ms",
    "index.interval.bytes": "index_interval_bytes",
}


def validate_topic_name(name: str) -> None:
    if not isinstance(name, str) or not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidTopicError(f"topic name={name!r}: need 1..249 of [a-zA-Z0-9._-], not '.' or '..'")


def topic_log_config(base: LogConfig, configs: dict[str, str]) -> LogConfig:
    """``base`` with a topic's overrides applied; ``cleanup.policy`` without ``delete`` disables retention."""
    overrides: dict[str, int] = {}
    for key, attr in _INT_CONFIGS.items():
        if key in configs:
            try:
                overrides[attr] = int(configs[key])
            except (TypeError, ValueError):
                raise InvalidConfigError(f"{key}={configs[key]!r} is not an integer") from None
    policy = {p.strip() for p in str(configs.get("cleanup.policy", "delete")).split(",")}
    if not policy or not policy <= {"delete", "compact"}:
        raise InvalidConfigError(f"cleanup.policy={configs.get('cleanup.policy')!r} is not delete|compact")
    if "delete" not in policy:
        overrides.update(retention_ms=-1, retention_bytes=-1)
    try:
        return replace(base, **overrides)
    except ValueError as exc:
        raise InvalidConfigError(f"topic config: {exc}") from None


def _write_meta(directory: Path, name: str, n_partitions: int, configs: dict[str, str]) -> None:
    """Write ``meta.json`` atomically and durably (temp file, fsync, rename, fsync the directory)."""
    meta = json.dumps({"version": 1, "name": name, "partitions": n_partitions, "configs": configs}, indent=1)
    tmp = directory / (_META + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, meta.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / _META)
    _fsync_dir(directory)


class LogManager:
    """All topics under one data directory: ``<data_dir>/<topic>/meta.json`` + one dir per partition.

    Directory names containing ``~`` (``<topic>~new``, ``<topic>~del``; ``~`` is not valid in a
    topic name) are a creation or deletion cut short and are removed on load; directories without
    ``meta.json`` are ignored, so other components may keep files under ``data_dir`` too.
    """

    def __init__(self, data_dir: Path, config: LogConfig, now_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self._now_ms = now_ms
        self._logs: dict[str, list[PartitionLog]] = {}
        self._configs: dict[str, dict[str, str]] = {}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.data_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise DataDirLockedError(f"data_dir={self.data_dir} is in use by another log manager") from None
        for path in sorted(self.data_dir.iterdir()):
            if "~" in path.name and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif (path / _META).is_file():
                try:
                    meta = json.loads((path / _META).read_text())
                    n_partitions, configs = int(meta["partitions"]), {str(k): str(v) for k, v in meta["configs"].items()}
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CorruptTopicMetaError(f"path={path / _META} error={exc!r}") from None
                self._open_topic(path.name, n_partitions, configs)
        logger.info(
            "log manager loaded data_dir=%s topics=%d partitions=%d",
            self.data_dir, len(self._logs), sum(len(v) for v in self._logs.values()),
        )

    def _open_topic(self, name: str, n_partitions: int, configs: dict[str, str]) -> None:
        config = topic_log_config(self.config, configs)
        self._logs[name] = [PartitionLog(self.data_dir / name / str(p), config, self._now_ms) for p in range(n_partitions)]
        self._configs[name] = configs

    def topics(self) -> dict[str, int]:
        return {name: len(logs) for name, logs in self._logs.items()}

    def topic_configs(self, name: str) -> dict[str, str]:
        self._require(name)
        return dict(self._configs[name])

    def create_topic(self, name: str, n_partitions: int, configs: dict[str, str] | None = None) -> None:
        validate_topic_name(name)
        if name in self._logs:
            raise TopicExistsError(f"topic={name!r} already exists")
        if (self.data_dir / name).exists():
            raise TopicExistsError(f"topic={name!r}: path={self.data_dir / name} exists and is not a topic")
        if not isinstance(n_partitions, int) or n_partitions < 1:
            raise ValueError(f"n_partitions={n_partitions!r} < 1")
        configs = {str(k): str(v) for k, v in (configs or {}).items()}
        topic_log_config(self.config, configs)  # validate before touching the disk
        work = self.data_dir / f"{name}~new"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        for p in range(n_partitions):
            (work / str(p)).mkdir()
        _write_meta(work, name, n_partitions, configs)
        os.rename(work, self.data_dir / name)  # the topic appears atomically, meta included
        _fsync_dir(self.data_dir)
        self._open_topic(name, n_partitions, configs)
        logger.info("topic created name=%s partitions=%d configs=%s", name, n_partitions, configs)

    def alter_topic_configs(self, name: str, configs: dict[str, str]) -> None:
        """Replace the topic's config overrides (AlterConfigs semantics); applies immediately."""
        logs = self._require(name)
        configs = {str(k): str(v) for k, v in configs.items()}
        log_config = topic_log_config(self.config, configs)
        _write_meta(self.data_dir / name, name, len(logs), configs)
        for log in logs:
            log.config = log_config
        self._configs[name] = configs
        logger.info("topic configs altered name=%s configs=%s", name, configs)

    def create_partitions(self, name: str, n_partitions: int) -> None:
        """Grow the topic to ``n_partitions`` in total (a topic never shrinks)."""
        logs = self._require(name)
        if not isinstance(n_partitions, int) or n_partitions <= len(logs):
            raise ValueError(f"n_partitions={n_partitions!r} <= current count {len(logs)} for topic={name!r}")
        for p in range(len(logs), n_partitions):
            (self.data_dir / name / str(p)).mkdir(exist_ok=True)  # leftovers of a cut-short call are empty
        _write_meta(self.data_dir / name, name, n_partitions, self._configs[name])  # the commit point
        config = topic_log_config(self.config, self._configs[name])
        logs.extend(PartitionLog(self.data_dir / name / str(p), config, self._now_ms) for p in range(len(logs), n_partitions))
        logger.info("partitions created name=%s partitions=%d", name, n_partitions)

    def _require(self, name: str) -> list[PartitionLog]:
        logs = self._logs.get(name)
        if logs is None:
            raise UnknownTopicError(f"topic={name!r} does not exist")
        return logs

    def delete_topic(self, name: str) -> None:
        self._require(name)
        for log in self._logs.pop(name):
            log.close()
        del self._configs[name]
        work = self.data_dir / f"{name}~del"
        shutil.rmtree(work, ignore_errors=True)
        os.rename(self.data_dir / name, work)  # gone atomically; the rest is cleanup
        _fsync_dir(self.data_dir)
        shutil.rmtree(work, ignore_errors=True)
        logger.info("topic deleted name=%s", name)

    def get(self, topic: str, partition: int) -> PartitionLog:
        logs = self._require(topic)
        if not 0 <= partition < len(logs):
            raise ValueError(f"partition={partition!r} not in 0..{len(logs) - 1} for topic={topic!r}")
        return logs[partition]

    def _all(self) -> list[PartitionLog]:
        return [log for logs in self._logs.values() for log in logs]

    def flush_all(self) -> None:
        for log in self._all():
            log.flush()

    def maybe_flush_all(self, now_ms: int | None = None) -> int:
        """Run each partition's interval fsync policy; returns how many partitions were fsynced."""
        return sum(log.maybe_flush(now_ms) for log in self._all())

    def enforce_retention_all(self, now_ms: int | None = None) -> int:
        """Apply retention everywhere; returns the number of segments deleted."""
        return sum(log.enforce_retention(now_ms) for log in self._all())

    def close(self) -> None:
        """Flush and close every log, then release the data directory."""
        if self._lock_fd < 0:
            return
        for log in self._all():
            log.close()
        self._logs.clear()
        self._configs.clear()
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = -1
        logger.info("log manager closed data_dir=%s", self.data_dir)
