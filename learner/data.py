"""Samples file -> SampleBatch minibatches, in stream order, decoded ahead on a background thread.

A samples file holds the messages of the ``samples`` topic end to end, each framed as a u32
little-endian length followed by the exact message bytes (the framing of
``streams.samples_file``). The learner reads it in file order, which is the order the stream
delivered the samples: the prequential trainer sees them exactly as a live consumer would.

Column mapping (:func:`batch_from_columns`, wire field -> SampleBatch field):

* ``user_id``, ``item_id``, ``item_category`` -> the same names (int64; category -1 = unknown);
* ``user_group`` -> ``user_group`` (the joiner's mixed-radix code, by default the activeness level;
  CLSD's x_local);
* ``age_group`` -> ``user_profile[:, 0]``;
* ``item_duration_ms`` -> ``item_profile[:, 0]``, a duration bucket (:data:`DURATION_BOUNDS_MS`);
* flags ``clicked`` / ``valid_read`` and ``ndt_weight`` -> the labels (float32);
* the click / unclick / like / dislike snapshots -> ``*_items``, ``*_cats`` (int64), ``*_mask``;
* ``impression_id`` -> ``sample_id``.

>>> import numpy as np
>>> from streams.samples import Sample, Snapshot, encode
>>> s = Sample(impression_id=7, ts_ms=1_000, user_id=42, item_id=9, label_ts_ms=2_000, clicked=True,
...            item_duration_ms=20_000, snapshot=Snapshot(click_items=(3,), click_cats=(1,), newest_ts_ms=900))
>>> b = batch_from_columns(decode_columns([encode(s)], seq_len=2))
>>> b.user_id.tolist(), b.click_items.tolist(), b.click_mask.tolist(), b.item_profile.tolist(), b.clicked.tolist()
([42], [[3, 0]], [[True, False]], [[3]], [1.0])
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learner import LearnerError
from learner.config import require_non_negative, require_positive
from learner.batch import SEQUENCE_KINDS, SampleBatch
from streams import samples_file
from streams.samples import SampleColumns, decode_batch

logger = logging.getLogger(__name__)

# item_duration_ms -> bucket: 0 (unknown / 0 ms), then (0, 7 s], (7, 15], (15, 30], (30, 60], (60, 120], (120, 300], > 300 s
DURATION_BOUNDS_MS = np.array([1, 7_001, 15_001, 30_001, 60_001, 120_001, 300_001], dtype=np.int64)


class SamplesFileError(LearnerError):
    """A samples file is truncated inside a frame or cannot be read."""


@dataclass(frozen=True)
class DataConfig:
    """How a samples file becomes minibatches.

    ``start_offset_bytes`` resumes reading at a frame boundary recorded in a checkpoint;
    ``max_samples`` (0 = all) stops after that many messages; ``prefetch`` batches are decoded
    ahead by the background thread; ``pin_memory`` pages them in for asynchronous CUDA copies.
    """

    path: str
    batch_size: int = 256
    seq_len: int = 100
    start_offset_bytes: int = 0
    max_samples: int = 0
    prefetch: int = 2
    pin_memory: bool = False

    def __post_init__(self) -> None:
        require_positive(self, "batch_size", "seq_len", "prefetch")
        require_non_negative(self, "start_offset_bytes", "max_samples")


@dataclass
class LoadedBatch:
    """One decoded minibatch and where it came from.

    ``start_offset_bytes`` / ``end_offset_bytes``: the file positions of its first frame and just
    past its last (the resume point); ``n_rejected``: messages of these frames that failed the
    sample contract (counted and logged with their reasons, never trained on). A batch whose
    every row was rejected is still yielded, empty, so that its messages and offsets count.
    """

    batch: SampleBatch
    start_offset_bytes: int
    end_offset_bytes: int
    n_messages: int
    n_rejected: int


def decode_columns(values: list[bytes], seq_len: int = 100) -> SampleColumns:
    """``streams.samples.decode_batch`` (the only sample decoder), zero-padded sequences."""
    return decode_batch(values, seq_len=seq_len)


def _i64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def batch_from_columns(cols: SampleColumns) -> SampleBatch:
    """Map the decoded columns of good rows onto a SampleBatch (see the module docstring)."""
    fx = cols.fixed
    duration = np.searchsorted(DURATION_BOUNDS_MS, fx["item_duration_ms"].astype(np.int64), side="right")  # (B,)
    seqs: dict[str, torch.Tensor] = {}
    for kind in SEQUENCE_KINDS:
        sc = cols.seq[kind]
        seqs[f"{kind}_items"] = _i64(sc.items)                                       # (B, T)
        seqs[f"{kind}_cats"] = _i64(sc.cats)                                         # (B, T)
        seqs[f"{kind}_mask"] = torch.from_numpy(np.ascontiguousarray(sc.mask))       # (B, T) bool
    return SampleBatch(
        user_id=_i64(fx["user_id"]),                                                 # (B,)
        item_id=_i64(fx["item_id"]),                                                 # (B,)
        item_category=_i64(fx["item_category"]),                                     # (B,)
        user_group=_i64(fx["user_group"]),                                           # (B,)
        user_profile=_i64(fx["age_group"]).unsqueeze(1),                             # (B, 1)
        item_profile=_i64(duration).unsqueeze(1),                                    # (B, 1)
        clicked=_f32(cols.column("clicked")),                                        # (B,)
        valid_read=_f32(cols.column("valid_read")),                                  # (B,)
        ndt_weight=_f32(fx["ndt_weight"]),                                           # (B,)
        sample_id=_i64(fx["impression_id"]),                                         # (B,)
        **seqs,
    )


def write_frames(path: str | Path, values) -> int:
    """Frame ``values`` (bytes) into a samples file (:func:`streams.samples_file.write_samples`)."""
    return samples_file.write_samples(path, values)


def iter_frames(path: str | Path, start_offset_bytes: int = 0) -> Iterator[tuple[bytes, int]]:
    """(message, offset just past it) for each frame from ``start_offset_bytes``; a cut frame raises
    :class:`SamplesFileError` (:func:`streams.samples_file.iter_records`, errors as learner errors)."""
    try:
        yield from samples_file.iter_records(path, start_offset_bytes)
    except samples_file.SamplesFileError as exc:
        raise SamplesFileError(str(exc)) from None


def count_frames(path: str | Path) -> int:
    """Number of messages in a samples file (reads only the length words)."""
    try:
        return samples_file.count_samples(path)
    except samples_file.SamplesFileError as exc:
        raise SamplesFileError(str(exc)) from None


_DONE = object()


class SampleLoader:
    """Iterate a samples file as :class:`LoadedBatch` es in file order.

    A background thread reads frames, decodes them with the sample contract's batch decoder, builds
    the tensors (pinned when ``pin_memory``) and keeps ``prefetch`` batches ready, so decoding
    overlaps training. Errors in the thread are re-raised in the consumer. Use as an iterator once,
    or as a context manager to stop the thread early.
    """

    def __init__(self, cfg: DataConfig):
        if not Path(cfg.path).is_file():
            raise SamplesFileError(f"samples file {cfg.path!r} does not exist")
        self.cfg = cfg
        self.n_rejected = 0
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _produce(self) -> None:
        cfg = self.cfg
        try:
            values: list[bytes] = []
            start = end = cfg.start_offset_bytes
            n_total = 0
            for value, end_pos in iter_frames(cfg.path, cfg.start_offset_bytes):
                values.append(value)
                end = end_pos
                n_total += 1
                last = cfg.max_samples and n_total >= cfg.max_samples
                if len(values) == cfg.batch_size or last:
                    self._emit(values, start, end)
                    values, start = [], end
                if last or self._stop.is_set():
                    break
            if values and not self._stop.is_set():
                self._emit(values, start, end)
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _emit(self, values: list[bytes], start: int, end: int) -> None:
        cols = decode_columns(values, self.cfg.seq_len)
        for index, reason in cols.errors:
            logger.warning("sample rejected offset_bytes=%d row=%d reason=%r", start, index, reason)
        batch = batch_from_columns(cols)
        if self.cfg.pin_memory:
            batch = batch.pin_memory()
        self._put(LoadedBatch(batch, start, end, len(values), len(cols.errors)))

    def __iter__(self) -> Iterator[LoadedBatch]:
        if self._thread is not None:
            raise LearnerError("a SampleLoader can be iterated once")
        self._thread = threading.Thread(target=self._produce, name="sample-loader", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.n_rejected += item.n_rejected
                yield item   # an empty one too (every row rejected): its messages and offsets count
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background thread (pending batches are dropped; the file position is not)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> "SampleLoader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
