"""Logging for the ``streamrec`` commands: one format, and the Kafka client's chatter kept out.

kafka-python logs every connection, bootstrap and metadata refresh at INFO: a joiner worker's log
was 90 % such lines (a client per read-back, each with its own connections), and ``streamrec
demo`` printed them between its own summary lines. Unless the level is DEBUG, the ``kafka`` logger
(kafka-python) is set to WARNING; its warnings and errors still show. One error it logs on a normal
close (a metadata refresh in flight when the client closes: ``Metadata refresh: failed
Cancelled``) is dropped unless the level is DEBUG. aiokafka and faust (group membership, assignments) are left as they are.
"""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_CLIENT_LOGGERS = ("kafka",)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_level_argument(parser) -> None:
    """``--log-level``, refusing anything but :data:`LEVELS` (any case)."""
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS,
                        help="DEBUG, INFO, WARNING, ERROR (default INFO)")


def configure(level_name: str) -> None:
    """The root logger at ``level_name`` (one of :data:`LEVELS`; stderr, :data:`FORMAT`), the
    client loggers quieted."""
    level = getattr(logging, level_name.upper())
    logging.basicConfig(level=level, format=FORMAT)
    _quiet_clients(level)


def _quiet_clients(level: int) -> None:
    debug = level <= logging.DEBUG
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
    cluster = logging.getLogger("kafka.cluster")
    if _closing_noise not in cluster.filters:
        cluster.addFilter(_closing_noise)


def _closing_noise(record: logging.LogRecord) -> bool:
    """False for kafka-python's "Metadata refresh: failed Cancelled" (a refresh cut short by the
    client's close), unless the root logger is at DEBUG."""
    if record.msg == "Metadata refresh: failed %s" and isinstance(record.args, tuple) and record.args:
        from kafka.errors import Cancelled
        if isinstance(record.args[0], Cancelled):
            return logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    return True


__all__ = ["FORMAT", "configure"]
