"""All topics under one data directory: topic directories, ``meta.json``, the directory lock, topic configs.

Layout: ``<data_dir>/<topic>/meta.json`` (partition count and topic configs, written atomically)
and ``<data_dir>/<topic>/<partition>/`` holding that partition's segments (see
``streams.broker.segment``). ``LogManager`` holds an exclusive ``flock`` on ``<data_dir>/~lock``
so two brokers cannot share a data directory. Not thread-safe, like ``PartitionLog``.

Every open partition holds file descriptors (its segments' files), so a topic has at most
``MAX_PARTITIONS_PER_TOPIC`` partitions, and a create that fails on the disk or on the process's
open-files limit (EMFILE) is rolled back: its files are released and its directory removed, so the
broker keeps serving and restarts over the same data directory.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from streams import StreamsError
from streams.broker.config import MAX_PARTITIONS_PER_TOPIC, LogConfig
from streams.broker.partition_log import PartitionLog, wall_clock_ms
from streams.broker.segment import fsync_dir, write_all

logger = logging.getLogger("streams.broker.log")  # one logger for the whole partition log


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


class TopicStorageError(StreamsError):
    """Creating a topic's or partition's files failed (disk full, too many open files); nothing was kept."""


class TooManyOpenFilesError(StreamsError):
    """The topics on disk need more file descriptors than the process may open; raise ``ulimit -n``."""


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


def _storage_error(name: str, n_partitions: int, exc: OSError) -> TopicStorageError:
    return TopicStorageError(f"topic={name!r} partitions={n_partitions}: {exc}")


def validate_partition_count(n_partitions: int) -> None:
    if not isinstance(n_partitions, int) or not 1 <= n_partitions <= MAX_PARTITIONS_PER_TOPIC:
        raise ValueError(f"n_partitions={n_partitions!r} is not in 1..{MAX_PARTITIONS_PER_TOPIC}")


def _release(logs: list[PartitionLog], discard: bool) -> None:
    """Give back the files of ``logs`` on a failure path; a second error must not hide the first.

    ``discard`` (partitions created by the failed call) closes without a flush and removes the
    partition directories: a flush writes the recovery point, which needs a free file descriptor,
    so ``close`` cannot release anything while the process is out of them (EMFILE).
    """
    for log in logs:
        try:
            if discard:
                log.delete()
            else:
                log.close()
        except OSError as exc:
            logger.warning("log release failed during rollback dir=%s error=%r", log.directory, exc)


def _write_meta(directory: Path, name: str, n_partitions: int, configs: dict[str, str]) -> None:
    """Write ``meta.json`` atomically and durably (temp file, fsync, rename, fsync the directory)."""
    meta = json.dumps({"version": 1, "name": name, "partitions": n_partitions, "configs": configs}, indent=1)
    tmp = directory / (_META + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, meta.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / _META)
    fsync_dir(directory)


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
        try:
            self._load_topics()
        except BaseException as exc:
            self.close()  # release the logs opened so far and the lock
            if isinstance(exc, OSError) and exc.errno == errno.EMFILE:
                raise TooManyOpenFilesError(
                    f"data_dir={self.data_dir}: too many open files while opening the topics; "
                    f"raise the open-files limit (ulimit -n) or delete topics"
                ) from exc
            raise
        logger.info(
            "log manager loaded data_dir=%s topics=%d partitions=%d",
            self.data_dir, len(self._logs), sum(len(v) for v in self._logs.values()),
        )

    def _load_topics(self) -> None:
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

    def _open_logs(self, name: str, partitions: range, config: LogConfig, new: bool) -> list[PartitionLog]:
        """Open ``partitions`` of ``name``; on failure release those already opened (and remove
        them when ``new``) and re-raise."""
        logs: list[PartitionLog] = []
        try:
            for p in partitions:
                logs.append(PartitionLog(self.data_dir / name / str(p), config, self._now_ms))
        except BaseException:
            _release(logs, discard=new)
            raise
        return logs

    def _open_topic(self, name: str, n_partitions: int, configs: dict[str, str]) -> None:
        config = topic_log_config(self.config, configs)
        self._logs[name] = self._open_logs(name, range(n_partitions), config, new=False)
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
        validate_partition_count(n_partitions)
        configs = {str(k): str(v) for k, v in (configs or {}).items()}
        log_config = topic_log_config(self.config, configs)  # validate before touching the disk
        work = self.data_dir / f"{name}~new"
        try:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            for p in range(n_partitions):
                (work / str(p)).mkdir()
            _write_meta(work, name, n_partitions, configs)
            os.rename(work, self.data_dir / name)  # the topic appears atomically, meta included
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise _storage_error(name, n_partitions, exc) from exc
        try:
            fsync_dir(self.data_dir)
            logs = self._open_logs(name, range(n_partitions), log_config, new=True)
        except OSError as exc:
            self._remove_dir(name)  # the logs are released: a failed create leaves nothing behind
            logger.warning("topic create failed name=%s partitions=%d error=%r", name, n_partitions, exc)
            raise _storage_error(name, n_partitions, exc) from exc
        self._logs[name], self._configs[name] = logs, configs
        logger.info("topic created name=%s partitions=%d configs=%s", name, n_partitions, configs)

    def _remove_dir(self, name: str) -> None:
        """Remove ``<data_dir>/<name>`` atomically (rename to ``~del``), then clean up; best effort."""
        work = self.data_dir / f"{name}~del"
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.rename(self.data_dir / name, work)  # gone atomically; the rest is cleanup
            fsync_dir(self.data_dir)
        except OSError as exc:
            logger.error("topic directory removal failed path=%s error=%r", self.data_dir / name, exc)
            shutil.rmtree(self.data_dir / name, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

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
        validate_partition_count(n_partitions)
        config = topic_log_config(self.config, self._configs[name])
        added = range(len(logs), n_partitions)
        try:
            # leftovers of a cut-short call are empty; meta.json (written last) is the commit point
            new_logs = self._open_logs(name, added, config, new=True)
        except OSError as exc:
            raise _storage_error(name, n_partitions, exc) from exc
        try:
            _write_meta(self.data_dir / name, name, n_partitions, self._configs[name])
        except OSError as exc:
            _release(new_logs, discard=True)
            raise _storage_error(name, n_partitions, exc) from exc
        logs.extend(new_logs)
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
        fsync_dir(self.data_dir)
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
