"""Cut the bundled KuaiRand-Pure slice in ``data/kuairand-slice/`` from the full log.

The slice is a contiguous event-time window of the standard-feed log: every row with
``from_ms <= time_ms < until_ms`` (default: from the start of the log up to 2022-04-26T00:00:00Z,
about the first 33 hours), with all columns and every row kept byte for byte, duplicates
included. The user and video feature tables are reduced to the ids that appear in that window,
again byte for byte and in their original order. Output files are gzipped with a fixed header
(no file name, mtime 0), so running the script twice gives byte-identical files.

Usage (from the repository root)::

    python scripts/make_kuairand_slice.py \\
        --source ../shared/data/kuairand-pure --out data/kuairand-slice \\
        --until 2022-04-26T00:00:00Z

The script prints the row counts and the per-topic event counts that the default replay mapping
(see ``streams/sources/kuairand.py``) produces from the slice.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import sys
from datetime import datetime, timezone
from pathlib import Path

LOG_NAME = "log_standard_4_25_to_5_08_pure.csv.gz"
USERS_NAME = "user_features_pure.csv.gz"
VIDEOS_NAME = "video_features_basic_pure.csv.gz"
OUT_LOG_NAME = "log_standard_slice.csv.gz"


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO-8601 timestamp (``Z`` or an offset; naive means UTC)."""
    if text.lstrip("-").isdigit():
        return int(text)
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _read_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return fh.read().splitlines(keepends=True)


def _first_field(line: str) -> str:
    return next(csv.reader(io.StringIO(line)))[0]


def _write_gz(path: Path, lines: list[str]) -> int:
    data = "".join(lines).encode("utf-8")
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(data)
    return path.stat().st_size


def cut(source: Path, out: Path, from_ms: int | None, until_ms: int) -> dict[str, int]:
    """Write the slice into ``out`` and return its statistics."""
    log_lines = _read_lines(source / LOG_NAME)
    header, body = log_lines[0], log_lines[1:]
    cols = next(csv.reader(io.StringIO(header)))
    i_ts, i_user, i_video = cols.index("time_ms"), cols.index("user_id"), cols.index("video_id")
    i_click, i_like, i_hate = cols.index("is_click"), cols.index("is_like"), cols.index("is_hate")
    i_play = cols.index("play_time_ms")

    kept: list[str] = []
    users: set[str] = set()
    videos: set[str] = set()
    stats = {"rows": 0, "duplicates": 0, "impressions": 0, "clicks": 0, "dwell": 0,
             "dwell_autoplay": 0, "likes": 0, "hates": 0, "first_ms": 0, "last_ms": 0}
    seen: set[str] = set()
    for line in body:
        row = next(csv.reader(io.StringIO(line)))
        ts = int(row[i_ts])
        if ts >= until_ms or (from_ms is not None and ts < from_ms):
            continue
        kept.append(line)
        users.add(row[i_user])
        videos.add(row[i_video])
        stats["rows"] += 1
        stats["first_ms"] = stats["first_ms"] or ts
        stats["last_ms"] = ts
        if line in seen:
            stats["duplicates"] += 1
            continue
        seen.add(line)
        stats["impressions"] += 1
        clicked = row[i_click] == "1"
        stats["clicks"] += clicked
        stats["dwell"] += clicked
        stats["dwell_autoplay"] += (not clicked) and int(row[i_play]) > 0
        stats["likes"] += row[i_like] == "1"
        stats["hates"] += row[i_hate] == "1"

    out.mkdir(parents=True, exist_ok=True)
    stats["log_bytes"] = _write_gz(out / OUT_LOG_NAME, [header, *kept])
    for name, ids, key in ((USERS_NAME, users, "users"), (VIDEOS_NAME, videos, "videos")):
        lines = _read_lines(source / name)
        picked = [ln for ln in lines[1:] if _first_field(ln) in ids]
        stats[key] = len(picked)
        stats[f"{key}_bytes"] = _write_gz(out / name, [lines[0], *picked])
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/kuairand-pure"))
    parser.add_argument("--out", type=Path, default=Path("data/kuairand-slice"))
    parser.add_argument("--from", dest="from_", default=None, help="ISO-8601 or epoch ms (inclusive)")
    parser.add_argument("--until", default="2022-04-26T00:00:00Z", help="ISO-8601 or epoch ms (exclusive)")
    args = parser.parse_args(argv)
    from_ms = parse_time_ms(args.from_) if args.from_ else None
    stats = cut(args.source, args.out, from_ms, parse_time_ms(args.until))
    print(f"command: python scripts/make_kuairand_slice.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    for key, value in stats.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
