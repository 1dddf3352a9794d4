"""On-disk partition logs of the embedded broker: segments of raw v2 record batches plus sparse indexes.

This module is the entry point; the parts live in three modules, one job each:

- ``streams.broker.segment``: one segment file and its offset/time indexes, the file layout, and
  the recovery scan of a segment.
- ``streams.broker.partition_log``: ``PartitionLog``, the segments of one partition; appends,
  reads, the fsync policy and recovery point, retention.
- ``streams.broker.log_manager``: ``LogManager``, all topics under one data directory;
  ``meta.json``, the directory lock, topic configs.

Reads return whole batches from one segment. Not thread-safe: call from one thread (the broker's
event loop); every method is synchronous and cheap except fsync.
"""
from __future__ import annotations

import logging

from streams.broker.log_manager import (
    CorruptTopicMetaError,
    DataDirLockedError,
    InvalidConfigError,
    InvalidTopicError,
    LogManager,
    TopicExistsError,
    UnknownTopicError,
    topic_log_config,
    validate_topic_name,
)
from streams.broker.partition_log import LogClosedError, OffsetOutOfRangeError, PartitionLog, wall_clock_ms

logger = logging.getLogger(__name__)  # segment, partition_log and log_manager log here too

__all__ = [
    "CorruptTopicMetaError",
    "DataDirLockedError",
    "InvalidConfigError",
    "InvalidTopicError",
    "LogClosedError",
    "LogManager",
    "OffsetOutOfRangeError",
    "PartitionLog",
    "TopicExistsError",
    "UnknownTopicError",
    "topic_log_config",
    "validate_topic_name",
    "wall_clock_ms",
]
