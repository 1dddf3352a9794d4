"""rocksdict-backed online feature store: user sequences, windowed counters, item dwell sketches and
global dwell statistics, written by the stream joiner and read by the learner and scoring.

Layout: :mod:`featurestore.keys` (the only key encoder), :mod:`featurestore.codecs` (value bytes),
one aggregate per module (:mod:`~featurestore.sequences`, :mod:`~featurestore.counters`,
:mod:`~featurestore.sketches`, :mod:`~featurestore.dwellstats`), :mod:`featurestore.store` (the
writer, state and source offsets in one ``WriteBatch``) and :mod:`featurestore.reader` (a secondary
instance in another process). This package imports no other project package.
"""


class FeatureStoreError(Exception):
    """Root of every error raised by the ``featurestore`` package."""


class KeyEncodingError(FeatureStoreError):
    """A key is malformed or a key field is out of range."""


class CodecError(FeatureStoreError):
    """Stored value bytes do not decode; the store may be corrupt or written by a newer version."""


class TransactionStateError(FeatureStoreError):
    """A transaction was used outside its lifecycle (after commit/abort, or two at once)."""


class OffsetRegressionError(FeatureStoreError):
    """A source offset would move backwards; the writer is replaying without a rewind."""


class StoreClosedError(FeatureStoreError):
    """The store or reader was used after ``close()``."""


class LayoutMismatchError(FeatureStoreError):
    """A store was opened with layout settings (sequences, counters, sketch, dwell) other than the
    ones it was written with."""


class StoreNotFoundError(FeatureStoreError):
    """A reader was pointed at a path that holds no store: never created there, moved or removed."""


from featurestore.config import (  # noqa: E402  (errors above must exist before submodules import them)
    CounterConfig,
    DwellStatsConfig,
    FeatureStoreConfig,
    SequenceConfig,
    SketchConfig,
)
from featurestore.keys import CounterKind, ItemCountField, SequenceKind  # noqa: E402
from featurestore.counters import WindowedCounter  # noqa: E402
from featurestore.dwellstats import DwellStats  # noqa: E402
from featurestore.sequences import SequenceSlice, UserSequence  # noqa: E402
from featurestore.sketches import DwellSketch  # noqa: E402
from featurestore.reader import FeatureReader, ItemFeatures, UserFeatures  # noqa: E402
from featurestore.store import CommitInfo, FeatureStore, RocksFeatureStore, StoreBatch  # noqa: E402

__all__ = [
    "CodecError", "CommitInfo", "CounterConfig", "CounterKind", "DwellSketch", "DwellStats",
    "DwellStatsConfig", "FeatureReader", "FeatureStore", "FeatureStoreConfig", "FeatureStoreError",
    "ItemCountField", "ItemFeatures", "KeyEncodingError", "LayoutMismatchError", "OffsetRegressionError",
    "RocksFeatureStore", "SequenceConfig", "SequenceKind", "SequenceSlice", "SketchConfig",
    "StoreBatch", "StoreClosedError", "StoreNotFoundError", "TransactionStateError",
    "UserFeatures", "UserSequence", "WindowedCounter",
]
