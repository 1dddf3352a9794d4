"""Frozen joiner configs, validated in ``__post_init__``.

Three parts: :class:`ValidReadConfig` (paper section 2.2), :class:`NdtConfig` (paper eq. 1) and
:class:`JoinerConfig` (event-time join semantics, snapshot length, user group fields), which holds
the other two. Every duration is event time in milliseconds.

>>> cfg = JoinerConfig()
>>> cfg.label_window_ms // 60_000, cfg.valid_read.min_dwell_ms, cfg.ndt.tau_s, cfg.seq_len
(30, 5000, 20.0, 100)
>>> JoinerConfig(allowed_lateness_ms=-1)
Traceback (most recent call last):
...
ValueError: allowed_lateness_ms=-1 must be an integer >= 0
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
DAY_MS = 24 * 60 * MINUTE_MS

#: User fields a group code can be built from, with the number of values each takes
#: (``age_group`` is stored shifted by one so that unknown = -1 becomes 0).
USER_GROUP_FIELDS: dict[str, int] = {"activeness": 9, "age_group": 129}


def _int_at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a bool")


def _finite_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


@dataclass(frozen=True)
class ValidReadConfig:
    """Valid-read rules (see ``streams.joiner.validread`` for the exact reading of section 2.2).

    ``min_dwell_ms``: a click with a shorter dwell is never a valid read (the paper's 5 s).
    ``t1``: dwell >= x_l = exp(mu - sigma) of ln(dwell) over clicks (live estimate), or
    ``t1_fixed_x_l_ms`` when set (the paper reports x_l of about 15 s in its system).
    ``t2``: the user clicked fewer than ``t2_max_clicks`` items in the trailing 7 days.
    ``t3``: dwell >= the item's historical ``t3_quantile`` dwell (P10).
    """

    min_dwell_ms: int = 5 * SECOND_MS
    t1: bool = True
    t1_fixed_x_l_ms: float | None = None
    t2: bool = True
    t2_max_clicks: int = 7
    t3: bool = True
    t3_quantile: float = 0.1

    def __post_init__(self) -> None:
        _int_at_least("min_dwell_ms", self.min_dwell_ms, 0)
        for name in ("t1", "t2", "t3"):
            _bool(name, getattr(self, name))
        if self.t1_fixed_x_l_ms is not None:
            _finite_positive("t1_fixed_x_l_ms", self.t1_fixed_x_l_ms)
        _int_at_least("t2_max_clicks", self.t2_max_clicks, 1)
        q = self.t3_quantile
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ValueError(f"t3_quantile={q!r} must be in [0, 1]")


@dataclass(frozen=True)
class NdtConfig:
    """Normalized dwell time T_N = A / (1 + exp(-(T - offset) / tau)) - B, T in seconds.

    Defaults are the paper's (offset 15 s, tau 20, A 2.319, B 0.744: T_N(0) = 0 and T_N(inf) = A - B).
    ``derive_from_stats``: take offset = exp(mu - sigma) and the largest tau for which the gain
    beyond x_h = exp(mu + sigma) stays below ``max_gain_beyond_x_h``, and rescale A and B so the
    range stays [0, A - B] (see ``streams.joiner.ndt.derive_params``).
    """

    offset_s: float = 15.0
    tau_s: float = 20.0
    a: float = 2.319
    b: float = 0.744
    derive_from_stats: bool = False
    max_gain_beyond_x_h: float = 1e-5

    def __post_init__(self) -> None:
        _finite_positive("offset_s", self.offset_s)
        _finite_positive("tau_s", self.tau_s)
        _finite_positive("a", self.a)
        b = self.b
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise ValueError(f"b={b!r} must be a finite number")
        _bool("derive_from_stats", self.derive_from_stats)
        g = self.max_gain_beyond_x_h
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < self.a - self.b:
            raise ValueError(f"max_gain_beyond_x_h={g!r} must be in (0, a - b = {self.a - self.b})")


@dataclass(frozen=True)
class JoinerConfig:
    """Event-time join of impressions with clicks, dwell and feedback (see docs/joiner.md).

    ``allowed_lateness_ms``: watermark = max event time seen - this; an event older than the
      watermark violates the bound (it is still used when its impression is pending).
    ``label_window_ms``: outcomes with ts < impression ts + this count toward the label.
    ``grace_ms``: an outcome may be this much earlier in event time than its impression.
    ``orphan_grace_ms``: an outcome without impression waits until the watermark passes
      its ts + this, then it is an orphan (>= ``grace_ms``).
    ``emit_early_on_final_dwell``: emit once clicked and dwelled and the watermark has passed
      the later of the two by ``final_dwell_settle_ms`` (feedback up to then still counts).
    ``emitted_retention_ms``: emitted impressions are remembered this long past their close,
      so events for them count as late (or duplicate), not orphans.
    """

    allowed_lateness_ms: int = 10 * SECOND_MS
    label_window_ms: int = 30 * MINUTE_MS
    grace_ms: int = 60 * SECOND_MS
    orphan_grace_ms: int = 5 * MINUTE_MS
    emit_early_on_final_dwell: bool = False
    final_dwell_settle_ms: int = SECOND_MS
    emitted_retention_ms: int = 60 * MINUTE_MS
    seq_len: int = 100
    user_group_fields: tuple[str, ...] = ("activeness",)
    valid_read: ValidReadConfig = field(default_factory=ValidReadConfig)
    ndt: NdtConfig = field(default_factory=NdtConfig)

    def __post_init__(self) -> None:
        for name in ("allowed_lateness_ms", "grace_ms", "orphan_grace_ms", "emitted_retention_ms"):
            _int_at_least(name, getattr(self, name), 0)
        _int_at_least("label_window_ms", self.label_window_ms, 1)
        _int_at_least("final_dwell_settle_ms", self.final_dwell_settle_ms, 1)
        _int_at_least("seq_len", self.seq_len, 1)
        if self.seq_len > 0xFFFF:
            raise ValueError(f"seq_len={self.seq_len} must be <= 65535")
        _bool("emit_early_on_final_dwell", self.emit_early_on_final_dwell)
        if self.emitted_retention_ms < self.label_window_ms + self.allowed_lateness_ms:
            raise ValueError(
                f"emitted_retention_ms={self.emitted_retention_ms} < label_window_ms + allowed_lateness_ms="
                f"{self.label_window_ms + self.allowed_lateness_ms}: an outcome within the lateness bound "
                "could be called late or orphan depending on arrival order")
        if self.orphan_grace_ms < self.grace_ms:
            raise ValueError(f"orphan_grace_ms={self.orphan_grace_ms} < grace_ms={self.grace_ms}: an "
                             "outcome could be orphaned before its impression may still attach it")
        fields_ = self.user_group_fields
        if isinstance(fields_, str):
            fields_ = (fields_,)
            object.__setattr__(self, "user_group_fields", fields_)
        if not fields_ or any(f not in USER_GROUP_FIELDS for f in fields_) or len(set(fields_)) != len(fields_):
            raise ValueError(f"user_group_fields={fields_!r} must be distinct names from {sorted(USER_GROUP_FIELDS)}")
        if not isinstance(self.valid_read, ValidReadConfig):
            raise ValueError(f"valid_read={self.valid_read!r} is not a ValidReadConfig")
        if not isinstance(self.ndt, NdtConfig):
            raise ValueError(f"ndt={self.ndt!r} is not an NdtConfig")


def user_group_code(fields_: tuple[str, ...], activeness: int, age_group: int) -> int:
    """One integer per combination of the group fields (mixed radix, first field most significant).

    >>> user_group_code(("activeness",), 3, -1), user_group_code(("activeness", "age_group"), 3, -1)
    (3, 387)
    """
    values = {"activeness": activeness, "age_group": age_group + 1}
    code = 0
    for name in fields_:
        code = code * USER_GROUP_FIELDS[name] + values[name]
    return code
