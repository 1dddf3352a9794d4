"""The log of one partition: an ordered list of segments, the last one active.

Durability: every append is one ``os.write`` of the whole request that completes before
``append`` returns, so an acknowledged append survives ``kill -9`` (the page cache belongs to the
kernel). ``fsync=always`` also fsyncs the log before returning (survives power loss);
``interval`` fsyncs when ``maybe_flush`` finds ``fsync_interval_ms`` elapsed (the server calls it
from a timer; ``append`` checks too); ``never`` leaves it to the OS. A sealed segment is fsynced
when it is rolled unless the policy is ``never``.

Recovery on open: each flush writes ``recovery-point`` (the log end offset at the last completed
fsync). Sealed segments are trusted; the last segment is checked from the last index entry at or
below the recovery point and truncated at the first torn or corrupt batch (see
``streams.broker.segment``). So under ``interval`` a power loss loses at most what was written
since the last fsync, and damage there is found even in the middle of the segment. Not detected:
damage to sealed segments (possible after a power loss under ``never``, which skips the fsync at
roll) and whatever a disk that ignores fsync does.

Retention (``enforce_retention``) deletes whole sealed segments, oldest first: by time when a
segment's largest record timestamp is older than ``retention_ms``, by size while the partition
stays at or above ``retention_bytes`` without it. The active segment is never deleted. Topics
whose ``cleanup.policy`` lacks ``delete`` (e.g. ``compact``, faust changelogs) are exempt from
retention; compaction itself is not performed, so such topics grow without bound. Time
retention follows record timestamps, as in Kafka: replayed history carrying old event times
expires as soon as its segment is sealed, so give replay topics ``retention.ms=-1``.

Not thread-safe: call from one thread (the broker's event loop); every method is synchronous and
cheap except fsync.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path

from streams import StreamsError
from streams.broker.config import LogConfig
from streams.broker.records import (
    CorruptRecordError,
    UnsupportedCompressionError,
    check_records_count,
    crc32c,
    iter_batches,
    iter_record_timestamps,
    set_base_offset,
)
from streams.broker.segment import NO_TS, Segment, fsync_dir

logger = logging.getLogger("streams.broker.log")  # one logger for the whole partition log

_RECOVERY_POINT = "recovery-point"  # log end offset at the last completed fsync


class OffsetOutOfRangeError(StreamsError):
    """A fetch offset below the log start or beyond the log end."""


class LogClosedError(StreamsError):
    """The partition log was closed or deleted."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _first_with(batch: bytes, base: int, max_ts: int, cap: int) -> tuple[int, int]:
    """First record of ``batch`` carrying ``max_ts``; batch granularity if undecodable."""
    try:
        return next(((o, t) for o, t in iter_record_timestamps(batch, cap) if t == max_ts), (base, max_ts))
    except (UnsupportedCompressionError, CorruptRecordError):
        return base, max_ts


class PartitionLog:
    """The log of one partition: an ordered list of segments, the last one active."""

    def __init__(self, directory: Path, config: LogConfig, now_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.directory = Path(directory)
        self.config = config
        self._now_ms = now_ms
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segments: list[Segment] = []
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
            seg = Segment(self.directory, base, now, interval)
            if i < len(bases) - 1:
                seg.open_sealed(bases[i + 1])
            else:
                seg.recover(recovery_offset)
            self._segments.append(seg)
            self._bases.append(base)
        if not bases and self.config.fsync != "never":
            fsync_dir(self.directory)
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

        All batches are validated (framing, a record count that fits in the payload, and CRC when
        ``verify_crc_on_append``) before anything is written: on ``CorruptRecordError`` nothing is stored.
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
            check_records_count(h, self.config.max_uncompressed_batch_bytes)
            if self.config.verify_crc_on_append and crc32c(view[pos + 21 : pos + h.size]) != h.crc:
                raise CorruptRecordError(f"crc mismatch in batch at pos={pos} crc={h.crc}")
            n_records += h.records_count
        buf = bytearray(view)
        now = self._now_ms()
        seg = self._segments[-1]
        if seg.sealed or (seg.size > 0 and (  # sealed: a roll failed after sealing began
            seg.size + len(buf) > self.config.segment_bytes
            or now - seg.created_ms >= self.config.segment_ms
            or seg.next_offset + n_records - seg.base_offset >= 2**32  # relative offsets are u32
        )):
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

    def _roll(self, now: int) -> Segment:
        """Open the next segment, then seal the active one.

        In this order a failure (out of fds, disk full) leaves the active segment writable and the
        next append retries the roll; once sealing has begun, appends go to a new segment only.
        """
        old = self._segments[-1]
        seg = Segment(self.directory, old.next_offset, now, self.config.index_interval_bytes)
        try:
            old.seal(fsync=self.config.fsync != "never")
        except OSError:
            seg.unlink()  # empty and not yet listed
            raise
        if self.config.fsync != "never":
            self._unsynced.discard(old.base_offset)
        self._segments.append(seg)
        self._bases.append(seg.base_offset)
        if self.config.fsync != "never":
            fsync_dir(self.directory)
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
                found = seg.find_timestamp(ts_ms, self.config.max_uncompressed_batch_bytes)
                if found is not None:
                    return found
        return None

    def max_timestamp_offset(self) -> tuple[int, int] | None:
        """``(offset, timestamp)`` of the first record carrying the largest timestamp, or None."""
        self._check_open()
        best = None
        for seg in self._segments:
            if seg.max_ts != NO_TS and (best is None or seg.max_ts > best.max_ts):
                best = seg
        if best is None:
            return None
        batch = best.batch_at_offset(best.max_ts_offset)
        return _first_with(batch, best.max_ts_offset, best.max_ts, self.config.max_uncompressed_batch_bytes)

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
            newest_ms = seg.max_ts if seg.max_ts != NO_TS else os.fstat(seg.fd).st_mtime_ns // 1_000_000
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
        try:
            self.flush()
        finally:   # a failed flush (EMFILE, EIO) must still release the files
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
