"""``streamrec`` console command: one entry point, one subcommand per job.

Each subcommand lives in ``streamrec/commands/<name>.py`` and exports ``register(subparsers)``,
which adds its parser and sets ``func=run`` where ``run(args) -> int`` is the exit status.

Errors an operator can act on (the project's own, a file or socket error, a Kafka client error:
an unreachable bootstrap server, a timeout) end the command with one line on stderr and exit
status 1; the traceback is logged at DEBUG (``--log-level DEBUG``). Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from streamrec.config import SECTIONS, ConfigError
from streamrec.logsetup import add_log_level_argument
from streamrec.logsetup import configure as configure_logging

logger = logging.getLogger("streamrec")

#: the subcommands' modules, one per config section (``build-samples`` -> ``build_samples``)
COMMANDS = tuple(name.replace("-", "_") for name in SECTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Streaming online learning for recommendation.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file; its [section] per command sets defaults")
    add_log_level_argument(parser)
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
    return run_command(args.func, args, args.command)


def run_command(func, args, command: str) -> int:
    """``func(args)``'s exit status; a configuration error exits 2 and an operational error 1,
    each with one line on stderr (the traceback is logged at DEBUG)."""
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"streamrec: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except operational_errors() as exc:
        logger.debug("%s failed", command, exc_info=True)
        print(f"streamrec {command}: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


def operational_errors() -> tuple[type[BaseException], ...]:
    """The exception types :func:`main` reports in one line (see the module docstring)."""
    from featurestore import FeatureStoreError
    from learner import LearnerError
    from streams import StreamsError
    from streams.dlq import DeadLetterError

    errors: list[type[BaseException]] = [StreamsError, LearnerError, FeatureStoreError, DeadLetterError, OSError]
    for module in ("kafka.errors", "aiokafka.errors"):
        try:
            errors.append(importlib.import_module(module).KafkaError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
