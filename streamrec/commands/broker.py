"""``streamrec broker``: run the embedded Kafka-compatible broker in the foreground.

Settings come from the ``[broker]`` table of ``--config`` (nested ``[broker.log]`` and
``[broker.groups]``) with the flags below on top. ``--port 0`` binds a free port; the bound port
is in the ``broker listening`` log line. Metadata tells clients to connect to ``--advertised-host``
(default: ``--host``), so a broker bound to ``0.0.0.0`` for remote clients needs a reachable name
or address there.
"""
from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from streamrec.config import build, load_section

if TYPE_CHECKING:
    from streams.broker.config import BrokerConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("broker", help="run the embedded Kafka-compatible broker")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--advertised-host", default=None,
                   help="host that Metadata tells clients to connect to (default: --host); set it with --host 0.0.0.0")
    p.add_argument("--port", type=int, default=None, help="port to bind, 0 = any free port (default 9092)")
    p.add_argument("--data-dir", default=None, help="where logs and group state live (default ./data/broker)")
    p.add_argument("--partitions", type=int, default=None, help="partitions of auto-created topics (default 3)")
    p.add_argument("--fsync", choices=("always", "interval", "never"), default=None,
                   help="when appends are fsynced (default interval)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> BrokerConfig:
    """Defaults < ``[broker]`` of ``--config`` < flags."""
    from streams.broker.config import BrokerConfig

    section = load_section(args.config, "broker")
    flags: dict[str, object] = {
        "host": args.host,
        "advertised_host": args.advertised_host,
        "port": args.port,
        "data_dir": args.data_dir,
        "default_partitions": args.partitions,
    }
    if "data_dir" not in section and args.data_dir is None:
        flags["data_dir"] = "./data/broker"
    if args.fsync is not None:
        flags["log"] = {**section.get("log", {}), "fsync": args.fsync}
    return build(BrokerConfig, section, flags)


def run(args: argparse.Namespace) -> int:
    from streams.broker import serve_forever

    serve_forever(build_config(args))
    return 0
