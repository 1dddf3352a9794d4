"""Configuration of the embedded Kafka-compatible broker (frozen dataclasses, validated on creation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FsyncPolicy = Literal["always", "interval", "never"]


# Each open partition holds file descriptors (segment files), so an unbounded count exhausts the
# open-files limit: a broker-local guard (Kafka has no such cap).
MAX_PARTITIONS_PER_TOPIC = 1000


@dataclass(frozen=True)
class LogConfig:
    """On-disk log of one partition.

    fsync policy (what an acknowledged write survives):
      - ``always``: fsync before the Produce response; survives process kill and power loss.
      - ``interval``: write() before the response, fsync every ``fsync_interval_ms``; survives
        ``kill -9`` of the broker (the page cache holds the data), may lose the last interval on
        power loss or a kernel crash.
      - ``never``: leave flushing to the OS; same guarantee as ``interval`` against ``kill -9``.

    Segments roll when the next append would pass ``segment_bytes`` or the active segment is older
    than ``segment_ms`` (wall clock since it was opened), so time retention can reach old data.
    ``verify_crc_on_append`` checks each produced batch's CRC-32C before it is stored (cheap with
    the compiled CRC from aiokafka; see ``streams.broker.records``).
    ``max_uncompressed_batch_bytes`` bounds what one compressed batch may inflate to when a
    timestamp lookup decodes it (beyond it the lookup answers at batch granularity) and, with
    7 bytes per record at least, the ``records_count`` a compressed batch may claim on append.
    """

    segment_bytes: int = 64 * 1024 * 1024
    segment_ms: int = 7 * 24 * 3600 * 1000
    index_interval_bytes: int = 4096
    fsync: FsyncPolicy = "interval"
    fsync_interval_ms: int = 1000
    retention_bytes: int = -1  # per partition; -1 = unlimited
    retention_ms: int = 7 * 24 * 3600 * 1000  # -1 = unlimited
    verify_crc_on_append: bool = True
    max_uncompressed_batch_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1024 <= self.segment_bytes <= 2**31 - 1:
            raise ValueError(f"segment_bytes={self.segment_bytes!r} is not in 1024..2**31-1")
        if self.segment_ms < 1:
            raise ValueError(f"segment_ms={self.segment_ms!r} < 1")
        if self.index_interval_bytes < 1:
            raise ValueError(f"index_interval_bytes={self.index_interval_bytes!r} < 1")
        if self.fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync={self.fsync!r} is not one of always|interval|never")
        if self.fsync_interval_ms < 1:
            raise ValueError(f"fsync_interval_ms={self.fsync_interval_ms!r} < 1")
        if self.retention_bytes < -1 or self.retention_bytes == 0:
            raise ValueError(f"retention_bytes={self.retention_bytes!r} must be -1 or > 0")
        if self.retention_ms < -1 or self.retention_ms == 0:
            raise ValueError(f"retention_ms={self.retention_ms!r} must be -1 or > 0")
        if self.max_uncompressed_batch_bytes < 1024:
            raise ValueError(f"max_uncompressed_batch_bytes={self.max_uncompressed_batch_bytes!r} < 1024")


@dataclass(frozen=True)
class GroupConfig:
    """Consumer-group coordinator settings (names follow Apache Kafka's broker configs)."""

    min_session_timeout_ms: int = 1000
    max_session_timeout_ms: int = 30 * 60 * 1000
    initial_rebalance_delay_ms: int = 0  # Kafka's default is 3000; 0 keeps tests and demos snappy
    offsets_retention_ms: int = 7 * 24 * 3600 * 1000

    def __post_init__(self) -> None:
        if not 0 < self.min_session_timeout_ms <= self.max_session_timeout_ms:
            raise ValueError(
                f"need 0 < min_session_timeout_ms={self.min_session_timeout_ms!r} "
                f"<= max_session_timeout_ms={self.max_session_timeout_ms!r}"
            )
        if self.initial_rebalance_delay_ms < 0:
            raise ValueError(f"initial_rebalance_delay_ms={self.initial_rebalance_delay_ms!r} < 0")


@dataclass(frozen=True)
class BrokerConfig:
    """The whole embedded broker. Binds 127.0.0.1 unless told otherwise; port 0 = pick a free one.

    ``fetch_max_bytes`` caps the records in one Fetch response whatever the request asks for
    (Kafka's ``fetch.max.bytes``; one batch larger than it is still served, KIP-74).
    ``connections_max_idle_ms`` closes a connection that sends no request for that long (Kafka's
    ``connections.max.idle.ms``; clients reconnect on demand); a fetch parked in a long poll is
    not idle. -1 keeps idle connections open.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 9092
    advertised_host: str | None = None  # what Metadata tells clients; defaults to host
    node_id: int = 0
    default_partitions: int = 3
    auto_create_topics: bool = True
    max_request_bytes: int = 100 * 1024 * 1024
    fetch_max_bytes: int = 55 * 1024 * 1024
    connections_max_idle_ms: int = 10 * 60 * 1000
    log: LogConfig = field(default_factory=LogConfig)
    groups: GroupConfig = field(default_factory=GroupConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} is not in 0..65535")
        if self.default_partitions < 1:
            raise ValueError(f"default_partitions={self.default_partitions!r} < 1")
        if self.default_partitions > MAX_PARTITIONS_PER_TOPIC:
            raise ValueError(f"default_partitions={self.default_partitions!r} > {MAX_PARTITIONS_PER_TOPIC}, "
                             "the most partitions a topic may have")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes={self.max_request_bytes!r} < 1024")
        if self.fetch_max_bytes < 1024:
            raise ValueError(f"fetch_max_bytes={self.fetch_max_bytes!r} < 1024")
        if self.connections_max_idle_ms < -1 or self.connections_max_idle_ms == 0:
            raise ValueError(f"connections_max_idle_ms={self.connections_max_idle_ms!r} must be -1 or > 0")
