"""Asyncio network server of the embedded broker: framing, request dispatch, broker state.

One event loop serves every connection. A connection's requests are handled one after another and
answered in order, as Apache Kafka does (a pipelining client simply finds the next request already
buffered). A connection that sends no request for ``connections_max_idle_ms`` is closed; the
clock runs only while the broker waits for the client, so a fetch parked in a long poll is never
idle. Handlers are plugged in through ``HANDLERS`` tables (see ``handlers_data``); the server
decodes the request with kafka-python's protocol classes, awaits the handler and encodes its
response with the request's version and correlation id.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from kafka.protocol import admin, consumer, metadata, producer
from kafka.protocol.api_message import ApiMessage

from streams import StreamsError
from streams.broker.config import BrokerConfig

if TYPE_CHECKING:
    from streams.broker.groups import GroupCoordinator
    from streams.broker.log import LogManager
    from streams.broker.producers import ProducerStateManager

logger = logging.getLogger(__name__)

API_VERSIONS_KEY = 18
UNSUPPORTED_VERSION = 35
_MIN_FRAME_BYTES = 10  # api_key + api_version + correlation_id + client_id length
_FLUSH_TICK_MS_MAX = 1000
_RETENTION_EVERY_MS = 10_000
_READ_BUFFER_BYTES = 1 << 20  # per-connection read-ahead before the transport pauses


class BrokerError(StreamsError):
    """The embedded broker could not start or serve."""


class ProtocolViolation(BrokerError):
    """A client sent bytes that are not a request this broker can answer; its connection is closed."""


class CloseConnection(BrokerError):
    """Raised by a handler to close the client's connection instead of answering (as Kafka does when
    an acks=0 produce fails, so that the client refreshes its metadata)."""


@dataclass(frozen=True)
class RequestContext:
    """What a handler knows about the request besides its body."""

    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    client_host: str
    broker: "Broker"


Handler = Callable[[RequestContext, ApiMessage], Awaitable[ApiMessage | None]]
HandlerTable = dict[int, tuple[Handler, int, int]]


def _message_classes() -> tuple[dict[int, type[ApiMessage]], dict[int, type[ApiMessage]]]:
    requests: dict[int, type[ApiMessage]] = {}
    responses: dict[int, type[ApiMessage]] = {}
    for module in (admin, consumer, metadata, producer):
        for name in module.__all__:
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, ApiMessage) and cls.type in ("request", "response"):
                (requests if cls.is_request() else responses)[cls.API_KEY] = cls
    return requests, responses


REQUEST_CLASSES, RESPONSE_CLASSES = _message_classes()


def load_handlers() -> HandlerTable:
    """The data-plane table merged with the group table (when that module is present)."""
    from streams.broker import handlers_data

    table: HandlerTable = dict(handlers_data.HANDLERS)
    try:
        handlers_group = importlib.import_module("streams.broker.handlers_group")
    except ModuleNotFoundError as exc:
        if exc.name != "streams.broker.handlers_group":
            raise
        logger.warning("group handlers unavailable module=streams.broker.handlers_group")
    else:
        table.update(handlers_group.HANDLERS)
    return table


def _skip_tagged_fields(buf: memoryview, pos: int) -> int:
    count, pos = _read_uvarint(buf, pos)
    for _ in range(count):
        _tag, pos = _read_uvarint(buf, pos)
        size, pos = _read_uvarint(buf, pos)
        pos += size
    if pos > len(buf):
        raise ProtocolViolation("tagged fields run past the end of the frame")
    return pos


def _read_uvarint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 28:
            raise ProtocolViolation("bad unsigned varint in request header")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def now_ms() -> int:
    return int(time.time() * 1000)


class Broker:
    """Broker state shared by handlers (``ctx.broker``) plus the TCP server around it."""

    def __init__(self, config: BrokerConfig, handlers: HandlerTable | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.advertised_host = config.advertised_host or config.host
        self.port = config.port
        self.cluster_id = "streamrec-embedded"
        self.logs: LogManager | None = None  # set by start()
        self.groups: GroupCoordinator | None = None
        self.producers: ProducerStateManager | None = None
        self.handlers: HandlerTable = handlers if handlers is not None else load_handlers()
        self._server: asyncio.base_events.Server | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._append_waiters: dict[tuple[str, int], set[asyncio.Future[None]]] = {}
        self._periodic: asyncio.Task[None] | None = None
        # per-event facts: ("requests", api_key), ("connections", "accepted"), ("connections", "malformed"),
        # ("requests", "unsupported"), ("connections", "handler_error"), ("connections", "closed_by_handler"),
        # ("connections", "idle_closed")
        self.counters: Counter[tuple[str, int | str]] = Counter()

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        from streams.broker.log import LogManager
        from streams.broker.producers import ProducerStateManager

        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs = LogManager(self.config.data_dir / "logs", self.config.log, now_ms)
        self.producers = ProducerStateManager(self.config.data_dir / "producer_ids")
        try:
            groups_mod = importlib.import_module("streams.broker.groups")
        except ModuleNotFoundError as exc:
            if exc.name != "streams.broker.groups":
                raise
            logger.warning("group coordinator unavailable module=streams.broker.groups")
        else:
            self.groups = groups_mod.GroupCoordinator(self.config.groups, self.config.data_dir / "__groups", now_ms)
            await self.groups.start()
        self._server = await asyncio.start_server(
            self._serve_connection, self.config.host, self.config.port, limit=_READ_BUFFER_BYTES,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._periodic = asyncio.get_running_loop().create_task(self._periodic_loop())
        logger.info(
            "broker listening host=%s port=%d data_dir=%s topics=%d",
            self.config.host, self.port, self.config.data_dir, len(self.logs.topics()),
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conn_tasks):
            task.cancel()
        if self._periodic is not None:
            self._periodic.cancel()
        pending = [t for t in (*self._conn_tasks, self._periodic) if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        try:
            if self.groups is not None:
                await self.groups.stop()
        finally:
            if self.logs is not None:
                self.logs.flush_all()
                self.logs.close()
                self.logs = None
        logger.info("broker stopped port=%d", self.port)

    async def _periodic_loop(self) -> None:
        tick_s = min(self.config.log.fsync_interval_ms, _FLUSH_TICK_MS_MAX) / 2000.0
        next_retention = now_ms() + _RETENTION_EVERY_MS
        while True:
            await asyncio.sleep(tick_s)
            t = now_ms()
            try:
                self.logs.maybe_flush_all(t)
                if t >= next_retention:
                    next_retention = t + _RETENTION_EVERY_MS
                    self.logs.enforce_retention_all(t)
            except Exception:
                logger.exception("periodic log maintenance failed")

    # ---- long poll support -----------------------------------------------------------------
    def notify_append(self, topic: str, partition: int) -> None:
        """Wake fetches waiting on ``topic``/``partition`` (called after every append)."""
        waiters = self._append_waiters.pop((topic, partition), None)
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    @property
    def n_waiting_fetches(self) -> int:
        """Fetches parked until an append (or their max_wait) arrives."""
        return len({id(f) for waiters in self._append_waiters.values() for f in waiters})

    async def wait_for_append(self, keys: list[tuple[str, int]], timeout_s: float) -> bool:
        """Wait until one of ``keys`` gets an append or ``timeout_s`` passes; True if woken."""
        if timeout_s <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._append_waiters.setdefault(key, set()).add(fut)
        try:
            done, _ = await asyncio.wait((fut,), timeout=timeout_s)
            return bool(done)
        finally:
            for key in keys:
                waiters = self._append_waiters.get(key)
                if waiters is not None:
                    waiters.discard(fut)
                    if not waiters:
                        del self._append_waiters[key]

    # ---- connections -----------------------------------------------------------------------
    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conn_tasks.add(task)
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        counters = self.counters
        counters["connections", "accepted"] += 1
        max_bytes = self.config.max_request_bytes
        idle_ms = self.config.connections_max_idle_ms
        idle_s = idle_ms / 1000.0 if idle_ms > 0 else None
        try:
            while True:
                size = None
                try:
                    # one clock for the whole frame: a silent connection and a frame stalled
                    # half-sent (which holds its buffer) are both closed
                    async with asyncio.timeout(idle_s):
                        size = int.from_bytes(await reader.readexactly(4), "big", signed=True)
                        if size < _MIN_FRAME_BYTES or size > max_bytes:
                            counters["connections", "malformed"] += 1
                            logger.warning(
                                "closing connection: bad frame size peer=%s size=%d max_request_bytes=%d",
                                peer, size, max_bytes,
                            )
                            return
                        frame = await reader.readexactly(size)
                except asyncio.IncompleteReadError as exc:
                    if size is not None or exc.partial:
                        logger.warning("connection closed mid-frame peer=%s size=%s", peer, size)
                    return
                except TimeoutError:
                    counters["connections", "idle_closed"] += 1
                    if size is None:
                        logger.debug("closing idle connection peer=%s connections_max_idle_ms=%d", peer, idle_ms)
                    else:
                        logger.warning("closing connection stalled mid-frame peer=%s size=%d", peer, size)
                    return
                try:
                    out = await self._dispatch(memoryview(frame), host)
                except ProtocolViolation as exc:
                    counters["connections", "malformed"] += 1
                    logger.warning("closing connection: %s peer=%s", exc, peer)
                    return
                except CloseConnection as exc:
                    counters["connections", "closed_by_handler"] += 1
                    logger.debug("closing connection: %s peer=%s", exc, peer)
                    return
                if out is not None:
                    writer.write(out)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            counters["connections", "handler_error"] += 1
            logger.exception("closing connection after unexpected error peer=%s", peer)
        finally:
            self._conn_tasks.discard(task)
            writer.close()

    async def _dispatch(self, frame: memoryview, client_host: str) -> bytes | None:
        api_key, api_version, correlation_id, client_id_len = struct.unpack_from(">hhih", frame, 0)
        pos = 10
        client_id = None
        if client_id_len >= 0:
            if pos + client_id_len > len(frame):
                raise ProtocolViolation("client_id runs past the end of the frame")
            client_id = bytes(frame[pos:pos + client_id_len]).decode("utf-8", errors="replace")
            pos += client_id_len
        entry = self.handlers.get(api_key)
        req_cls = REQUEST_CLASSES.get(api_key)
        if entry is None or not entry[1] <= api_version <= entry[2]:
            self.counters["requests", "unsupported"] += 1
            return self._unsupported(api_key, api_version, correlation_id, req_cls is not None)
        handler = entry[0]
        if req_cls is None:
            raise ProtocolViolation(f"no request schema for api_key={api_key}")
        if req_cls.flexible_version_q(api_version):
            pos = _skip_tagged_fields(frame, pos)
        try:
            request = req_cls.decode(frame[pos:], version=api_version)
        except Exception as exc:
            raise ProtocolViolation(
                f"undecodable request api_key={api_key} api_version={api_version} error={exc!r}"
            ) from None
        self.counters["requests", api_key] += 1
        ctx = RequestContext(api_key, api_version, correlation_id, client_id, client_host, self)
        response = await handler(ctx, request)
        if response is None:
            return None
        return encode_response(response, api_version, correlation_id)

    def _unsupported(self, api_key: int, api_version: int, correlation_id: int, known: bool) -> bytes:
        """UNSUPPORTED_VERSION where the response schema can carry it; otherwise close."""
        if api_key == API_VERSIONS_KEY:
            from streams.broker.handlers_data import api_versions_response

            response = api_versions_response(self, error_code=UNSUPPORTED_VERSION)
            return encode_response(response, 0, correlation_id)
        resp_cls = RESPONSE_CLASSES.get(api_key)
        if not known or resp_cls is None:
            raise ProtocolViolation(f"unknown api_key={api_key} api_version={api_version}")
        field = resp_cls._struct.fields.get("error_code")
        if 0 <= api_version <= resp_cls.max_version and field is not None and field.for_version_q(api_version):
            logger.debug("unsupported version api_key=%d api_version=%d", api_key, api_version)
            return encode_response(resp_cls(error_code=UNSUPPORTED_VERSION), api_version, correlation_id)
        raise ProtocolViolation(
            f"unsupported api_key={api_key} api_version={api_version} and no top-level error field to say so"
        )


def encode_response(response: Any, api_version: int, correlation_id: int) -> bytes:
    """Frame ``response`` with its header for ``api_version`` (the version is set before the header,
    as kafka-python's version setter does not expect a response header)."""
    response.API_VERSION = api_version
    response.with_header(correlation_id=correlation_id)
    return response.encode(header=True, framed=True)
