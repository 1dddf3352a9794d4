"""Producer ids and idempotent-producer sequence state of the broker.

Producer ids are handed out in blocks; the end of the current block is written (atomically, with
fsync) before any id from it is handed out, so ids never repeat after a restart or a crash.

Sequence state follows Kafka's rules closely enough for librdkafka's, kafka-python's and
aiokafka's idempotent producers: per (topic, partition, producer id) the broker remembers the
epoch, the last sequence and the last five batches; a retried batch that matches one of those is
answered with its original offset and not appended again, a gap is OUT_OF_ORDER_SEQUENCE_NUMBER and
an old epoch is INVALID_PRODUCER_EPOCH. The state lives in memory; after a restart it is rebuilt
for a partition the first time an idempotent producer writes to it, from the batch headers of the
partition's last ``REBUILD_OFFSETS`` offsets (so a retry of a batch written just before a crash is
still recognised). A producer with no state is accepted whatever its sequence.
"""
from __future__ import annotations

import logging
import os
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from streams.broker import error_codes as ec
from streams.broker.server import BrokerError

logger = logging.getLogger(__name__)

_ID_BLOCK = 1000
_RECENT_BATCHES = 5
_SEQ_MOD = 1 << 31
REBUILD_OFFSETS = 10_000
_REBUILD_MAX_BYTES = 16 << 20
_REBUILD_READ_BYTES = 1 << 20
# batch header v2 from the start: base_offset, batch_length, partition_leader_epoch, magic, crc,
# attributes, last_offset_delta, base_ts, max_ts, producer_id, producer_epoch, base_sequence, count
BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
BATCH_HEADER_BYTES = BATCH_HEADER.size  # 61


class ProducerIdFileError(BrokerError):
    """The producer id file is unreadable; fix or remove it (ids then restart from 0)."""


class ReadableLog(Protocol):
    log_start_offset: int
    log_end_offset: int

    def read(self, offset: int, max_bytes: int) -> bytes: ...


@dataclass
class _ProducerEntry:
    epoch: int
    last_seq: int
    recent: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=_RECENT_BATCHES))


@dataclass(frozen=True)
class SequenceCheck:
    """Outcome of checking a batch: ``error`` code, or ``duplicate_of`` (its original base offset)."""

    error: int = ec.NONE
    duplicate_of: int | None = None


class ProducerStateManager:
    """Allocates producer ids (persisted in ``id_file``) and tracks idempotent sequences."""

    def __init__(self, id_file: Path) -> None:
        self._id_file = Path(id_file)
        self._next_id = self._load_block_end()
        self._block_end = self._next_id
        self._entries: dict[tuple[str, int, int], _ProducerEntry] = {}
        self._loaded: set[tuple[str, int]] = set()

    def _load_block_end(self) -> int:
        try:
            text = self._id_file.read_text().strip()
        except FileNotFoundError:
            return 0
        try:
            value = int(text)
        except ValueError:
            raise ProducerIdFileError(f"producer id file {str(self._id_file)!r} holds {text[:40]!r}, not an integer") from None
        if value < 0:
            raise ProducerIdFileError(f"producer id file {str(self._id_file)!r} holds {value} < 0")
        return value

    def next_producer_id(self) -> int:
        if self._next_id >= self._block_end:
            self._block_end = self._next_id + _ID_BLOCK
            tmp = self._id_file.with_suffix(".tmp")
            with open(tmp, "w") as fh:
                fh.write(f"{self._block_end}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._id_file)
            dir_fd = os.open(self._id_file.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            logger.info("producer id block reserved block_end=%d", self._block_end)
        pid = self._next_id
        self._next_id += 1
        return pid

    def check(
        self, topic: str, partition: int, log: ReadableLog, pid: int, epoch: int, first_seq: int, n_records: int,
    ) -> SequenceCheck:
        """Decide whether a batch of an idempotent producer may be appended to ``log``."""
        if (topic, partition) not in self._loaded:
            self._rebuild(topic, partition, log)
        entry = self._entries.get((topic, partition, pid))
        if entry is None or epoch > entry.epoch:
            return SequenceCheck()
        if epoch < entry.epoch:
            return SequenceCheck(error=ec.INVALID_PRODUCER_EPOCH)
        last_seq = (first_seq + n_records - 1) % _SEQ_MOD
        for r_first, r_last, r_offset in entry.recent:
            if r_first == first_seq and r_last == last_seq:
                return SequenceCheck(duplicate_of=r_offset)
        if first_seq != (entry.last_seq + 1) % _SEQ_MOD:
            return SequenceCheck(error=ec.OUT_OF_ORDER_SEQUENCE_NUMBER)
        return SequenceCheck()

    def record(self, topic: str, partition: int, pid: int, epoch: int, first_seq: int, n_records: int, base_offset: int) -> None:
        """Remember an appended batch of an idempotent producer."""
        key = (topic, partition, pid)
        entry = self._entries.get(key)
        last_seq = (first_seq + n_records - 1) % _SEQ_MOD
        if entry is None or epoch != entry.epoch:
            entry = self._entries[key] = _ProducerEntry(epoch=epoch, last_seq=last_seq)
        entry.last_seq = last_seq
        entry.recent.append((first_seq, last_seq, base_offset))

    def _rebuild(self, topic: str, partition: int, log: ReadableLog) -> None:
        """Recover sequence state from the headers of the partition's most recent batches."""
        self._loaded.add((topic, partition))
        end = log.log_end_offset
        offset = max(log.log_start_offset, end - REBUILD_OFFSETS)
        n_bytes = n_batches = 0
        while offset < end and n_bytes < _REBUILD_MAX_BYTES:
            chunk = log.read(offset, _REBUILD_READ_BYTES)
            if not chunk:
                break
            n_bytes += len(chunk)
            pos = 0
            while pos + BATCH_HEADER_BYTES <= len(chunk):
                base, length, _, _, _, _, last_delta, _, _, pid, epoch, seq, _ = BATCH_HEADER.unpack_from(chunk, pos)
                if pid >= 0 and seq >= 0:
                    self.record(topic, partition, pid, epoch, seq, last_delta + 1, base)
                    n_batches += 1
                offset = base + last_delta + 1
                pos += 12 + length
        if n_batches:
            logger.info(
                "producer state rebuilt topic=%s partition=%d batches=%d producers=%d",
                topic, partition, n_batches, sum(1 for k in self._entries if k[:2] == (topic, partition)),
            )

    def forget_topic(self, topic: str) -> None:
        for key in [k for k in self._entries if k[0] == topic]:
            del self._entries[key]
        self._loaded = {k for k in self._loaded if k[0] != topic}
