"""KuaiRand exposure logs -> impression, click, dwell and feedback events.

KuaiRand (Gao et al., CIKM 2022, CC BY-SA 4.0) publishes one CSV row per exposure of a video to a
user, with one millisecond timestamp (``time_ms``) and the outcome signals of that exposure. The
log is recognised by its header; it must be sorted by ``time_ms`` (the official files are).

Mapping of one row (every decision here is also listed in ``data/kuairand-slice/README.md``):

* **Impression** at ``ts = time_ms``, always. Context fields:
  ``activeness`` = :func:`streams.contracts.activeness_code` of the user's ``user_active_degree``
  in the user table (0 = UNKNOWN when the user or the table is missing);
  ``age_group = -1`` because KuaiRand publishes no age or gender;
  ``item_duration_ms`` = the row's ``duration_ms``, or when that is 0 (missing on about 1.6% of
  rows) the video table's ``video_duration``, or 0 when both are missing;
  ``item_category`` = the first id of the video's comma-separated ``tag`` (-1 when missing).
* **Click** at ``ts`` when ``is_click = 1``. The log has a single timestamp per exposure, so the
  click shares the impression's time; at equal time the merge order puts the impression first.
* **Dwell** at ``ts + play_time_ms`` with ``dwell_ms = play_time_ms`` for every clicked row (also
  when ``play_time_ms`` is 0, so there is exactly one dwell per click). The offset makes the dwell
  arrive after its click in event time, when the read actually ended. Non-clicked rows carry
  ``play_time_ms`` too, but that is the full-screen feed auto-playing, not a read: they give no
  dwell unless ``autoplay_dwell=True``, which adds a dwell for each non-clicked row with
  ``play_time_ms > 0``.
* **Feedback** ``LIKE`` when ``is_like = 1`` and ``DISLIKE`` when ``is_hate = 1`` (a few rows have
  both and give both), at ``ts + play_time_ms`` with ``impression_id`` set: a reaction happens
  while or after watching, so it follows the dwell's time (and the dwell at equal time).
* **Duplicates**: the official log has exact duplicate rows (5,460 in the 2022-04-25..05-08 pure
  log). Every column equal means the same exposure recorded twice, so by default only the first
  is replayed and the others are counted in ``counters.duplicates_dropped``
  (``keep_duplicates=True`` replays them all). Rows that differ in any column are kept.

Identifiers are deterministic and depend only on the row, not on the file it is read from, so a
slice and the full log give the same ids for the same rows::

    base          = time_ms << 16 | j << 3    (j: index of the row among the replayed rows
                                               with the same time_ms, in file order; j < 8192)
    impression    event_id = impression_id = base
    click         event_id = base + 1
    dwell         event_id = base + 2
    like/dislike  event_id = base + 3 / base + 4

``event_id >> 16`` is therefore the exposure time in ms. The feature tables are found next to the
log by their standard names (``user_features*.csv[.gz]``, ``video_features_basic*.csv[.gz]``)
unless given explicitly.

>>> from pathlib import Path
>>> src = KuaiRandSource(Path("data/kuairand-slice/log_standard_slice.csv.gz"), KuaiRandOptions())
>>> ev = next(src.keyed_events())[3]
>>> type(ev).__name__, ev.user_id, ev.item_id, ev.event_id >> 16 == ev.ts_ms, ev.activeness > 0
('Impression', 712, 5239, True, True)
"""
from __future__ import annotations

import csv
import heapq
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from streams.contracts import Click, Dwell, Feedback, FeedbackKind, Impression, activeness_code
from streams.sources import KeyedEvent, SourceCounters, SourceError, file_digest, open_text

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("user_id", "video_id", "time_ms", "is_click", "is_like", "is_hate",
               "play_time_ms", "duration_ms")
USERS_GLOB = "user_features*.csv*"
VIDEOS_GLOB = "video_features_basic*.csv*"
MAX_ROWS_PER_MS = 1 << 13


def is_kuairand_header(header: list[str]) -> bool:
    """True when ``header`` (CSV column names) has every column the KuaiRand mapping reads."""
    return all(c in header for c in LOG_COLUMNS)


@dataclass(frozen=True)
class KuaiRandOptions:
    """How a KuaiRand log is turned into events."""

    users_path: Path | None = None  # user_features table; None: look next to the log
    videos_path: Path | None = None  # video_features_basic table; None: look next to the log
    keep_duplicates: bool = False  # replay exact duplicate rows instead of dropping them
    autoplay_dwell: bool = False  # also emit dwell for non-clicked rows with play_time_ms > 0

    def __post_init__(self) -> None:
        for name in ("users_path", "videos_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("keep_duplicates", "autoplay_dwell"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a bool")


def find_table(log_path: Path, given: Path | None, pattern: str) -> Path | None:
    """``given`` if set (it must exist), else the single file matching ``pattern`` beside the log."""
    if given is not None:
        if not given.is_file():
            raise SourceError(f"KuaiRand feature table {str(given)!r} is not a file")
        return given
    found = sorted(p for p in log_path.parent.glob(pattern) if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SourceError(f"{log_path.parent}: several files match {pattern!r} ({names}); name one explicitly")
    return found[0] if found else None


def _table_rows(path: Path, needed: tuple[str, ...]) -> Iterator[tuple[int, list[str], dict[str, int]]]:
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise SourceError(f"{path}:1: missing column(s) {missing}")
        cols = {c: header.index(c) for c in needed}
        for row in reader:
            yield reader.line_num, row, cols


def load_users(path: Path) -> dict[int, int]:
    """user_id -> activeness code from a KuaiRand ``user_features`` table."""
    out: dict[int, int] = {}
    for line, row, cols in _table_rows(path, ("user_id", "user_active_degree")):
        try:
            out[int(row[cols["user_id"]])] = activeness_code(row[cols["user_active_degree"]])
        except (ValueError, IndexError) as exc:
            raise SourceError(f"{path}:{line}: bad user row: {exc}") from None
    return out


def load_videos(path: Path) -> dict[int, tuple[int, int]]:
    """video_id -> (duration_ms or 0, first tag id or -1) from ``video_features_basic``."""
    out: dict[int, tuple[int, int]] = {}
    for line, row, cols in _table_rows(path, ("video_id", "video_duration", "tag")):
        try:
            duration = row[cols["video_duration"]].strip()
            tag = row[cols["tag"]].strip()
            out[int(row[cols["video_id"]])] = (
                int(float(duration)) if duration else 0,
                int(tag.split(",")[0]) if tag else -1,
            )
        except (ValueError, IndexError) as exc:
            raise SourceError(f"{path}:{line}: bad video row: {exc}") from None
    return out


class KuaiRandSource:
    """A KuaiRand exposure log read as keyed events (see the module docstring for the mapping)."""

    def __init__(self, path: Path, options: KuaiRandOptions) -> None:
        self.path = Path(path)
        self.options = options
        self.counters = SourceCounters()
        self.users_path = find_table(self.path, options.users_path, USERS_GLOB)
        self.videos_path = find_table(self.path, options.videos_path, VIDEOS_GLOB)
        for name, p in (("users", self.users_path), ("videos", self.videos_path)):
            if p is None:
                logger.warning("kuairand feature table missing table=%s log=%s effect=defaults", name, self.path)

    def fingerprint(self) -> str:
        digest = file_digest(self.path, self.users_path, self.videos_path)
        o = self.options
        digest.update(f"kuairand keep_duplicates={o.keep_duplicates} autoplay_dwell={o.autoplay_dwell}".encode())
        return digest.hexdigest()

    def keyed_events(self) -> Iterator[KeyedEvent]:
        users = load_users(self.users_path) if self.users_path else {}
        videos = load_videos(self.videos_path) if self.videos_path else {}
        keep_duplicates, autoplay = self.options.keep_duplicates, self.options.autoplay_dwell
        counters = self.counters
        pending: list[KeyedEvent] = []  # events later than their row's time_ms, by (ts, rank, seq)
        push, pop = heapq.heappush, heapq.heappop
        like, dislike = FeedbackKind.LIKE, FeedbackKind.DISLIKE
        with open_text(self.path) as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            if not is_kuairand_header(header):
                raise SourceError(f"{self.path}:1: not a KuaiRand log header: {header[:6]}")
            i_user, i_video, i_ts, i_click, i_like, i_hate, i_play, i_dur = (
                header.index(c) for c in LOG_COLUMNS)
            group_ts, group_rows, j = -1, set(), 0
            for row in reader:
                counters.rows += 1
                try:
                    ts = int(row[i_ts])
                    user, video = int(row[i_user]), int(row[i_video])
                    clicked, liked, hated = row[i_click] == "1", row[i_like] == "1", row[i_hate] == "1"
                    play, duration = int(row[i_play]), int(row[i_dur])
                except (ValueError, IndexError) as exc:
                    raise SourceError(f"{self.path}:{reader.line_num}: bad log row: {exc}") from None
                if ts != group_ts:
                    if ts < group_ts:
                        raise SourceError(f"{self.path}:{reader.line_num}: time_ms={ts} < previous "
                                          f"{group_ts}; the log must be sorted by time_ms")
                    while pending and pending[0][0] < ts:
                        yield pop(pending)
                    group_ts, j = ts, 0
                    group_rows.clear()
                if not keep_duplicates:
                    key = tuple(row)
                    if key in group_rows:
                        counters.duplicates_dropped += 1
                        continue
                    group_rows.add(key)
                if j >= MAX_ROWS_PER_MS:
                    raise SourceError(f"{self.path}:{reader.line_num}: more than {MAX_ROWS_PER_MS} rows "
                                      f"at time_ms={ts}; ids would overflow")
                base = ts << 16 | j << 3
                j += 1
                if play < 0:
                    raise SourceError(f"{self.path}:{reader.line_num}: play_time_ms={play} < 0")
                video_duration, category = videos.get(video, (0, -1))
                duration = duration or video_duration
                push(pending, (ts, 0, base, Impression(
                    base, ts, user, video, base, users.get(user, 0), -1, duration, category)))
                if clicked:
                    push(pending, (ts, 1, base + 1, Click(base + 1, ts, base, user, video)))
                if clicked or (autoplay and play > 0):
                    push(pending, (ts + play, 2, base + 2, Dwell(base + 2, ts + play, base, user, video, play)))
                if liked:
                    push(pending, (ts + play, 3, base + 3, Feedback(base + 3, ts + play, user, video, like, base)))
                if hated:
                    push(pending, (ts + play, 3, base + 4, Feedback(base + 4, ts + play, user, video, dislike, base)))
        while pending:
            yield pop(pending)
