"""What :class:`~streams.joiner.join.JoinCore` hands out: joined impressions, late events, orphans.

The downstream stages (snapshots, statistics, valid-read labelling) read these records and never
the join state, so they import this module rather than the join core.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from streams.contracts import Event, Impression


@dataclass(frozen=True, slots=True)
class JoinedImpression:
    """An impression with the outcomes that count toward its label (before ``label_ts_ms``).

    ``click_ts_ms`` is the first click's time; ``dwell_ms`` comes from the latest dwell report
    (by ts, then event_id) and is -1 when none arrived; ``early`` says the close came from the
    final dwell rather than the label window. ``like_ts_ms`` / ``dislike_ts_ms`` are the first
    like / dislike times (-1 when none): a feature snapshot may only contain the feedback from
    that time on, never from the impression's own time.
    """

    impression: Impression
    clicked: bool
    click_ts_ms: int
    dwell_ms: int
    dwell_ts_ms: int
    liked: bool
    disliked: bool
    label_ts_ms: int
    early: bool
    like_ts_ms: int = -1
    dislike_ts_ms: int = -1


@dataclass(frozen=True, slots=True)
class LateEvent:
    event: Event
    reason: str  # after_emit | after_window | after_close | window_closed


@dataclass(frozen=True, slots=True)
class OrphanEvent:
    event: Event
    reason: str  # no_impression | before_impression | no_impression_id | mismatch


@dataclass
class JoinOutput:
    samples: list[JoinedImpression] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)
    orphans: list[OrphanEvent] = field(default_factory=list)
