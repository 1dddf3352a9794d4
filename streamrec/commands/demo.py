"""``streamrec demo``: the main job on the embedded default (what ``make run`` runs).

Today: start the embedded broker in-process, replay the bundled KuaiRand slice into the event
topics at full speed, read every topic back and print a per-topic summary.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from streamrec.config import build, load_section

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="embedded broker + replay of the bundled slice + summary",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", type=Path, default=DEFAULT_SLICE, help=f"log to replay (default {DEFAULT_SLICE})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the broker keeps its log (default: a temporary directory, removed afterwards)")
    p.add_argument("--partitions", type=int, default=3, help="partitions per event topic (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streams.broker import EmbeddedBroker
    from streams.broker.config import BrokerConfig
    from streams.replay import ReplayConfig, run_replay
    from streams.topic_summary import summarize_topics

    if not args.slice.exists():
        print(f"streamrec demo: input {str(args.slice)!r} does not exist", file=sys.stderr)
        return 2
    temp = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="streamrec-demo-")) if temp else args.data_dir
    try:
        broker_config = build(BrokerConfig, {"data_dir": data_dir / "broker", "port": 0,
                                             "default_partitions": args.partitions},
                              load_section(args.config, "broker"))
        with EmbeddedBroker(broker_config) as broker:
            print(f"== embedded broker on {broker.bootstrap} (data: {broker_config.data_dir})")
            replay_config = build(ReplayConfig, {
                "paths": (args.slice,), "bootstrap": broker.bootstrap, "speed": "max",
                "partitions": args.partitions, "state_path": data_dir / "replay-state.json",
                "progress": not args.no_progress,
            }, load_section(args.config, "replay"), {"bootstrap": broker.bootstrap})
            print(f"== replaying {replay_config.paths[0]} (speed=max)")
            stats = run_replay(replay_config)
            for line in stats.summary_lines():
                print(f"   {line}")
            print("== topics on the broker")
            t0 = time.monotonic()
            summaries = summarize_topics(broker.bootstrap)
            for s in summaries:
                print(f"   {s.line()}")
            n_bad = sum(s.n_undecodable for s in summaries)
            print(f"== read back {sum(s.n_messages for s in summaries)} messages in "
                  f"{time.monotonic() - t0:.1f}s; undecodable={n_bad}")
        return 0 if n_bad == 0 else 1
    finally:
        if temp:
            shutil.rmtree(data_dir, ignore_errors=True)
