"""One compact terminal line for the continuous learner, rewritten in place on a terminal.

>>> print(format_progress({"version": 3, "steps": 40, "samples": 10240, "samples_per_s": 2048.0, "lag": {0: 5, 1: 0},
...     "loss": 0.51234, "window_auc": 0.7123, "window_gauc": 0.6551, "window_vr_auc": float("nan"),
...     "freshness_p99_s": 0.42, "checkpoint_age_s": 3.2}))
v3 step 40 | 10.2k samples 2.0k/s | lag 5 | loss 0.512 | auc 0.712 gauc 0.655 vr - | fresh p99 0.42s | ckpt 3s ago
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def _num(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_progress(s: dict[str, Any]) -> str:
    """The progress line of a :meth:`learner.continuous.ContinuousLearner.snapshot`."""
    age = s["checkpoint_age_s"]
    ckpt = "none" if math.isnan(age) else f"{age:.0f}s ago"
    return (f"v{s['version']} step {s['steps']} | {_count(s['samples'])} samples {_count(s['samples_per_s'])}/s | "
            f"lag {sum(s['lag'].values())} | loss {_num(s['loss'], '.3f')} | auc {_num(s['window_auc'], '.3f')} "
            f"gauc {_num(s['window_gauc'], '.3f')} vr {_num(s['window_vr_auc'], '.3f')} | "
            f"fresh p99 {_num(s['freshness_p99_s'], '.2f')}s | ckpt {ckpt}")


class ProgressLine:
    """Writes :func:`format_progress` lines to ``out``: "\\r"-rewritten in place on a terminal at every
    update; elsewhere (a log file) one line per ``plain_every_s`` seconds, so logs stay readable."""

    def __init__(self, out: TextIO | None = None, plain_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.out = out if out is not None else sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.plain_every_s = plain_every_s
        self.clock = clock
        self._width = 0
        self._last = float("-inf")

    def update(self, snapshot: dict[str, Any]) -> None:
        line = format_progress(snapshot)
        if self.tty:
            self.out.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            now = self.clock()
            if now - self._last < self.plain_every_s:
                return
            self._last = now
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()
            self._width = 0
