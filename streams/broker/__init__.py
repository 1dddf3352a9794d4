"""Embedded single-node Kafka-compatible broker (asyncio, Kafka wire protocol).

Unmodified Kafka clients (kafka-python, aiokafka/faust, librdkafka/confluent-kafka, kcat) talk to it
over TCP, so laptops and CI need no Kafka installation.

``EmbeddedBroker`` runs the broker on its own event loop in a background thread (tests, demos);
``serve_forever`` runs it in the foreground until SIGINT/SIGTERM (the ``streamrec broker`` command).
Both first raise the process's soft open-files limit to its hard limit (``raise_open_files_limit``):
every open partition holds file descriptors, and the usual soft default (1024) runs out after a few
hundred partitions.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import signal
import threading

from streams.broker.config import BrokerConfig
from streams.broker.server import Broker, BrokerError, RequestContext

__all__ = [
    "Broker", "BrokerConfig", "BrokerError", "EmbeddedBroker", "RequestContext", "raise_open_files_limit",
    "serve_forever",
]

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0
_NOFILE_CAP = 1 << 20  # used when the hard limit is unlimited (macOS refuses RLIM_INFINITY as a soft limit)


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (process-wide); returns the soft limit now in force.

    Never lowers it; when the raise is refused, logs a warning and keeps the current limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("open files limit not raised soft=%d hard=%d error=%r", soft, hard, exc)
            return soft
        logger.info("open files limit raised soft_before=%d soft=%d hard=%d", soft, target, hard)
        return target
    return soft


class EmbeddedBroker:
    """A broker served from a background thread with its own event loop.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with EmbeddedBroker(BrokerConfig(data_dir=d, port=0)) as b:
    ...         b.bootstrap.startswith("127.0.0.1:")
    True
    """

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self._broker: Broker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: asyncio.Event | None = None

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise BrokerError("EmbeddedBroker is not started")
        return self._broker

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def bootstrap(self) -> str:
        return f"{self.broker.advertised_host}:{self.port}"

    def start(self) -> None:
        """Start serving; returns once the socket is listening (raises if startup failed)."""
        if self._thread is not None:
            raise BrokerError("EmbeddedBroker already started")
        raise_open_files_limit()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="streamrec-broker", daemon=True,
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT_S):
            raise BrokerError(f"broker did not start within {_START_TIMEOUT_S}s data_dir={self.config.data_dir}")
        if failure:
            self._thread.join()
            self._thread = None
            raise BrokerError(f"broker failed to start: {failure[0]!r}") from failure[0]

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            broker = Broker(self.config)
            try:
                await broker.start()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                await broker.stop()
                return
            self._broker = broker
            ready.set()
            try:
                await self._stop_event.wait()
            finally:
                await broker.stop()

        asyncio.run(main())

    def enforce_retention(self, timeout_s: float = 30.0) -> int:
        """Apply the topics' retention now, on the broker's loop, instead of at its next periodic
        check (every 10 s); returns the number of segments deleted."""
        broker, loop = self.broker, self._loop

        async def run() -> int:
            return broker.logs.enforce_retention_all()
        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout_s)

    def stop(self) -> None:
        """Stop serving, close connections and flush the logs; idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_forever(config: BrokerConfig) -> None:
    """Run a broker in the foreground until SIGINT or SIGTERM, then shut down cleanly."""

    raise_open_files_limit()
    if config.host in ("0.0.0.0", "::", "") and config.advertised_host is None:
        logger.warning(
            "broker binds a wildcard address host=%r and advertises it to clients; remote clients "
            "cannot connect to it, set advertised_host (--advertised-host)", config.host,
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        broker = Broker(config)
        await broker.start()
        try:
            await stop.wait()
            logger.info("shutdown requested port=%d", broker.port)
        finally:
            await broker.stop()

    asyncio.run(main())
