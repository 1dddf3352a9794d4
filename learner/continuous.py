"""The continuous learner: a sample stream, a prequential trainer, checkpoints and model versions.

:class:`ContinuousLearner` wires parts that each do one job: :class:`learner.stream.SampleStream`
(Kafka), :class:`learner.trainer.Trainer` (score, then train, each minibatch),
:class:`CheckpointStore` (numbered atomic checkpoints, the last ``keep`` of them),
:class:`VersionPublisher` (``model-updates``), an optional :class:`AuditLog` and a
:class:`learner.prometheus.MetricsRegistry` / :class:`learner.progress.ProgressLine` for the live view.

Checkpoint order (every ``checkpoint_every_steps`` minibatches or ``checkpoint_every_s`` seconds,
on a rebalance and on stop):

1. flush the audit log (fsync) and note its length; copy the trainer's complete state (model,
   optimizer, DUMN memory, objective and metric state, configs, ``source_offsets``: the next offset
   of every partition trained). Training pauses only for this; the rest runs on a writer thread,
   one checkpoint at a time, in version order;
2. save the copy atomically as ``ckpt-<version>.pt``;
3. flush the dead letters, announce ``ModelVersion`` on ``model-updates`` (keyed by the model
   name, acks=all);
4. commit the same offsets to the consumer group;
5. delete checkpoints beyond the newest ``keep``.

A rebalance and a stop wait for all five steps before partitions are released.

Restart: the newest checkpoint that verifies is loaded (a corrupt or truncated one is refused with
an error naming the file and the reason, and the one before it is used), the audit log is cut back
to the length that checkpoint recorded, and the stream seeks every partition to the checkpoint's
offset (partitions the checkpoint never saw start at the beginning). Every sample inside the
restored model was trained exactly once and every later sample comes next: nothing twice, nothing
skipped. Version numbers keep rising past every file name in the directory, refused ones included.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from learner.checkpoint import require_seq_len
from learner.checkpoint_store import AuditLog, CheckpointStore
from learner.stream import RebalanceBarrier, SampleStream, StreamBatch, from_source_offsets, to_source_offsets
from learner.trainer import Trainer
from learner.versions import TOPIC_MODEL_UPDATES, ModelVersion

logger = logging.getLogger(__name__)


class StopFlag(Protocol):
    """What a learner's loop reads to stop: a ``threading.Event`` or ``streamrec.signals.StopOnSignal``."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class LearnerConfig:
    """Checkpoint, version and live-view policy of one continuous learner.

    ``model_name`` keys the ``model-updates`` messages (default: the trainer's model).
    ``checkpoint_every_steps`` (0: off) / ``checkpoint_every_s`` (0: off): whichever comes first.
    ``keep_checkpoints``: newest files kept. ``audit_log``: append "partition offset sample_id" of
    every trained sample to this file (cut back on restart to the restored checkpoint; an operator's
    record of exactly which samples are inside the model). ``max_samples`` (0: run until stopped).
    """

    checkpoint_dir: str
    model_name: str = ""
    checkpoint_every_steps: int = 1000
    checkpoint_every_s: float = 10.0
    keep_checkpoints: int = 3
    publish_versions: bool = True
    audit_log: str = ""
    max_samples: int = 0
    progress_every_s: float = 1.0
    freshness_window: int = 100_000
    publish_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.checkpoint_dir:
            raise ValueError("checkpoint_dir='' (the learner always checkpoints)")
        if self.checkpoint_every_steps < 0 or self.checkpoint_every_s < 0:
            raise ValueError(f"checkpoint_every_steps={self.checkpoint_every_steps!r} and "
                             f"checkpoint_every_s={self.checkpoint_every_s!r} must be >= 0")
        if self.checkpoint_every_steps == 0 and self.checkpoint_every_s == 0:
            raise ValueError("checkpoint_every_steps=0 and checkpoint_every_s=0: no checkpoint would be cut")
        for name in ("keep_checkpoints", "freshness_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.max_samples < 0:
            raise ValueError(f"max_samples={self.max_samples!r} must be >= 0")
        if self.progress_every_s <= 0 or self.publish_timeout_s <= 0:
            raise ValueError("progress_every_s and publish_timeout_s must be > 0")


def _detached_copy(obj: Any) -> Any:
    """``obj`` with every tensor cloned, so training can go on while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detached_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detached_copy(v) for v in obj)
    return obj


class VersionPublisher:
    """Produces each :class:`ModelVersion` to ``model-updates`` and waits for the broker's ack."""

    def __init__(self, producer, topic: str = TOPIC_MODEL_UPDATES, timeout_s: float = 30.0):
        self.producer = producer
        self.topic = topic
        self.timeout_s = timeout_s

    def publish(self, version: ModelVersion) -> None:
        self.producer.send(self.topic, key=version.key, value=version.encode()).get(timeout=self.timeout_s)
        self.producer.flush(timeout=self.timeout_s)


@dataclass
class LearnerStats:
    """What the live view shows; read by the progress line and the metrics registry."""

    version: int = 0
    n_versions: int = 0
    last_checkpoint_s: float = float("nan")   # time.time() of the last durable checkpoint
    version_times_s: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=1024))  # the newest
    n_publish_failures: int = 0


class ContinuousLearner:
    """Trains ``trainer`` on ``stream`` forever (or ``max_samples``), checkpointing and publishing.

    ``restore()`` once before ``run(stop)``; ``run`` returns when ``stop`` is set (SIGTERM in the CLI)
    or ``max_samples`` are trained, after the final checkpoint. See the module docstring.
    """

    def __init__(self, cfg: LearnerConfig, trainer: Trainer, stream: SampleStream, store: CheckpointStore,
                 publisher: VersionPublisher | None = None, audit: AuditLog | None = None,
                 registry=None, progress=None, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.trainer = trainer
        self.stream = stream
        self.store = store
        self.publisher = publisher
        self.audit = audit
        self.registry = registry
        self.progress = progress
        self.clock = clock
        self.model_name = cfg.model_name or trainer.cfg.model
        self.topic = stream.cfg.topic
        self.offsets: dict[int, int] = {}
        self.stats = LearnerStats()
        self._freshness: deque[np.ndarray] = deque()
        self._n_fresh = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._dirty = False
        self._version = 1
        self._last_ckpt_step = 0
        self._last_ckpt_t = clock()
        self._last_tick = 0.0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._writing: Future | None = None

    # ---- restart ---------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the newest good checkpoint, cut the audit log back, position the stream.

        Returns the restored version (0: none, start from the group's committed offsets)."""
        found = self.store.load_newest()
        self._version = max(self.store.next_version(), self.version_floor + 1)
        audit_bytes = 0
        restored = 0
        if found is not None:
            restored, path, state = found
            require_seq_len(state, self.stream.cfg.seq_len, str(path))
            self.trainer.load_checkpoint_state(state)
            self.offsets = from_source_offsets(self.topic, self.trainer.source_offsets)
            audit_bytes = int(state.get("learner", {}).get("audit_bytes", 0))
            self.stats.version = restored
            self.stats.last_checkpoint_s = float(state.get("learner", {}).get("created_at_ms", 0)) / 1000
            self.stream.set_positions(self.offsets, unknown="earliest")
            logger.info("recover version=%d path=%s step=%d samples=%d offsets=%s next_version=%d", restored, path,
                        self.trainer.step, self.trainer.samples_seen, self.offsets, self._version)
        else:
            self.stream.set_positions({}, unknown="committed")
            logger.info("recover version=0 (no checkpoint in %s): group offsets or the beginning", self.store.dir)
        if self.audit is not None:
            self.audit.open(audit_bytes)
        self._last_ckpt_step = self.trainer.step
        return restored

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stop: StopFlag) -> None:
        self._last_ckpt_t = self.clock()
        self.stream.start()
        clean = False
        try:
            limit = self.cfg.max_samples
            while not stop.is_set() and not (limit and self.trainer.samples_seen >= limit):   # a restore may be past it
                item = self.stream.get(timeout_s=0.2)
                if isinstance(item, RebalanceBarrier):
                    if self._dirty:
                        self.checkpoint("rebalance", wait=True)
                    self.wait_for_writes()
                    item.reply(self.offsets)
                elif item is not None:
                    self._train(item)
                    every = self.cfg.checkpoint_every_steps
                    if every and self.trainer.step - self._last_ckpt_step >= every:
                        self.checkpoint("steps")
                now = self.clock()
                if self._dirty and self.cfg.checkpoint_every_s and now - self._last_ckpt_t >= self.cfg.checkpoint_every_s:
                    self.checkpoint("time")
                if now - self._last_tick >= self.cfg.progress_every_s:
                    self._tick(now)
            if self._dirty:
                self.checkpoint("final", wait=True)
            self.wait_for_writes()
            clean = True
        finally:
            self._close(clean)
            logger.info("learner stopped clean=%s step=%d samples=%d version=%d", clean, self.trainer.step,
                        self.trainer.samples_seen, self.stats.version)

    def _close(self, clean: bool) -> None:
        """Stop the writer, the stream (committing the final offsets after a clean stop), the live
        view and the audit log."""
        if not clean and self._writing is not None:   # let a consistent copy already handed over land
            try:
                self.wait_for_writes()
            except Exception:
                logger.exception("checkpoint write failed while stopping")
        self._writer.shutdown(wait=True)
        self.stream.close(final_offsets=self.offsets if clean else None)
        self._tick(self.clock())
        if self.progress is not None:
            self.progress.close()
        if self.audit is not None:
            self.audit.close()

    def _train(self, item: StreamBatch) -> None:
        batch = item.batch
        if batch.batch_size:
            now_ms = int(self.clock() * 1000)
            self._note_freshness(now_ms - item.timestamps_ms)                      # (B,)
            self.trainer.train_batch(batch)
            if self.audit is not None:
                self.audit.append(item.partitions, item.offsets, batch.sample_id.cpu().numpy())
        self.trainer.n_rejected += item.n_rejected
        self.offsets.update(item.next_offsets)
        self.trainer.source_offsets = to_source_offsets(self.topic, self.offsets)
        self._dirty = True

    def _note_freshness(self, ages_ms: np.ndarray) -> None:
        self._freshness.append(ages_ms)
        self._n_fresh += len(ages_ms)
        while self._n_fresh - len(self._freshness[0]) >= self.cfg.freshness_window:
            self._n_fresh -= len(self._freshness.popleft())

    def freshness_ms(self) -> np.ndarray:
        """Produced -> inside a training step, ms, of the last ``freshness_window`` samples or so."""
        return np.concatenate(list(self._freshness)) if self._freshness else np.empty(0, dtype=np.int64)

    # ---- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, reason: str, wait: bool = False) -> int:
        """Cut a checkpoint of the state as it is now; returns its version.

        On this thread: audit fsync and a copy of the complete state (the training pause). On the
        writer thread, in version order: dead letters flushed -> atomic save -> version announced
        -> offsets committed -> prune. ``wait`` returns only once all of it is done
        (rebalance and stop); otherwise a checkpoint waits only for the previous one's write.
        """
        t0 = time.perf_counter()
        starts = {p: o for p, o in self.stream.start_positions().items() if p not in self.offsets}
        if starts and self.keep_start_positions:   # assigned, nothing trained: the checkpoint keeps where they start
            self.offsets.update(starts)
            self.trainer.source_offsets = to_source_offsets(self.topic, self.offsets)
        version = self._version
        created_ms = int(self.clock() * 1000)
        audit_bytes = self.audit.sync() if self.audit is not None else 0
        state = _detached_copy(self.trainer.checkpoint_state())
        state["learner"] = {"version": version, "created_at_ms": created_ms, "reason": reason,
                            "audit_bytes": audit_bytes, "group_id": self.stream.cfg.group_id,
                            "topic": self.topic, "config": dataclasses.asdict(self.cfg)}
        state["learner"].update(self.checkpoint_meta())
        state["seq_len"] = self.stream.cfg.seq_len   # the T the model was trained with (the scorer builds its batches with it)
        announce = None
        if self.publisher is not None:
            metrics = {k: float(v) for k, v in self.trainer.metrics.compute().items()}
            metrics["loss"] = self.trainer.last_loss
            announce = dict(version=version, created_at_ms=created_ms, samples_seen=self.trainer.samples_seen,
                            model=self.model_name, metrics=metrics, source_offsets=dict(self.trainer.source_offsets))
        offsets = dict(self.offsets)
        self._version += 1
        self._dirty = False
        self._last_ckpt_step = self.trainer.step
        self._last_ckpt_t = self.clock()
        pause_s = time.perf_counter() - t0
        self.wait_for_writes()                      # one write in flight at most, versions in order
        self._writing = self._writer.submit(self._write, version, reason, state, offsets, announce, pause_s)
        if wait:
            self.wait_for_writes()
        return version

    def checkpoint_meta(self) -> dict[str, Any]:
        """Extra entries for the checkpoint's ``learner`` section (the distributed learner's ranks)."""
        return {}

    def wait_for_writes(self) -> None:
        """Block until the checkpoint being written is durable and announced; re-raise its error."""
        if self._writing is not None:
            pending, self._writing = self._writing, None
            pending.result()

    def _write(self, version: int, reason: str, state: dict[str, Any], offsets: dict[int, int],
               announce: dict[str, Any] | None, pause_s: float) -> None:
        t0 = time.perf_counter()
        # the dead letters of the records these offsets cover were sent when their batches were
        # decoded: they must be on the broker before a checkpoint moves past them (a flush after
        # the save could fail, or the process die, leaving them neither sent nor to be re-read)
        if self.flush_dead_letters_on_write:
            self.flush_dead_letters()
        path = self.store.save(version, state)
        self.stream.set_positions(offsets)
        self.stats.version = version
        self.stats.last_checkpoint_s = state["learner"]["created_at_ms"] / 1000
        if announce is not None:
            self._publish(ModelVersion(path=str(path.resolve()), **announce))
        self.stream.request_commit(offsets)
        self.store.prune()
        logger.info("checkpoint version=%d reason=%s step=%s samples=%s offsets=%s pause_s=%.3f write_s=%.3f path=%s",
                    version, reason, state["step"], state["samples_seen"], offsets, pause_s, time.perf_counter() - t0,
                    path)

    #: versions are numbered above this one (set before ``restore``: the newest already announced
    #: for this model, so a fresh model's versions stay newer than what the servers follow)
    version_floor = 0

    #: checkpoint the start of partitions assigned but not yet trained (SampleStream.start_positions);
    #: the distributed learner gathers its ranks' offsets itself and does not
    keep_start_positions = True

    #: flush the dead letters on the writer thread, before the save (the distributed learner
    #: flushes every rank's before its collective instead)
    flush_dead_letters_on_write = True

    def flush_dead_letters(self) -> None:
        """Wait until every rejected record sent so far is on the dead-letter topic (raises if not
        within ``publish_timeout_s``)."""
        router = getattr(self.stream, "router", None)
        if router is not None:
            router.flush(self.cfg.publish_timeout_s)

    def _publish(self, mv: ModelVersion) -> None:
        try:
            self.publisher.publish(mv)
        except Exception as exc:  # the checkpoint is durable; the next announcement supersedes this one
            self.stats.n_publish_failures += 1
            logger.error("version publish failed version=%d error=%r", mv.version, exc)
            return
        self.stats.n_versions += 1
        self.stats.version_times_s.append(mv.created_at_ms / 1000)

    # ---- live view -------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """The figures of the live view (progress line and Prometheus)."""
        t = self.trainer
        self._rate.append((now, t.samples_seen))
        t0, n0 = self._rate[0]
        recent = [(ts, n) for ts, n in self._rate if now - ts <= 10.0] or [(t0, n0)]
        rate = (t.samples_seen - recent[0][1]) / (now - recent[0][0]) if now > recent[0][0] else 0.0
        m = t.metrics.compute(scopes=("window",))   # the cumulative figures go with each version
        hw = self.stream.highwater()
        lag = {p: max(0, hw[p] - self.offsets.get(p, 0)) for p in sorted(hw)}
        fresh = self.freshness_ms()
        return {
            "samples": t.samples_seen, "steps": t.step, "rejected": t.n_rejected, "samples_per_s": rate,
            "loss": t.last_loss, "window_auc": m["window_click_auc"], "window_gauc": m["window_click_gauc"],
            "window_vr_auc": m["window_vr_auc"], "version": self.stats.version, "versions": self.stats.n_versions,
            "checkpoint_age_s": now - self.stats.last_checkpoint_s, "lag": lag,
            "freshness_p50_s": float(np.percentile(fresh, 50)) / 1000 if len(fresh) else float("nan"),
            "freshness_p99_s": float(np.percentile(fresh, 99)) / 1000 if len(fresh) else float("nan"),
            "publish_failures": self.stats.n_publish_failures,
        }

    def _tick(self, now: float) -> None:
        self._last_tick = now
        if self.registry is None and self.progress is None:
            return
        snap = self.snapshot(now)
        if self.registry is not None:
            from learner.prometheus import update_learner_metrics
            update_learner_metrics(self.registry, snap, topic=self.topic)
        if self.progress is not None:
            self.progress.update(snap)


__all__ = ["AuditLog", "CheckpointStore", "ContinuousLearner", "LearnerConfig", "LearnerStats", "VersionPublisher"]
