"""Serving side of the learner: load a published model version safely and score candidates.

Three small parts, composed by :class:`ScoringService` (docs/scoring.md):

* :class:`Scorer` -- one checkpoint (:mod:`learner.checkpoint`: verified, ``weights_only=True``)
  rebuilt into its model and objective, in eval mode, parameters frozen. ``score_batch`` returns
  the trainer's served score: ``Objective.score`` (sigmoid of the main head; plus sigmoid of the
  NDT-weighted head when that tower is trained; never CLSD's p_local). Scoring never writes DUMN's
  memory.
* :func:`candidate_batch` -- one user's point-in-time features (``UserFeatures`` from the feature
  store) and K candidate items -> a K-row :class:`SampleBatch` laid out exactly like the training
  batches (sequences oldest first, zero-padded at the end, the newest T entries kept).
* :class:`ModelFollower` -- a background consumer of ``model-updates`` (from the beginning, no
  consumer group) that loads each newer valid version fully and then swaps one reference. A
  malformed message or a checkpoint that fails to load is logged, counted and skipped; the
  previous version keeps serving.

>>> import torch
>>> from featurestore import UserFeatures
>>> from featurestore.sequences import EMPTY_SLICE
>>> uf = UserFeatures(7, None, EMPTY_SLICE, EMPTY_SLICE, EMPTY_SLICE, EMPTY_SLICE, 0, 0)
>>> b = candidate_batch(uf, [11, 12], seq_len=3, item_categories=[5, -1])
>>> b.user_id.tolist(), b.item_category.tolist(), b.click_mask.tolist()
([7, 7], [5, -1], [[False, False, False], [False, False, False]])
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from learner import LearnerError
from learner.batch import SEQUENCE_KINDS, SampleBatch
from learner.checkpoint import checkpoint_seq_len, load_checkpoint
from learner.config import ObjectiveConfig
from learner.data import DURATION_BOUNDS_MS
from learner.models import MODEL_CONFIGS, build_model
from learner.objectives import build_objective
from learner.versions import TOPIC_MODEL_UPDATES, ModelVersion, decode_records

logger = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 100
_I64_MAX = 2**63 - 1


class ScoringError(LearnerError):
    """A scoring request or a checkpoint cannot be served (the message says which and why)."""


class NoModelError(ScoringError):
    """No model version has been loaded yet: wait for the follower, or pass a checkpoint."""


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen config dataclass from its ``dataclasses.asdict`` form."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if dataclasses.is_dataclass(hints.get(f.name)) and isinstance(v, dict):
            v = _from_dict(hints[f.name], v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


class Scorer:
    """One model version, ready to score. Immutable after construction, so several threads may
    score with it at once. ``version`` is the :class:`ModelVersion` it was announced as (None for a
    checkpoint loaded by path); ``seq_len`` the T candidate batches are built with."""

    def __init__(self, model_name: str, model: torch.nn.Module, objective: torch.nn.Module, seq_len: int,
                 version: ModelVersion | None = None, step: int = 0, samples_seen: int = 0):
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len!r} must be > 0")
        self.model_name, self.model, self.objective = model_name, model.eval(), objective.eval()
        self.seq_len, self.version, self.step, self.samples_seen = seq_len, version, step, samples_seen
        for p in [*self.model.parameters(), *self.objective.parameters()]:
            p.requires_grad_(False)

    @classmethod
    def from_state(cls, state: dict[str, Any], *, version: ModelVersion | None = None,
                   seq_len: int | None = None, device: str | torch.device = "cpu") -> Scorer:
        """Rebuild model and objective from a trainer checkpoint dict (``Trainer.checkpoint_state``).

        ``seq_len``: None takes the checkpoint's recorded T, else :data:`DEFAULT_SEQ_LEN`.
        """
        try:
            cfg = state["config"]
            name = cfg["trainer"]["model"]
            if name not in MODEL_CONFIGS:
                raise ValueError(f"model {name!r} unknown; registered: {sorted(MODEL_CONFIGS)}")
            if version is not None and version.model != name:
                raise ValueError(f"version announces model {version.model!r}, checkpoint holds {name!r}")
            model = build_model(name, _from_dict(MODEL_CONFIGS[name], cfg["model"]))
            model.load_state_dict(state["model"])
            objective = build_objective(_from_dict(ObjectiveConfig, cfg["objective"]))
            objective.load_state_dict(state["objective"])
            t = seq_len or checkpoint_seq_len(state) or DEFAULT_SEQ_LEN
            return cls(name, model.to(device), objective.to(device), t, version,
                       int(state.get("step", 0)), int(state.get("samples_seen", 0)))
        except (KeyError, TypeError, ValueError, RuntimeError, LearnerError) as exc:
            raise ScoringError(f"checkpoint state does not rebuild a model: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, version: ModelVersion | None = None,
                        seq_len: int | None = None, device: str | torch.device = "cpu") -> Scorer:
        """Verify and load a checkpoint file (CheckpointError when damaged), then :meth:`from_state`."""
        state = load_checkpoint(path, map_location=device)
        return cls.from_state(state, version=version, seq_len=seq_len, device=device)

    @property
    def current(self) -> Scorer:
        """A fixed scorer is its own model source (see :class:`ModelSource`)."""
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_batch(self, batch: SampleBatch) -> torch.Tensor:
        """Served scores (B,) float32 on CPU; eval mode, no gradient, DUMN memory not written."""
        batch = batch.to(self.device) if batch.device != self.device else batch
        out = self.model(batch, write_memory=False)
        return self.objective.score(out).float().cpu()                                 # (B,)

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity of this scorer (version, model, step, samples_seen)."""
        v = self.version
        return {"version": None if v is None else v.version, "model": self.model_name,
                "path": None if v is None else v.path, "created_at_ms": None if v is None else v.created_at_ms,
                "step": self.step, "samples_seen": self.samples_seen, "seq_len": self.seq_len}


def _right_padded(values: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The newest ``seq_len`` entries of an oldest-first array, zero-padded at the end (as the
    sample decoder lays them out) -> (values (T,) int64, mask (T,) bool)."""
    kept = values[max(0, len(values) - seq_len):].astype(np.int64)
    out = np.zeros(seq_len, dtype=np.int64)                                           # (T,)
    mask = np.zeros(seq_len, dtype=bool)                                              # (T,)
    out[:len(kept)], mask[:len(kept)] = kept, True
    return out, mask


def candidate_batch(user: Any, item_ids: Sequence[int], seq_len: int, *, user_group: int = 0,
                    age_group: int = -1, item_categories: Sequence[int] | None = None,
                    item_durations_ms: Sequence[int] | None = None) -> SampleBatch:
    """K rows, one per candidate, for the user whose point-in-time ``UserFeatures`` is ``user``.

    The feature store keeps neither user attributes nor item attributes: the caller passes what
    the impression would carry (``user_group`` as the joiner codes it, ``age_group``, per-item
    ``item_categories`` and ``item_durations_ms``); left out, they take the unknown sentinels of
    the sample contract (group 0, age -1, category -1, duration 0 = bucket 0). Labels are zero.
    """
    ids = [int(i) for i in item_ids]
    k = len(ids)
    if k == 0:
        raise ScoringError("no candidate items")
    if any(not 0 <= i <= _I64_MAX for i in ids):
        raise ScoringError(f"item ids must be in [0, 2**63 - 1], got {ids}")
    cats = [-1] * k if item_categories is None else [int(c) for c in item_categories]
    durs = [0] * k if item_durations_ms is None else [int(d) for d in item_durations_ms]
    if len(cats) != k or len(durs) != k:
        raise ScoringError(f"{k} items but {len(cats)} categories and {len(durs)} durations")
    if any(d < 0 for d in durs):
        raise ScoringError(f"item_durations_ms={durs} must be >= 0")
    seqs: dict[str, torch.Tensor] = {}
    for kind in SEQUENCE_KINDS:
        sl = getattr(user, kind)
        items, mask = _right_padded(sl.item_ids, seq_len)                             # (T,), (T,)
        cat_ids, _ = _right_padded(sl.categories, seq_len)                            # (T,)
        seqs[f"{kind}_items"] = torch.from_numpy(items).repeat(k, 1)                  # (K, T)
        seqs[f"{kind}_cats"] = torch.from_numpy(cat_ids).repeat(k, 1)                 # (K, T)
        seqs[f"{kind}_mask"] = torch.from_numpy(mask).repeat(k, 1)                    # (K, T) bool
    bucket = np.searchsorted(DURATION_BOUNDS_MS, np.array(durs, dtype=np.int64), side="right")  # (K,)

    def full(value: int) -> torch.Tensor:
        return torch.full((k,), value, dtype=torch.int64)                             # (K,)

    return SampleBatch(
        user_id=full(int(user.user_id)),                                              # (K,)
        item_id=torch.tensor(ids, dtype=torch.int64),                                 # (K,)
        item_category=torch.tensor(cats, dtype=torch.int64),                          # (K,)
        user_group=full(int(user_group)),                                             # (K,)
        user_profile=full(int(age_group)).unsqueeze(1),                               # (K, 1)
        item_profile=torch.from_numpy(bucket.astype(np.int64)).unsqueeze(1),          # (K, 1)
        clicked=torch.zeros(k), valid_read=torch.zeros(k), ndt_weight=torch.zeros(k),  # (K,) each
        sample_id=torch.arange(k, dtype=torch.int64),                                 # (K,)
        **seqs,
    )


class ModelSource(Protocol):
    """Anything that hands out the scorer to use now: a :class:`Scorer` or a :class:`ModelFollower`."""

    @property
    def current(self) -> Scorer | None: ...


class ModelFollower:
    """Follows ``model-updates`` on a background thread; ``current`` is the newest good version.

    The consumer reads every partition of the topic from the beginning without a consumer group
    (nothing is committed; every follower sees the whole history). For each poll, the valid
    versions newer than the current one (optionally only of ``model``) are tried newest first: the
    first whose checkpoint loads becomes ``current`` in one reference assignment, after it is fully
    built; the older ones are skipped. ``counters``: messages, malformed (undecodable, skipped),
    refused (checkpoint failed to load or verify), loaded, stale (not newer than current).
    ``caught_up`` is set once the consumer has read up to the end offsets it saw on assignment;
    the history up to there is decoded first and only its newest good version is loaded.
    ``connected`` is set once a bootstrap server answered; none answering within
    ``bootstrap_timeout_s`` stops the thread with that error (``wait`` re-raises it).
    """

    def __init__(self, bootstrap: str, *, topic: str = TOPIC_MODEL_UPDATES, model: str | None = None,
                 seq_len: int | None = None, device: str = "cpu", poll_timeout_ms: int = 200,
                 client_id: str = "streamrec-scoring", bootstrap_timeout_s: float = 30.0):
        self.bootstrap, self.topic, self.model = bootstrap, topic, model
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.seq_len, self.device = seq_len, device
        self.poll_timeout_ms, self.client_id = poll_timeout_ms, client_id
        self.counters = {"messages": 0, "malformed": 0, "refused": 0, "loaded": 0, "stale": 0}
        self.caught_up = threading.Event()
        self.connected = threading.Event()      # a bootstrap server answered
        self.error: BaseException | None = None
        self._current: Scorer | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Scorer | None:
        return self._current

    def start(self) -> ModelFollower:
        if self._thread is not None:
            raise ScoringError("a ModelFollower can be started once")
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def __enter__(self) -> ModelFollower:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait(self, predicate: Callable[[ModelFollower], bool], timeout_s: float) -> bool:
        """Block until ``predicate(self)`` holds (re-checked at every change) or ``timeout_s`` passes.
        Re-raises an error that stopped the consumer thread."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self):
                if self.error is not None:
                    raise ScoringError(f"model follower stopped: {self.error}") from self.error
                left = deadline - time.monotonic()
                if left <= 0 or (self._thread is not None and not self._thread.is_alive()):
                    return predicate(self)
                self._changed.wait(min(left, 0.1))
        return True

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the history present at start is read and a version serves."""
        return self.wait(lambda f: f.caught_up.is_set() and f.current is not None, timeout_s)

    def wait_for_version(self, version: int, timeout_s: float) -> bool:
        """True once a version >= ``version`` serves."""
        return self.wait(lambda f: f.current is not None and f.current.version is not None
                         and f.current.version.version >= version, timeout_s)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition
        consumer = None
        try:
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, client_id=self.client_id,
                                     enable_auto_commit=False, auto_offset_reset="earliest",
                                     bootstrap_timeout_ms=max(1, int(self.bootstrap_timeout_s * 1000)))
            self.connected.set()
            parts = None
            while not parts and not self._stop.is_set():    # None or empty: the topic is not there yet
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    self._stop.wait(self.poll_timeout_ms / 1000)
            if self._stop.is_set():
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            targets = consumer.end_offsets(tps)
            logger.info("model_follower_assigned topic=%s partitions=%d end_offsets=%s", self.topic, len(tps),
                        {tp.partition: o for tp, o in targets.items()})
            pending: list[tuple[ModelVersion, int, int]] = []   # the history: loaded once, when read
            while not self._stop.is_set():
                records = consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=500)
                pending += decode_records([r for batch in records.values() for r in batch], self.model,
                                          self.counters)
                if not (self.caught_up.is_set() or all(consumer.position(tp) >= o for tp, o in targets.items())):
                    continue
                self._load_newest(pending)
                pending = []
                if not self.caught_up.is_set():
                    self.caught_up.set()
                    logger.info("model_follower_caught_up version=%s counters=%s", self._version_number(),
                                self.counters)
                self._notify()
        except BaseException as exc:  # handed to the waiting side, which re-raises it
            self.error = exc
            logger.error("model_follower_failed error=%r", exc)
            self._notify()
        finally:
            if consumer is not None:
                consumer.close()

    def _version_number(self) -> int | None:
        cur = self._current
        return None if cur is None or cur.version is None else cur.version.version

    def _load_newest(self, candidates: list[tuple[ModelVersion, int, int]]) -> None:
        """Try the versions newer than the current one, newest first; the first that loads serves."""
        candidates.sort(key=lambda c: (c[0].version, c[0].created_at_ms), reverse=True)
        for v, partition, offset in candidates:
            cur = self._version_number()
            if cur is not None and v.version <= cur:
                self.counters["stale"] += 1
                continue
            try:
                scorer = Scorer.from_checkpoint(v.path, version=v, seq_len=self.seq_len, device=self.device)
            except LearnerError as exc:
                self.counters["refused"] += 1
                logger.warning("model_version_refused version=%d path=%s partition=%d offset=%d reason=%r "
                               "serving=%s", v.version, v.path, partition, offset, str(exc), cur)
                continue
            self._current = scorer                    # the swap: one reference, a fully built model
            self.counters["loaded"] += 1
            logger.info("model_version_loaded version=%d model=%s path=%s samples_seen=%d previous=%s",
                        v.version, v.model, v.path, v.samples_seen, cur)


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Scores (K,) aligned with ``item_ids``, and the scorer that produced them (``Scorer.describe``)."""

    user_id: int
    ts_ms: int | None
    item_ids: tuple[int, ...]
    scores: np.ndarray
    model: dict[str, Any]


class ScoringService:
    """Features + model source -> scores. ``features`` is a feature-store view
    (``RocksFeatureStore`` or ``FeatureReader``); a reader is refreshed at most every
    ``refresh_interval_s`` (0: before every request). Feature reads are serialised by a lock (a
    reader is single-threaded); the model forward is not."""

    def __init__(self, features: Any, models: ModelSource, *, refresh_interval_s: float = 1.0,
                 clock_s: Callable[[], float] = time.monotonic):
        if refresh_interval_s < 0:
            raise ValueError(f"refresh_interval_s={refresh_interval_s!r} must be >= 0")
        self.features, self.models = features, models
        self.refresh_interval_s, self._clock_s = refresh_interval_s, clock_s
        self._lock = threading.Lock()
        self._last_refresh_s: float | None = None

    def _user_features(self, user_id: int, ts_ms: int | None):
        with self._lock:
            refresh = getattr(self.features, "refresh", None)
            now = self._clock_s()
            if callable(refresh) and (self._last_refresh_s is None
                                      or now - self._last_refresh_s >= self.refresh_interval_s):
                refresh()
                self._last_refresh_s = now
            return self.features.user_features(user_id, ts_ms)

    def score_request(self, user_id: int, item_ids: Sequence[int], ts_ms: int | None = None,
                      **context: Any) -> ScoreResult:
        """Score with the current model; ``context``: see :func:`candidate_batch`."""
        scorer = self.models.current          # read once: a swap mid-request does not mix versions
        if scorer is None:
            raise NoModelError("no model version loaded yet")
        if not 0 <= int(user_id) <= _I64_MAX:
            raise ScoringError(f"user_id={user_id!r} must be in [0, 2**63 - 1]")
        uf = self._user_features(int(user_id), ts_ms)
        batch = candidate_batch(uf, item_ids, scorer.seq_len, **context)
        scores = scorer.score_batch(batch).numpy()                                    # (K,)
        return ScoreResult(int(user_id), ts_ms, tuple(int(i) for i in item_ids), scores, scorer.describe())

    def score(self, user_id: int, item_ids: Sequence[int], ts_ms: int | None = None, **context: Any) -> np.ndarray:
        """Served scores (K,) float32 for the user's candidates at ``ts_ms`` (None: all stored history)."""
        return self.score_request(user_id, item_ids, ts_ms, **context).scores


__all__ = ["ModelFollower", "ModelSource", "NoModelError", "ScoreResult", "Scorer", "ScoringError",
           "ScoringService", "candidate_batch", "checkpoint_seq_len"]
