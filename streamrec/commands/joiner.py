"""``streamrec joiner``: run one faust joiner worker (events -> labeled samples) in the foreground.

Settings: the ``[joiner]`` table of ``--config`` (fields of ``streams.joiner.app.JoinerAppConfig``,
with a nested ``pipeline`` table holding ``joiner``, ``store`` and ``stats_epoch_ms``) under the
flags below. Run several with the same ``--data-dir`` and ``--app-id`` to share the partitions.
SIGTERM or Ctrl-C stops cleanly and prints the counter summary. ``python -m
streamrec.commands.joiner ...`` runs the same command without the ``streamrec`` front end.
"""
from __future__ import annotations

import argparse
import gc
import sys

from streamrec.config import build, load_section
from streamrec.logsetup import add_log_level_argument
from streamrec.logsetup import configure as configure_logging

GC_GEN0_THRESHOLD = 50_000


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("joiner", help="run a joiner worker (faust): events -> samples",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", default=None, help="host:port of the brokers (default 127.0.0.1:9092)")
    p.add_argument("--data-dir", default=None, help="per-partition feature stores (default ./data/joiner)")
    p.add_argument("--app-id", default=None, help="faust app id = consumer group (default streamrec-joiner)")
    p.add_argument("--web-port", type=int, default=None,
                   help="serve /counters (JSON) on this port, 0 = any free port (default: no web server)")
    p.add_argument("--web-host", default=None, help="address of the web server (default 127.0.0.1)")
    p.add_argument("--idle-flush-s", type=float, default=None,
                   help="a partition without events this long is treated as ended: pending impressions "
                        "are emitted (default: never; use for replays)")
    p.add_argument("--batch-max", type=int, default=None,
                   help="most records handled in one batch (one store commit; default 10000)")
    p.add_argument("--fetch-max-wait-ms", type=int, default=None,
                   help="longest a fetch long-polls the brokers (default 100)")
    p.add_argument("--delivery", choices=("batch", "stream"), default=None,
                   help="batch: each fetch reaches the joiner as one list (default); stream: faust's "
                        "per-record stream path (slower; for comparison)")
    p.add_argument("--session-timeout-s", type=float, default=None,
                   help="group session timeout: how soon a dead worker's partitions move (default 10)")


def run(args: argparse.Namespace) -> int:
    from streams.joiner.app import JoinerAppConfig
    from streams.joiner.worker import run_worker

    flags = {"bootstrap": args.bootstrap, "data_dir": args.data_dir, "app_id": args.app_id,
             "web_port": args.web_port, "web_host": args.web_host, "idle_flush_s": args.idle_flush_s,
             "batch_max": args.batch_max, "session_timeout_s": args.session_timeout_s,
             "fetch_max_wait_ms": args.fetch_max_wait_ms, "delivery": args.delivery}
    config = build(JoinerAppConfig, load_section(getattr(args, "config", None), "joiner"), flags)
    gc.set_threshold(GC_GEN0_THRESHOLD)  # the join state is many small objects (docs/joiner.md, section 6)
    code, counters = run_worker(config, loglevel=str(getattr(args, "log_level", "info")).lower())
    from streams.joiner.worker import summary_line
    print(f"joiner final: {summary_line(counters)}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamrec joiner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="TOML file; its [joiner] table sets defaults")
    add_log_level_argument(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    from streamrec.cli import run_command   # the same one-line errors as `streamrec joiner`
    return run_command(run, args, "joiner")


if __name__ == "__main__":
    sys.exit(main())
