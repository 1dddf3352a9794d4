"""``streamrec replay PATH...``: historical logs -> the event topics, in event-time order.

Settings come from the ``[replay]`` table of ``--config`` with the flags below on top; see
:class:`streams.replay.ReplayConfig` for every setting. A directory input stands for the KuaiRand
logs (``log_*.csv*``) and ``*.jsonl*`` files in it. Ctrl-C or SIGTERM stops after the current
event, flushes the producer and saves the position (exit status 130); the same command resumes
where it stopped.
"""
from __future__ import annotations

import argparse
import sys

from streamrec.config import build, load_section


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay", help="replay historical logs into the event topics",
        description="Replay historical logs into the event topics in event-time order; resumable.",
        epilog="Inputs: KuaiRand exposure logs (feature tables found beside them) and generic JSONL/CSV "
               "with a 'type' field per line; see streams/sources/. A directory stands for the "
               "log_*.csv* and *.jsonl* files in it.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="KuaiRand log, generic JSONL/CSV, or a directory of them (gzip welcome)")
    p.add_argument("--bootstrap", default=None, help="host:port[,host:port] (default 127.0.0.1:9092)")
    p.add_argument("--speed", default=None,
                   help="1 = real time, 100 = a hundred times faster, max = no pacing (default max)")
    p.add_argument("--from", dest="from_ms", default=None, metavar="TIME",
                   help="first event time to replay, ISO-8601 or epoch ms (inclusive)")
    p.add_argument("--until", dest="until_ms", default=None, metavar="TIME",
                   help="event time to stop at, ISO-8601 or epoch ms (exclusive)")
    p.add_argument("--partitions", type=int, default=None, metavar="N", help="partitions of topics it creates (default 3)")
    p.add_argument("--state", dest="state_path", default=None, metavar="FILE",
                   help="resume state file (default data/replay/state.json)")
    p.add_argument("--restart", action="store_true", default=None,
                   help="ignore the saved position and replay from the start")
    p.add_argument("--max-events", type=int, default=None, metavar="N", help="stop after this many events (resume later)")
    p.add_argument("--kuairand-users", default=None, metavar="FILE",
                   help="KuaiRand user_features table (default: found next to the log)")
    p.add_argument("--kuairand-videos", default=None, metavar="FILE",
                   help="KuaiRand video_features_basic table (default: found next to the log)")
    p.add_argument("--keep-duplicates", action="store_true", default=None,
                   help="replay exact duplicate KuaiRand rows instead of dropping them")
    p.add_argument("--autoplay-dwell", action="store_true", default=None,
                   help="also emit dwell for non-clicked KuaiRand rows with play time (auto-play)")
    p.add_argument("--skip-bad-lines", action="store_true", default=None,
                   help="skip and count malformed generic lines instead of stopping at the first")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streams.replay import ReplayConfig, run_replay

    flags = {name: getattr(args, name) for name in (
        "bootstrap", "speed", "from_ms", "until_ms", "partitions", "state_path", "restart", "max_events",
        "kuairand_users", "kuairand_videos", "keep_duplicates", "autoplay_dwell", "skip_bad_lines", "progress")}
    flags["paths"] = tuple(args.paths) or None
    section = load_section(args.config, "replay")
    if flags["paths"] is None and not section.get("paths"):
        print("streamrec replay: give at least one PATH (or paths in the [replay] config)", file=sys.stderr)
        return 2
    config = build(ReplayConfig, section, flags)
    from streamrec.signals import StopOnSignal

    with StopOnSignal() as stopper:  # a StreamsError ends in one line (streamrec.cli)
        # Pacing sleeps on the stop pipe, so a signal also cuts a long wait short.
        stats = run_replay(config, sleep=stopper.sleep, stop=stopper.is_set)
    for line in stats.summary_lines():
        print(line)
    return 130 if stats.interrupted else 0
