"""Evaluation metrics for predict-then-train: AUC, GAUC, logloss, cumulative and sliding-window.

* :func:`auc` -- Mann-Whitney AUC, tied scores count 0.5. NaN when one class is absent.
* :func:`gauc` -- impression-weighted mean of per-user AUC over users that have both classes
  (users with only one class are skipped). NaN when no user qualifies.
* :func:`logloss` -- mean binary cross-entropy of probabilities clipped to [eps, 1 - eps].
* :class:`WindowMetrics` -- the three metrics, exact, over the last ``window`` samples.
* :class:`CumulativeMetrics` -- everything seen so far: logloss exact; AUC and GAUC over scores
  quantised to ``n_bins`` equal-width bins of [0, 1] (scores in the same bin count as tied, so the
  error is at most the fraction of positive/negative pairs sharing a bin). Logloss and AUC take
  fixed memory; GAUC keeps one row per distinct (user, score bin) pair, which grows with the
  stream, so it can be turned off (``per_user=False``) for a stream that never ends.

Both accumulators round-trip through ``state_dict`` / ``load_state_dict`` (tensors only).

>>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
0.75
>>> gauc([0.1, 0.9, 0.5, 0.5, 0.3], [0, 1, 1, 0, 1], [7, 7, 8, 8, 9])
0.75
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from learner import MetricsError

logger = logging.getLogger(__name__)


def _np(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().double().cpu().numpy() if dtype is np.float64 else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _check(*arrays: np.ndarray) -> None:
    if len({a.shape[0] for a in arrays}) != 1:
        raise MetricsError(f"arrays of different lengths: {[a.shape[0] for a in arrays]}")


def _groups(users: np.ndarray, scores: np.ndarray, count: np.ndarray,
            pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge rows with equal (user, score), sorted by user then score: (g_user, g_score, g_count, g_pos)."""
    order = np.lexsort((scores, users))
    u, s, c, p = users[order], scores[order], count[order], pos[order]
    if u.size == 0:
        return u, s, c, p
    new = np.r_[True, (u[1:] != u[:-1]) | (s[1:] != s[:-1])]
    gid = np.cumsum(new) - 1
    return u[new], s[new], np.bincount(gid, weights=c), np.bincount(gid, weights=p)


def _per_user_auc(g_user: np.ndarray, g_count: np.ndarray,
                  g_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From sorted groups: (auc per user, impressions per user, user has both classes)."""
    if g_user.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    new_user = np.r_[True, g_user[1:] != g_user[:-1]]
    uid = np.cumsum(new_user) - 1
    before_global = np.cumsum(g_count) - g_count
    before = before_global - before_global[new_user][uid]          # rows of the same user ranked lower
    mid_rank = before + (g_count + 1) / 2                            # average rank of a tie group (1-based)
    rank_sum = np.bincount(uid, weights=g_pos * mid_rank)
    n_pos = np.bincount(uid, weights=g_pos)
    n = np.bincount(uid, weights=g_count)
    n_neg = n - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return a, n, ok


def _gauc_from_groups(g_user, g_count, g_pos) -> float:
    a, n, ok = _per_user_auc(g_user, g_count, g_pos)
    if not ok.any():
        return math.nan
    return float((a[ok] * n[ok]).sum() / n[ok].sum())


def auc(scores, labels) -> float:
    """AUC with ties counted as 0.5; NaN when only one class is present."""
    s, y = _np(scores, np.float64), _np(labels, np.float64)
    _check(s, y)
    return gauc(s, y, np.zeros(s.shape[0], dtype=np.int64))


def gauc(scores, labels, users) -> float:
    """Impression-weighted per-user AUC over users with both classes; NaN when none has."""
    s, y, u = _np(scores, np.float64), _np(labels, np.float64), _np(users, np.int64)
    _check(s, y, u)
    g_user, _, g_count, g_pos = _groups(u, s, np.ones_like(s), y)
    return _gauc_from_groups(g_user, g_count, g_pos)


def logloss(scores, labels, eps: float = 1e-7) -> float:
    """Mean -(y log p + (1 - y) log(1 - p)), p clipped to [eps, 1 - eps]; NaN for no samples."""
    p, y = np.clip(_np(scores, np.float64), eps, 1 - eps), _np(labels, np.float64)
    _check(p, y)
    if p.size == 0:
        return math.nan
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


class WindowMetrics:
    """Exact AUC / GAUC / logloss over the most recent ``window`` samples (a ring buffer)."""

    def __init__(self, window: int):
        if window <= 0:
            raise ValueError(f"window={window!r} must be > 0")
        self.window = window
        self._scores = np.zeros(window, dtype=np.float64)
        self._labels = np.zeros(window, dtype=np.float64)
        self._users = np.zeros(window, dtype=np.int64)
        self._next = 0      # total samples ever seen; the write position is _next % window

    def update(self, scores, labels, users) -> None:
        s, y, u = _np(scores, np.float64), _np(labels, np.float64), _np(users, np.int64)
        _check(s, y, u)
        if s.size > self.window:   # only the last `window` rows can survive
            self._next += s.size - self.window
            s, y, u = s[-self.window:], y[-self.window:], u[-self.window:]
        pos = (self._next + np.arange(s.size)) % self.window
        self._scores[pos], self._labels[pos], self._users[pos] = s, y, u
        self._next += s.size

    def _filled(self) -> slice:
        return slice(0, min(self._next, self.window))

    def compute(self) -> dict[str, float]:
        f = self._filled()
        s, y, u = self._scores[f], self._labels[f], self._users[f]
        return {"n": float(s.size), "auc": auc(s, y), "gauc": gauc(s, y, u), "logloss": logloss(s, y)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"window": torch.tensor(self.window), "next": torch.tensor(self._next),
                "scores": torch.from_numpy(self._scores.copy()), "labels": torch.from_numpy(self._labels.copy()),
                "users": torch.from_numpy(self._users.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["window"]) != self.window:
            raise MetricsError(f"state has window={int(state['window'])}, this accumulator {self.window}")
        self._next = int(state["next"])
        self._scores = state["scores"].numpy().astype(np.float64).copy()
        self._labels = state["labels"].numpy().astype(np.float64).copy()
        self._users = state["users"].numpy().astype(np.int64).copy()


class CumulativeMetrics:
    """Metrics over the whole stream so far. With ``per_user`` (GAUC), memory and the cost of
    ``compute`` grow with the distinct (user, score bin) pairs seen; without it GAUC is NaN and
    the state is a fixed ``2 x n_bins`` histogram."""

    def __init__(self, n_bins: int = 10_000, eps: float = 1e-7, per_user: bool = True):
        if n_bins <= 1:
            raise ValueError(f"n_bins={n_bins!r} must be > 1")
        self.n_bins, self.eps, self.per_user = n_bins, eps, per_user
        self._n = 0
        self._n_pos = 0.0
        self._logloss_sum = 0.0
        self._hist = np.zeros((2, n_bins), dtype=np.float64)           # (neg/pos, bins)
        self._g = (np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0), np.zeros(0))
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    def _bin(self, s: np.ndarray) -> np.ndarray:
        return np.clip((s * self.n_bins).astype(np.int64), 0, self.n_bins - 1)

    def update(self, scores, labels, users) -> None:
        s, y, u = _np(scores, np.float64), _np(labels, np.float64), _np(users, np.int64)
        _check(s, y, u)
        p = np.clip(s, self.eps, 1 - self.eps)
        self._logloss_sum += float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).sum())
        self._n += s.size
        self._n_pos += float(y.sum())
        b = self._bin(s)
        np.add.at(self._hist, ((y > 0.5).astype(np.int64), b), 1.0)
        if not self.per_user:
            return
        self._pending.append((u, b, y))
        self._n_pending += s.size
        if self._n_pending > 1 << 16:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        u0, b0, c0, p0 = self._g
        u = np.concatenate([u0] + [x[0] for x in self._pending])
        b = np.concatenate([b0.astype(np.float64)] + [x[1].astype(np.float64) for x in self._pending])
        c = np.concatenate([c0] + [np.ones(x[0].size) for x in self._pending])
        p = np.concatenate([p0] + [x[2] for x in self._pending])
        self._g = _groups(u, b, c, p)
        self._pending, self._n_pending = [], 0

    def compute(self) -> dict[str, float]:
        self._merge()
        neg, pos = self._hist
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos > 0 and n_neg > 0:
            neg_below = np.cumsum(neg) - neg
            a = float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))
        else:
            a = math.nan
        g_user, _, g_count, g_pos = self._g
        g = _gauc_from_groups(g_user, g_count, g_pos) if self.per_user else math.nan
        return {"n": float(self._n), "auc": a, "gauc": g,
                "logloss": self._logloss_sum / self._n if self._n else math.nan,
                "ctr": self._n_pos / self._n if self._n else math.nan}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._merge()
        u, b, c, p = self._g
        return {"n_bins": torch.tensor(self.n_bins), "per_user": torch.tensor(self.per_user), "n": torch.tensor(self._n),
                "n_pos": torch.tensor(self._n_pos, dtype=torch.float64),
                "logloss_sum": torch.tensor(self._logloss_sum, dtype=torch.float64),
                "hist": torch.from_numpy(self._hist.copy()), "g_user": torch.from_numpy(u.copy()),
                "g_bin": torch.from_numpy(b.copy()), "g_count": torch.from_numpy(c.copy()),
                "g_pos": torch.from_numpy(p.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["n_bins"]) != self.n_bins:
            raise MetricsError(f"state has n_bins={int(state['n_bins'])}, this accumulator {self.n_bins}")
        self._n = int(state["n"])
        self._n_pos = float(state["n_pos"])
        self._logloss_sum = float(state["logloss_sum"])
        self._hist = state["hist"].numpy().copy()
        self._pending, self._n_pending = [], 0
        had_users = bool(state.get("per_user", torch.tensor(True)))   # states before the flag kept users
        if self.per_user and had_users:
            self._g = (state["g_user"].numpy().copy(), state["g_bin"].numpy().copy(),
                       state["g_count"].numpy().copy(), state["g_pos"].numpy().copy())
        else:   # dropped, or never kept: GAUC counts from here on
            self._g = (np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0), np.zeros(0))
            if self.per_user and self._n:
                logger.warning("cumulative GAUC restarts here: the restored state kept no users (%d samples "
                               "seen before count in AUC and logloss only)", self._n)
