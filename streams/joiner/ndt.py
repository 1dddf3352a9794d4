"""Normalized dwell time T_N (dwell-time paper, eq. 1), vectorised with numpy.

    T_N(T) = A / (1 + exp(-(T - offset) / tau)) - B          T: dwell in seconds

With the paper's defaults (offset 15 s, tau 20, A 2.319, B 0.744), T_N(0) = 0 and T_N rises
monotonically to A - B = 1.575, steepest at T = offset.

Deriving the parameters from the live statistics of ln(dwell) (:func:`derive_params`):

* offset = x_l = exp(mu - sigma): the steepest point sits on the valid-read threshold (C1);
* tau: the largest value for which the gain still available beyond x_h = exp(mu + sigma),
  ``T_N(inf) - T_N(x_h) = A / (1 + exp((x_h - offset) / tau))``, is below ``max_gain_beyond_x_h``
  (1e-5, the paper's "minimum precision") (C2);
* A and B: rescaled so the range stays [0, A0 - B0] of the configured values ("we remain the
  normalized dwell time range unchanged"): T_N(0) = 0 gives B = A / (1 + exp(offset / tau)), and
  A - B = A0 - B0 gives A = (A0 - B0) * (1 + exp(-offset / tau)). The paper's own A and B are
  exactly this for offset / tau = 0.75.

Because A grows with tau, the bound is solved for tau by bisection on the exact gain.

>>> [round(float(v), 4) for v in normalized_dwell_time([0.0, 15.0, 1e6])]
[-0.0, 0.4155, 1.575]
>>> p = derive_params(mu=float(np.log(60.0)), sigma=1.0)
>>> round(p.offset_s, 3), gain_beyond(p, p.x_h_s) < 1e-5
(22.073, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streams.joiner.config import NdtConfig


@dataclass(frozen=True)
class NdtParams:
    """Parameters of eq. 1 in seconds; ``x_h_s`` is set when derived from statistics."""

    offset_s: float
    tau_s: float
    a: float
    b: float
    x_h_s: float | None = None

    @classmethod
    def from_config(cls, cfg: NdtConfig) -> NdtParams:
        return cls(cfg.offset_s, cfg.tau_s, cfg.a, cfg.b)


_DEFAULT = NdtParams.from_config(NdtConfig())


def normalized_dwell_time(dwell_s, params: NdtParams = _DEFAULT) -> np.ndarray:
    """T_N of dwell times in seconds (scalar or array), as float64."""
    t = np.asarray(dwell_s, dtype=np.float64)
    z = -(t - params.offset_s) / params.tau_s
    return params.a / (1.0 + np.exp(np.minimum(z, 700.0))) - params.b


def ndt_weight_ms(dwell_ms: np.ndarray, params: NdtParams = _DEFAULT) -> np.ndarray:
    """(B,) float32 T_N of dwell in milliseconds; 0 where dwell is unknown (< 0).

    Clamped at 0: with the paper's constants T_N(0) = -1.5e-5, and a weight is never negative.
    """
    d = np.asarray(dwell_ms, dtype=np.float64)
    w = np.maximum(normalized_dwell_time(d / 1000.0, params), 0.0)
    return np.where(d >= 0, w, 0.0).astype(np.float32)


def gain_beyond(params: NdtParams, x_s: float) -> float:
    """T_N(inf) - T_N(x): what a dwell longer than ``x`` seconds can still add."""
    z = (x_s - params.offset_s) / params.tau_s
    return params.a / (1.0 + math.exp(min(z, 700.0)))


def _rescaled(offset: float, tau: float, t_max: float) -> tuple[float, float]:
    a = t_max * (1.0 + math.exp(-offset / tau))
    return a, a - t_max


def derive_params(mu: float, sigma: float, cfg: NdtConfig = NdtConfig()) -> NdtParams:
    """Offset, tau, A and B from mu and sigma of ln(dwell in seconds) (see the module docstring).

    Raises ValueError when sigma is not positive, or so small that ``exp(mu + sigma)`` and
    ``exp(mu - sigma)`` are the same float (no spread: x_h = x_l, no tau can be fitted).
    """
    if not (math.isfinite(mu) and math.isfinite(sigma)) or sigma <= 0:
        raise ValueError(f"mu={mu!r}, sigma={sigma!r}: need finite mu and sigma > 0")
    offset, x_h = math.exp(mu - sigma), math.exp(mu + sigma)
    if not x_h > offset:
        raise ValueError(f"mu={mu!r}, sigma={sigma!r}: exp(mu - sigma) == exp(mu + sigma), no spread to fit")
    t_max, eps = cfg.a - cfg.b, cfg.max_gain_beyond_x_h

    def gain(tau: float) -> float:
        a, b = _rescaled(offset, tau, t_max)
        return gain_beyond(NdtParams(offset, tau, a, b), x_h)

    lo, hi = 0.0, (x_h - offset) / math.log(t_max / eps)  # gain(hi) >= eps: A >= t_max at any tau
    while gain(hi) < eps:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # gain is increasing in tau; keep lo strictly inside the bound
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if gain(mid) < eps else (lo, mid)
    if lo <= 0.0:
        raise ValueError(f"mu={mu!r}, sigma={sigma!r}: no tau keeps the gain beyond x_h below {eps}")
    a, b = _rescaled(offset, lo, t_max)
    return NdtParams(offset, lo, a, b, x_h)
