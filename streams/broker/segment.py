"""One segment of a partition log: a ``.log`` file of raw v2 record batches and its two sparse indexes.

Files in a partition directory, named by the segment's base offset::

    00000000000000000000.log        batches exactly as produced, base offsets rewritten
    00000000000000000000.index      8-byte entries (relative offset u32, position u32),
                                    one per ``index_interval_bytes`` of log data
    00000000000000000000.timeindex  12-byte entries (max timestamp so far i64, offset of the
                                    batch holding it as relative u32), one per index entry,
                                    plus a final one when the segment is sealed

Recovery of one segment: a sealed segment is trusted, its indexes rebuilt from batch headers
when missing or inconsistent (``Segment.open_sealed``). In the last segment, index entries are
kept up to the last one at or below the recovery point that points at a batch header with the
expected offset; every batch from there on is checked for framing, offset continuity and CRC,
and the file is truncated at the first bad one (a torn or unsynced tail), logged at WARNING
(``Segment.recover``).

Reads return whole batches from one segment. Both indexes are held in memory; a sealed segment
keeps only the fd of its ``.log`` file open.
"""
from __future__ import annotations

import logging
import os
import struct
from array import array
from bisect import bisect_left, bisect_right
from pathlib import Path

from streams.broker.records import (
    BATCH_HEADER_BYTES,
    MAX_UNCOMPRESSED_BATCH_BYTES,
    CorruptRecordError,
    UnsupportedCompressionError,
    batch_size_at,
    crc32c,
    iter_record_timestamps,
    parse_header,
)

logger = logging.getLogger("streams.broker.log")  # one logger for the whole partition log

_INDEX = struct.Struct(">II")
_TIMEINDEX = struct.Struct(">qI")
_LOCATE = struct.Struct(">qi11xi")  # base_offset, batch_length, .., last_offset_delta (27 bytes)
NO_TS = -1  # max timestamp of a segment holding no timestamped record


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Segment:
    """One ``.log`` file and its two sparse indexes, kept in memory as arrays and on disk."""

    def __init__(self, directory: Path, base_offset: int, now_ms: int, interval: int) -> None:
        self.base_offset = base_offset
        self._interval = interval
        self.stem = directory / f"{base_offset:020d}"
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        self.fd = self.index_fd = self.time_fd = -1
        try:  # out of fds or disk space: close what was opened, so a retry does not leak
            self.fd = os.open(self.stem.with_suffix(".log"), flags, 0o644)
            self.index_fd = os.open(self.stem.with_suffix(".index"), flags, 0o644)
            self.time_fd = os.open(self.stem.with_suffix(".timeindex"), flags, 0o644)
            self.size = os.fstat(self.fd).st_size
        except OSError:
            self.close()
            raise
        self.sealed = False  # the final time-index entry is written; no more appends
        self.next_offset = base_offset
        self.created_ms = now_ms
        self.idx_offsets, self.idx_positions = array("q"), array("q")
        self.time_ts, self.time_offsets = array("q"), array("q")
        self.bytes_since_index = 0
        self.max_ts, self.max_ts_offset = NO_TS, base_offset

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
        self.sealed = True
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
                self.max_ts, self.max_ts_offset, start, self.next_offset = NO_TS, self.base_offset, 0, self.base_offset
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
        write_all(self.index_fd, idx)
        write_all(self.time_fd, tidx)
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
            write_all(self.fd, buf)
            if idx:
                write_all(self.index_fd, idx)
                write_all(self.time_fd, tidx)
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
        if len(buf) < min(want, first):  # the file lost bytes the index still covers
            raise CorruptRecordError(
                f"short read path={self.stem}.log position={pos} wanted={want} got={len(buf)}"
            )
        if want == first or len(buf) == self.size - pos:
            return buf
        cut = first
        while cut + 12 <= len(buf):
            nxt = cut + batch_size_at(buf, cut)
            if nxt > len(buf):
                break
            cut = nxt
        return buf[:cut]

    def find_timestamp(
        self, ts_ms: int, max_uncompressed_bytes: int = MAX_UNCOMPRESSED_BATCH_BYTES,
    ) -> tuple[int, int] | None:
        i = bisect_left(self.time_ts, ts_ms) - 1  # last entry whose max is still below ts_ms
        pos = self.lookup(self.time_offsets[i]) if i >= 0 else 0
        while pos < self.size:
            h = parse_header(os.pread(self.fd, BATCH_HEADER_BYTES, pos))
            if h.max_timestamp >= ts_ms:
                batch = os.pread(self.fd, h.size, pos)
                return _first_at_or_after(batch, h.base_offset, h.max_timestamp, ts_ms, max_uncompressed_bytes)
            pos += h.size
        return None

    def batch_at_offset(self, offset: int) -> bytes:
        pos, size = self.locate(offset)
        return os.pread(self.fd, size, pos)

    # --- lifecycle ---------------------------------------------------------------------------
    def seal(self, fsync: bool) -> None:
        """Record the final max timestamp, then keep only the log's fd (indexes live in memory).

        Idempotent, so a roll retried after a failed fsync does not add a second final entry.
        """
        if not self.sealed and (self.max_ts != NO_TS or not self.time_ts):
            try:
                write_all(self.time_fd, _TIMEINDEX.pack(self.max_ts, self.max_ts_offset - self.base_offset))
            except OSError:  # disk full: drop a partial entry so the segment stays appendable
                os.ftruncate(self.time_fd, len(self.time_ts) * _TIMEINDEX.size)
                raise
            self.time_ts.append(self.max_ts)
            self.time_offsets.append(self.max_ts_offset)
        self.sealed = True
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


def _first_at_or_after(batch: bytes, base: int, max_ts: int, ts_ms: int, cap: int) -> tuple[int, int]:
    """First record of ``batch`` with timestamp >= ``ts_ms``; batch granularity if undecodable."""
    try:
        return next(((o, t) for o, t in iter_record_timestamps(batch, cap) if t >= ts_ms), (base, max_ts))
    except (UnsupportedCompressionError, CorruptRecordError):
        return base, max_ts
