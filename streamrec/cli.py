"""``streamrec`` console command: one entry point, one subcommand per job.

Each subcommand lives in ``streamrec/commands/<name>.py`` and exports ``register(subparsers)``,
which adds its parser and sets ``func=run`` where ``run(args) -> int`` is the exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from streamrec.config import ConfigError
from streamrec.logsetup import configure as configure_logging

COMMANDS = ("broker", "replay", "tail", "demo", "joiner", "build_samples", "train_offline", "learner", "score")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Streaming online learning for recommendation.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file; its [section] per command sets defaults")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"streamrec.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"streamrec.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"streamrec: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
