"""Prequential (predict-then-train) training on the time-ordered sample stream.

For every minibatch k, in stream order:

1. **score**: the served score of every row is computed by the parameters and memory as they
   stood after minibatch k - 1 and recorded in the metrics;
2. **train**: one training forward (which writes DUMN's memory), the objective, backward and one
   optimizer step.

By default both come from the same training forward: every registry model is deterministic in
training mode (no dropout, no batch statistics) and reads DUMN's memory as it stood at the start of
the minibatch, so its detached output *is* the pre-step prediction, and no extra forward is paid.
``TrainerConfig.separate_eval_pass=True`` scores with an explicit no-grad eval-mode pass first
(needed for a stochastic model); the tests check that both give the same predictions. The CLSD
teacher p is that pre-step prediction of the head CLSD trains (``CLSDConfig.head``, main by
default).

Metrics (``PrequentialMetrics``): AUC, GAUC (impression-weighted per-user AUC) and logloss of
the served score against the click label and against the valid-read label, over a sliding window
and cumulatively. When the NDT-weighted tower is trained the served score is the sum of the two
tower probabilities; the metrics use it divided by 2 (same ranking, in [0, 1]), so that logloss is
of the mean of the two towers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from learner import LearnerError
from learner.batch import SampleBatch
from learner.config import CLSDConfig, ObjectiveConfig, require_positive
from learner.data import LoadedBatch
from learner.metrics import CumulativeMetrics, WindowMetrics
from learner.models import MODEL_CONFIGS, build_model
from learner.objectives import build_objective

logger = logging.getLogger(__name__)

OBJECTIVES = ("bce", "clsd", "valid_read", "mtl", "mtl_clsd")


@dataclass(frozen=True)
class TrainerConfig:
    """One prequential run. ``objective`` names a preset (:func:`objective_config`); ``clsd`` holds
    the CLSD settings used by "clsd" and "mtl_clsd". ``window`` is the sliding-window size in
    samples, ``curve_every`` the number of minibatches between curve points, ``log_every_s`` the
    seconds between progress lines. ``device``: "auto" (CUDA when present), "cpu" or "cuda"; CUDA
    runs under bf16 autocast. ``cumulative_gauc``: keep the per-user state of the cumulative GAUC,
    which grows with the users seen (off in the continuous learner, whose stream does not end).
    :data:`RUN_ONLY_FIELDS` may differ between a checkpoint and the run that restores it."""

    model: str = "dumn"
    objective: str = "bce"
    clsd: CLSDConfig = field(default_factory=CLSDConfig)
    lr: float = 0.005
    seed: int = 0
    device: str = "auto"
    window: int = 10_000
    cumulative_bins: int = 10_000
    curve_every: int = 10
    log_every_s: float = 10.0
    separate_eval_pass: bool = False
    keep_predictions: bool = False
    cumulative_gauc: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODEL_CONFIGS:
            raise ValueError(f"model={self.model!r} unknown; choose from {sorted(MODEL_CONFIGS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} unknown; choose from {OBJECTIVES}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        require_positive(self, "window", "cumulative_bins", "curve_every")

    @property
    def heads(self) -> tuple[str, ...]:
        """Model heads the objective needs."""
        return ("main", "weighted") if self.objective in ("mtl", "mtl_clsd") else ("main",)


# How a run executes and reports, not what it learns: a restore may change them (the device too:
# checkpoints load onto the CPU and are copied to the run's device).
RUN_ONLY_FIELDS = ("device", "log_every_s", "curve_every", "keep_predictions", "cumulative_gauc")
CLSD_OBJECTIVES = ("clsd", "mtl_clsd")


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``Trainer.config_dict()`` less what a restore may change: the run-only fields, and the CLSD
    settings of an objective that does not use CLSD."""
    trainer = {k: v for k, v in (config.get("trainer") or {}).items() if k not in RUN_ONLY_FIELDS}
    if trainer.get("objective") not in CLSD_OBJECTIVES:
        trainer.pop("clsd", None)
    return {**config, "trainer": trainer}


def objective_config(cfg: TrainerConfig) -> ObjectiveConfig:
    """The ObjectiveConfig of a preset: bce = L_ori on click; clsd = CLSD eq. 4 on click;
    valid_read = BCE on the valid-read label; mtl = valid-read + NDT-weighted towers;
    mtl_clsd = CLSD on the valid-read tower + the NDT-weighted tower."""
    if cfg.objective == "bce":
        return ObjectiveConfig(terms=("bce",))
    if cfg.objective == "clsd":
        return ObjectiveConfig(terms=("clsd",), clsd=dataclasses.replace(cfg.clsd, label="clicked"))
    if cfg.objective == "valid_read":
        return ObjectiveConfig(terms=("valid_read",))
    if cfg.objective == "mtl":
        return ObjectiveConfig(terms=("valid_read", "ndt_weighted"))
    return ObjectiveConfig(terms=("clsd", "ndt_weighted"), clsd=dataclasses.replace(cfg.clsd, label="valid_read"))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise LearnerError("device='cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class PrequentialMetrics:
    """Window and cumulative accumulators for the click and valid-read labels.

    update(scores (B,) in [0, 1], clicked (B,), valid_read (B,), users (B,)); compute() ->
    {"window_click_auc", "cum_click_gauc", "window_vr_logloss", ...}; state_dict round trip.
    """

    LABELS = ("click", "vr")

    def __init__(self, window: int, n_bins: int, per_user: bool = True):
        self.acc = {f"{scope}_{label}": (WindowMetrics(window) if scope == "window"
                                         else CumulativeMetrics(n_bins, per_user=per_user))
                    for scope in ("window", "cum") for label in self.LABELS}

    def update(self, scores, clicked, valid_read, users) -> None:
        for name, acc in self.acc.items():
            acc.update(scores, clicked if name.endswith("click") else valid_read, users)

    def compute(self, scopes: tuple[str, ...] = ("window", "cum")) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, acc in self.acc.items():
            if name.split("_")[0] not in scopes:
                continue
            for k, v in acc.compute().items():
                if k in ("auc", "gauc", "logloss", "n"):
                    out[f"{name}_{k}"] = v
        return out

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: acc.state_dict() for name, acc in self.acc.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, acc in self.acc.items():
            acc.load_state_dict(state[name])


@dataclass
class TrainResult:
    """What a run produced. ``curve``: one dict per curve point (samples seen plus every metric);
    ``final``: the metrics after the last minibatch; ``predictions``: the recorded served scores
    (divided by the number of towers), labels and users in stream order when ``keep_predictions``."""

    config: dict[str, Any]
    curve: list[dict[str, float]]
    final: dict[str, float]
    samples_seen: int
    steps: int
    n_rejected: int
    train_seconds: float
    samples_per_s: float
    source_offsets: dict[str, int]
    predictions: dict[str, np.ndarray] | None = None


class Trainer:
    """Model, objective, optimizer and metrics of one prequential run (see the module docstring).

    ``model_config`` defaults to the registry config of ``cfg.model`` with the heads the objective
    needs. ``train_batch(batch)`` scores then trains one minibatch and returns its scores;
    ``run(batches)`` loops over a loader; ``checkpoint_state`` / ``load_checkpoint_state`` give
    and take the complete state (see learner/checkpoint.py).
    """

    def __init__(self, cfg: TrainerConfig, model_config: Any | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model_config = model_config if model_config is not None else MODEL_CONFIGS[cfg.model](heads=cfg.heads)
        if tuple(self.model_config.heads) != cfg.heads:
            raise ValueError(f"objective {cfg.objective!r} needs heads {cfg.heads}, "
                             f"model config has {self.model_config.heads}")
        self.objective_config = objective_config(cfg)
        self.model = build_model(cfg.model, self.model_config).to(self.device).train()
        self.objective = build_objective(self.objective_config).to(self.device).train()
        # fused Adam: one kernel over all parameters (the same update as the default implementation,
        # about 7x faster on CPU for the large hashed tables)
        self.optimizer = torch.optim.Adam([*self.model.parameters(), *self.objective.parameters()], lr=cfg.lr,
                                          fused=True)
        self.metrics = PrequentialMetrics(cfg.window, cfg.cumulative_bins, per_user=cfg.cumulative_gauc)
        self.n_towers = 2 if "ndt_weighted" in self.objective_config.terms else 1
        self.step = 0
        self.samples_seen = 0
        self.n_rejected = 0
        self.source_offsets: dict[str, int] = {}
        self.curve: list[dict[str, float]] = []
        self._pred: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.last_loss = float("nan")   # the objective of the newest trained minibatch (live view)

    def config_dict(self) -> dict[str, Any]:
        return {"trainer": dataclasses.asdict(self.cfg), "model": dataclasses.asdict(self.model_config),
                "objective": dataclasses.asdict(self.objective_config)}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _served(self, out) -> torch.Tensor:
        """The served score / n_towers (B,), detached float32."""
        return self.objective.score(out).float() / self.n_towers                   # (B,)

    def train_batch(self, batch: SampleBatch) -> torch.Tensor:
        """Score ``batch`` with the current state, record the scores, then train on it. -> (B,) scores."""
        batch = batch.to(self.device, non_blocking=True) if batch.device != self.device else batch
        served, loss = self.forward_backward(batch)
        self.optimizer.step()
        return self.record(served, batch.clicked, batch.valid_read, batch.user_id, loss)

    def forward_backward(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Score ``batch`` (on this trainer's device), then fill the gradients of its mean loss; the
        optimizer does not step. -> (served scores (B,), loss ()), both detached.
        :mod:`learner.distributed` reduces the gradients across ranks between this and the step."""
        teacher = None  # one pass: CLSD takes its teacher from this forward's own detached output
        if self.cfg.separate_eval_pass:
            self.model.eval()
            with torch.no_grad(), self._autocast():
                pre = self.model(batch, write_memory=False)
                served, teacher = self._served(pre), self.objective.teacher_p(pre)  # (B,), (B,) or None
            self.model.train()
        with self._autocast():
            out = self.model(batch, write_memory=True)
            if not self.cfg.separate_eval_pass:
                served = self._served(out)                                          # (B,)
            res = self.objective(out, batch, teacher_p=teacher)
        self.optimizer.zero_grad(set_to_none=True)
        res.loss.backward()
        return served, res.loss.detach()

    def record(self, served: torch.Tensor, clicked: torch.Tensor, valid_read: torch.Tensor, users: torch.Tensor,
               loss: torch.Tensor | float) -> torch.Tensor:
        """Count one trained minibatch of B samples and feed its served scores to the metrics. -> (B,) scores."""
        scores = served.cpu()                                                       # (B,)
        clicked, vr, users = clicked.cpu(), valid_read.cpu(), users.cpu()
        self.metrics.update(scores, clicked, vr, users)
        if self.cfg.keep_predictions:
            self._pred.append((scores.numpy(), clicked.numpy(), vr.numpy(), users.numpy()))
        self.step += 1
        self.samples_seen += int(scores.shape[0])
        self.last_loss = float(loss)
        return scores

    def _point(self) -> dict[str, float]:
        return {"samples": float(self.samples_seen), "step": float(self.step), "loss": self.last_loss,
                **self.metrics.compute()}

    def run(self, batches: Iterable[LoadedBatch | SampleBatch],
            on_step: Callable[["Trainer"], None] | None = None) -> TrainResult:
        """One pass over ``batches`` in order; ``on_step(trainer)`` runs after every minibatch
        (checkpointing hooks in here)."""
        t0 = last_log = time.perf_counter()
        n0 = self.samples_seen
        for item in batches:
            batch = item.batch if isinstance(item, LoadedBatch) else item
            if isinstance(item, LoadedBatch):
                self.n_rejected += item.n_rejected
                self.source_offsets = {"offset_bytes": item.end_offset_bytes,
                                       "messages": self.source_offsets.get("messages", 0) + item.n_messages}
            if not batch.batch_size:   # every row was rejected: counted above, nothing to train
                continue
            self.train_batch(batch)
            if self.step % self.cfg.curve_every == 0:
                self.curve.append(self._point())
            now = time.perf_counter()
            if now - last_log >= self.cfg.log_every_s:
                m = self.metrics.compute()
                logger.info("progress step=%d samples=%d samples_per_s=%.1f loss=%.4f window_auc=%.4f "
                            "window_gauc=%.4f cum_auc=%.4f", self.step, self.samples_seen,
                            (self.samples_seen - n0) / (now - t0), self.last_loss, m["window_click_auc"],
                            m["window_click_gauc"], m["cum_click_auc"])
                last_log = now
            if on_step is not None:
                on_step(self)
        elapsed = time.perf_counter() - t0
        curve = list(self.curve)
        if not curve or curve[-1]["step"] != self.step:   # the end point, in the result only: a resumed
            curve.append(self._point())                   # run keeps the regular curve_every spacing
        preds = None
        if self.cfg.keep_predictions and self._pred:
            preds = {k: np.concatenate([p[i] for p in self._pred])
                     for i, k in enumerate(("scores", "clicked", "valid_read", "users"))}
        n = self.samples_seen - n0
        return TrainResult(self.config_dict(), curve, self.metrics.compute(), self.samples_seen,
                           self.step, self.n_rejected, elapsed, n / elapsed if elapsed > 0 else float("nan"),
                           dict(self.source_offsets), preds)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a continuation needs (learner/checkpoint.py lists it)."""
        return {"config": self.config_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "objective": self.objective.state_dict(),
                "metrics": self.metrics.state_dict(), "step": self.step, "samples_seen": self.samples_seen,
                "n_rejected": self.n_rejected, "source_offsets": dict(self.source_offsets),
                "curve": [dict(p) for p in self.curve], "rng": torch.get_rng_state(),
                **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`checkpoint_state`; the run's configs must be the checkpoint's, but
        for what :func:`comparable_config` leaves out."""
        from learner.checkpoint import CheckpointError
        theirs, ours = state.get("config"), self.config_dict()
        if not isinstance(theirs, dict) or comparable_config(theirs) != comparable_config(ours):
            raise CheckpointError("checkpoint was written by a run with another config; "
                                  f"checkpoint: {theirs}, this run: {ours}")
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.metrics.load_state_dict(state["metrics"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint state does not fit this run: {exc}") from None
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.n_rejected = int(state["n_rejected"])
        self.source_offsets = {k: int(v) for k, v in state["source_offsets"].items()}
        self.curve = [dict(p) for p in state["curve"]]
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:   # absent when written on the CPU
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
