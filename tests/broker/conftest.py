"""Helpers for broker tests: deadline polling, raw protocol frames over a socket, subprocess brokers."""
from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest
from kafka.protocol.metadata import MetadataRequest
from kafka.protocol.producer import ProduceRequest
from kafka.record.default_records import DefaultRecordBatchBuilder

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTEN_RE = re.compile(r"broker listening host=\S+ port=(\d+)")


def wait_for(check: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition") -> T:
    """Poll ``check`` until it returns a truthy value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def host_port(bootstrap: str) -> tuple[str, int]:
    host, port = bootstrap.rsplit(":", 1)
    return host, int(port)


class RawClient:
    """A bare TCP connection speaking framed Kafka requests built with kafka-python's classes."""

    def __init__(self, bootstrap: str, timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection(host_port(bootstrap), timeout=timeout_s)
        self._cid = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, request, version: int, client_id: str = "raw-test") -> int:
        self._cid += 1
        request.API_VERSION = version
        request.with_header(correlation_id=self._cid, client_id=client_id)
        self.sock.sendall(request.encode(header=True, framed=True))
        return self._cid

    def recv_frame(self) -> bytes:
        size = struct.unpack(">i", self._recv_exactly(4))[0]
        return self._recv_exactly(size)

    def request(self, request, version: int):
        """Send ``request`` at ``version`` and decode the matching response."""
        cid = self.send(request, version)
        frame = self.recv_frame()
        response_cls = request.header.get_response_class()
        response = response_cls.decode(frame, version=version, header=True)
        if response.header.correlation_id != cid:
            raise AssertionError(f"correlation_id={response.header.correlation_id} != {cid}")
        return response

    def is_closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        """True when the broker closes the connection (EOF or reset) within ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def _recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


def metadata_request(topics: list[str] | None = None) -> MetadataRequest:
    """A Metadata request for ``topics`` (None = all) that may auto-create them."""
    wanted = None if topics is None else [MetadataRequest.MetadataRequestTopic(name=t) for t in topics]
    return MetadataRequest(topics=wanted, allow_auto_topic_creation=True)


def make_batch(pid: int, epoch: int, seq: int, values: list[bytes]) -> bytes:
    """One uncompressed v2 record batch (pid -1 = not idempotent)."""
    builder = DefaultRecordBatchBuilder(2, 0, False, pid, epoch, seq, 1 << 20)
    for i, v in enumerate(values):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=None, value=v, headers=[])
    return bytes(builder.build())


def produce_raw(client: RawClient, topic: str, records: bytes, acks: int = -1):
    """Produce ``records`` to partition 0 of ``topic`` (v9); returns the partition response."""
    R = ProduceRequest.TopicProduceData
    req = ProduceRequest(transactional_id=None, acks=acks, timeout_ms=5000, topic_data=[
        R(name=topic, partition_data=[R.PartitionProduceData(index=0, records=records)])])
    return client.request(req, 9).responses[0].partition_responses[0]


@pytest.fixture
def raw_client(broker):
    clients: list[RawClient] = []

    def connect() -> RawClient:
        c = RawClient(broker.bootstrap)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()


class BrokerProcess:
    """``streamrec broker`` in a subprocess on a free port; parses the bound port from its log."""

    def __init__(self, data_dir: Path, log_path: Path, extra: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout_s: float = 30.0) -> BrokerProcess:
        cmd = [sys.executable, "-m", "streamrec.cli", "broker", "--port", "0", "--data-dir", str(self.data_dir), *self.extra]
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        start = self.log_path.stat().st_size if self.log_path.exists() else 0

        def bound_port() -> int | None:
            if self.proc.poll() is not None:
                pytest.fail(f"broker exited rc={self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            with open(self.log_path, "rb") as fh:
                fh.seek(start)
                m = _LISTEN_RE.search(fh.read().decode(errors="replace"))
            return int(m.group(1)) if m else None

        self.port = wait_for(bound_port, timeout_s, 0.05, "broker subprocess to listen")
        return self

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def terminate(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(20)
        self._log.close()
        return rc
