"""Frozen feature-store configs, validated in ``__post_init__``.

Defaults follow the dwell-time paper where it gives a value (section 2.2: a 7-day click window for
T2, the item P10 for T3, ``x_l = exp(mu - sigma)`` for T1) and the DUMN sequence length T = 100.
Values the papers leave open (bucket width, lateness, half-life, sketch k) are documented in
docs/featurestore.md next to the value chosen here.

>>> cfg = FeatureStoreConfig()
>>> cfg.sequences.capacity, cfg.counters.window_ms // 86_400_000, cfg.sketch.quantile
(128, 7, 0.1)
>>> SequenceConfig(max_len=0)
Traceback (most recent call last):
...
ValueError: max_len=0 must be > 0
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from rocksdict import BlockBasedOptions, Cache, DBCompressionType, Options, WriteOptions

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name}={value!r} must be > 0")


def _non_negative(name: str, value: int | float) -> None:
    if value < 0:
        raise ValueError(f"{name}={value!r} must be >= 0")


@dataclass(frozen=True)
class SequenceConfig:
    """Per-user behaviour sequences (click, unclick, like, dislike).

    ``max_len`` is T, the longest slice a reader asks for. ``slack`` extra entries are kept so a
    point-in-time read ``before(ts_ms, max_len)`` stays exact while up to ``slack`` entries newer
    than ``ts_ms`` have already been applied (events that arrive before the impression they follow
    is sampled). Storage per sequence is ``capacity = max_len + slack`` entries.
    """

    max_len: int = 100
    slack: int = 28

    def __post_init__(self) -> None:
        _positive("max_len", self.max_len)
        _non_negative("slack", self.slack)
        if self.capacity > 0xFFFF:
            raise ValueError(f"max_len + slack = {self.capacity} must be <= 65535")

    @property
    def capacity(self) -> int:
        return self.max_len + self.slack


def retained_buckets(window_buckets: int, late_buckets: int) -> int:
    """The buckets a windowed counter keeps: the window's, the one the window's start falls in
    (a window of whole buckets ending mid-bucket spans one more), and the late ones."""
    return window_buckets + 1 + late_buckets


@dataclass(frozen=True)
class CounterConfig:
    """Windowed per-user event-time counters, bucketed.

    ``count(ts_ms)`` sums the ``window_buckets + 1`` buckets ending with the bucket that holds
    ``ts_ms`` (the default: 168 one-hour buckets and the one below them = all of the trailing 7 days,
    at one-hour resolution). Buckets up to
    ``late_buckets`` older than the window of the newest event are retained, so events that arrive
    up to that late still land and queries up to that far in the past stay exact.
    """

    bucket_ms: int = _HOUR_MS
    window_buckets: int = 168
    late_buckets: int = 24

    def __post_init__(self) -> None:
        _positive("bucket_ms", self.bucket_ms)
        _positive("window_buckets", self.window_buckets)
        _non_negative("late_buckets", self.late_buckets)
        if self.retain_buckets > 0xFFFF:
            raise ValueError(f"window_buckets + 1 + late_buckets = {self.retain_buckets} must be <= 65535")

    @property
    def window_ms(self) -> int:
        return self.bucket_ms * self.window_buckets

    @property
    def retain_buckets(self) -> int:
        return retained_buckets(self.window_buckets, self.late_buckets)


@dataclass(frozen=True)
class SketchConfig:
    """Per-item deterministic dwell quantile sketches (featurestore/sketches.py). ``k`` = 200 gives
    a normalized rank error bound of 1 % (2/k; measured at most 0.43 %); ``quantile`` is the T3 rank."""

    k: int = 200
    quantile: float = 0.1

    def __post_init__(self) -> None:
        if not 8 <= self.k <= 65535:
            raise ValueError(f"k={self.k!r} must be in [8, 65535]")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile={self.quantile!r} must be in [0, 1]")


@dataclass(frozen=True)
class DwellStatsConfig:
    """Streaming mu / sigma of ln(dwell_ms) over clicks with exponential decay in event time.

    An observation ``age_ms`` older than the newest one weighs ``2 ** (-age_ms / half_life_ms)``;
    ``half_life_ms=None`` disables decay (exact mean and population std). Dwell below
    ``min_dwell_ms`` is clamped to it (ln 0 is undefined).
    """

    half_life_ms: int | None = 7 * _DAY_MS
    min_dwell_ms: int = 1

    def __post_init__(self) -> None:
        if self.half_life_ms is not None:
            _positive("half_life_ms", self.half_life_ms)
        _positive("min_dwell_ms", self.min_dwell_ms)


@dataclass(frozen=True)
class FeatureStoreConfig:
    """Everything the store and its readers need; readers must use the writer's config.

    ``sync_writes`` fsyncs the WAL on every commit (survives an OS crash, not just a process
    crash); commits are atomic either way.
    """

    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    counters: CounterConfig = field(default_factory=CounterConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    dwell: DwellStatsConfig = field(default_factory=DwellStatsConfig)
    sync_writes: bool = False
    write_buffer_bytes: int = 32 << 20
    block_cache_bytes: int = 64 << 20
    compression: str = "lz4"

    def __post_init__(self) -> None:
        _positive("write_buffer_bytes", self.write_buffer_bytes)
        _positive("block_cache_bytes", self.block_cache_bytes)
        if self.compression not in ("none", "lz4", "zstd", "snappy"):
            raise ValueError(f"compression={self.compression!r} must be none, lz4, zstd or snappy")

    def to_rocksdict_options(self, create: bool = True) -> Options:
        """rocksdict ``Options`` in raw mode (bytes keys and values, never pickle).

        ``max_open_files = -1`` is what a secondary instance requires, so primary and readers share
        one option set.
        """
        opts = Options(raw_mode=True)
        opts.create_if_missing(create)
        opts.set_max_open_files(-1)
        opts.set_write_buffer_size(self.write_buffer_bytes)
        opts.set_compression_type(getattr(DBCompressionType, self.compression)())
        table = BlockBasedOptions()
        table.set_block_cache(Cache(self.block_cache_bytes))
        table.set_bloom_filter(10, False)  # point lookups dominate: one get per user / item key
        opts.set_block_based_table_factory(table)
        # most lookups miss (a user's like / dislike sequences, new users and items) and recent keys
        # live in the memtable: a whole-key bloom filter there (2 % of the write buffer) answers a
        # miss without a skiplist search; the joiner's user multi-gets took a third less time
        opts.set_memtable_whole_key_filtering(True)
        opts.set_memtable_prefix_bloom_ratio(0.02)
        return opts

    def to_write_options(self) -> WriteOptions:
        wopts = WriteOptions()
        wopts.sync = self.sync_writes
        return wopts


#: the settings that decide how stored values are encoded and read (the rest only tune RocksDB)
_LAYOUT_TYPES = {"sequences": SequenceConfig, "counters": CounterConfig, "sketch": SketchConfig,
                 "dwell": DwellStatsConfig}
LAYOUT_FIELDS = tuple(_LAYOUT_TYPES)


def layout_of(config: FeatureStoreConfig) -> dict:
    """The layout part of ``config`` as plain data (what a store records about itself)."""
    return {name: dataclasses.asdict(getattr(config, name)) for name in LAYOUT_FIELDS}


def encode_layout(config: FeatureStoreConfig) -> bytes:
    return json.dumps(layout_of(config), sort_keys=True, separators=(",", ":")).encode()


def with_layout(config: FeatureStoreConfig, raw: bytes) -> FeatureStoreConfig:
    """``config`` with the layout a store recorded (:func:`encode_layout`); ValueError if unreadable."""
    try:
        layout = json.loads(raw)
        return dataclasses.replace(config, **{name: _LAYOUT_TYPES[name](**layout[name]) for name in LAYOUT_FIELDS})
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable layout record {raw[:200]!r}: {exc}") from None


def check_layout(path: str, recorded: bytes, config: FeatureStoreConfig, advice: str,
                 whose: str = "this config") -> None:
    """Raise :class:`LayoutMismatchError` when ``config``'s layout is not the one the store at
    ``path`` recorded (values written with one layout are misread with another, silently)."""
    from featurestore import LayoutMismatchError
    mine = encode_layout(config)
    if recorded != mine:
        raise LayoutMismatchError(f"the feature store at path={path} was written with layout "
                                  f"{recorded.decode(errors='replace')}, {whose} has {mine.decode()}: {advice}")
