"""Durable committed offsets of consumer groups.

One append-only file of JSON lines, one line per committed partition::

    {"g": "group", "t": "topic", "p": 0, "o": 42, "e": -1, "m": "", "ts": 1700000000000}

A commit is written and flushed before the coordinator answers it, then fsync'ed off the event
loop. On open the file is read back (the last value per group/topic/partition wins), expired groups
are dropped, and the survivors are rewritten into a fresh file (compaction) that atomically
replaces the old one.

Retention is per group, not per partition: a group keeps all its partitions' offsets while its
newest commit is younger than the retention, and loses them all at the first open after that.
Clients (librdkafka, faust) re-commit only offsets that moved, so a quiet partition of an active
group has an old commit time; Kafka (KIP-211) likewise expires a group's offsets only once the
group has stayed empty for the retention. A torn last line (the broker died mid-write) is dropped; a bad
line anywhere else is corruption and stops the broker with the file and line named.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from streams import StreamsError

logger = logging.getLogger(__name__)

FILE_NAME = "offsets.log"

TopicPartition = tuple[str, int]


class OffsetsStoreError(StreamsError):
    """The committed-offsets file cannot be read; an operator must inspect or remove it."""


@dataclass(frozen=True)
class CommittedOffset:
    """One partition's committed position as a client sent it."""

    offset: int
    leader_epoch: int = -1
    metadata: str | None = ""
    commit_ts_ms: int = 0


GroupOffsets = dict[TopicPartition, CommittedOffset]


def _decode_line(raw: bytes) -> tuple[str, TopicPartition, CommittedOffset]:
    obj = json.loads(raw)
    committed = CommittedOffset(
        offset=int(obj["o"]),
        leader_epoch=int(obj.get("e", -1)),
        metadata=obj.get("m", ""),
        commit_ts_ms=int(obj.get("ts", 0)),
    )
    return str(obj["g"]), (str(obj["t"]), int(obj["p"])), committed


def _encode_line(group_id: str, tp: TopicPartition, committed: CommittedOffset) -> bytes:
    obj = {
        "g": group_id,
        "t": tp[0],
        "p": tp[1],
        "o": committed.offset,
        "e": committed.leader_epoch,
        "m": committed.metadata,
        "ts": committed.commit_ts_ms,
    }
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class OffsetsStore:
    """Append-only log of offset commits under ``state_dir``; compacted each time it is opened."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir)
        self._path = self._dir / FILE_NAME
        self._file: IO[bytes] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def open(self, now_ms: int, retention_ms: int) -> dict[str, GroupOffsets]:
        """Load every group's committed offsets, compact the file and keep it open for appends.

        A group whose newest commit is ``retention_ms`` or more before ``now_ms`` is dropped whole;
        ``retention_ms`` <= 0 keeps offsets forever.
        """
        if self._file is not None:
            raise OffsetsStoreError(f"offsets store {self._path} is already open")
        self._dir.mkdir(parents=True, exist_ok=True)
        groups = self._load()
        n_loaded = sum(len(g) for g in groups.values())
        if retention_ms > 0:
            for group_id, offsets in list(groups.items()):
                newest_ms = max(c.commit_ts_ms for c in offsets.values())
                if now_ms - newest_ms >= retention_ms:
                    del groups[group_id]
        self._rewrite(groups)
        self._file = open(self._path, "ab")
        n_kept = sum(len(g) for g in groups.values())
        logger.info(
            "offsets loaded path=%s n_groups=%d n_partitions=%d n_expired=%d",
            self._path, len(groups), n_kept, n_loaded - n_kept,
        )
        return groups

    def _load(self) -> dict[str, GroupOffsets]:
        groups: dict[str, GroupOffsets] = {}
        if not self._path.exists():
            return groups
        lines = self._path.read_bytes().split(b"\n")
        # A file that ends with a newline splits into a trailing empty element.
        last = len(lines) - 1
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                group_id, tp, committed = _decode_line(raw)
            except (ValueError, KeyError, TypeError) as exc:
                if lineno - 1 == last:
                    logger.warning("offsets torn tail dropped path=%s line=%d", self._path, lineno)
                    continue
                raise OffsetsStoreError(f"{self._path}: line {lineno} is not a valid commit: {exc}") from exc
            groups.setdefault(group_id, {})[tp] = committed
        return groups

    def _rewrite(self, groups: dict[str, GroupOffsets]) -> None:
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for group_id, offsets in groups.items():
                for tp, committed in offsets.items():
                    out.write(_encode_line(group_id, tp, committed))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._path)
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def append(self, group_id: str, offsets: GroupOffsets) -> None:
        """Write and flush one commit (all its partitions in a single write)."""
        if self._file is None:
            raise OffsetsStoreError(f"offsets store {self._path} is not open")
        payload = b"".join(_encode_line(group_id, tp, c) for tp, c in offsets.items())
        self._file.write(payload)
        self._file.flush()

    async def sync(self) -> None:
        """fsync the appended commits without blocking the event loop."""
        if self._file is None:
            return
        fd = self._file.fileno()
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError:
            if self._file is not None:  # closed meanwhile: close() fsync'ed already
                raise

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
