"""The job's process groups for several learner processes (docs/learner.md, "Several learner
processes"): where a rank sits (:class:`DistConfig`), the rendezvous that listens only on the
address it was given, and :class:`Comm`, the collectives the lockstep loop uses (tensors only:
state travels as ``torch.save`` bytes read back with ``weights_only=True``).
"""
from __future__ import annotations

import datetime
import io
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from learner import LearnerError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")


class DistributedError(LearnerError):
    """The ranks disagree (diverged state, another world size) or a peer failed: restart the whole job."""


@dataclass(frozen=True)
class DistConfig:
    """Where this process sits in the job. ``init_method``: ``tcp://host:port`` (rank 0 listens) or
    ``env://`` (torchrun's MASTER_ADDR / MASTER_PORT). ``backend`` "auto": nccl on CUDA, gloo on CPU.
    ``timeout_s`` bounds a collective (a peer that hangs without dying). ``busy_poll_s`` /
    ``idle_poll_s``: how long a rank waits for a local minibatch before it enters a step with none,
    after a step with samples / without."""

    world_size: int = 1
    rank: int = 0
    init_method: str = "env://"
    backend: str = "auto"
    timeout_s: float = 300.0
    busy_poll_s: float = 0.02
    idle_poll_s: float = 0.2

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size!r} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank!r} must be in [0, world_size={self.world_size})")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")
        if not (self.init_method.startswith("tcp://") or self.init_method == "env://"):
            raise ValueError(f"init_method={self.init_method!r} must be tcp://HOST:PORT or env://")
        if self.timeout_s <= 0 or self.busy_poll_s <= 0 or self.idle_poll_s <= 0:
            raise ValueError("timeout_s, busy_poll_s and idle_poll_s must be > 0")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def rendezvous_address(init_method: str) -> tuple[str, int]:
    """(host, port) of ``tcp://HOST:PORT``, or of ``env://`` (MASTER_ADDR, default 127.0.0.1, and
    MASTER_PORT).

    >>> rendezvous_address("tcp://127.0.0.1:29500")
    ('127.0.0.1', 29500)
    """
    if init_method.startswith("tcp://"):
        host, sep, port = init_method[len("tcp://"):].rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"init_method={init_method!r}: expected tcp://HOST:PORT")
        return host.strip("[]"), int(port)
    if init_method == "env://":
        port = os.environ.get("MASTER_PORT", "")
        if not port.isdigit():
            raise ValueError("init_method='env://' needs MASTER_PORT (and MASTER_ADDR, default 127.0.0.1)")
        return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(port)
    raise ValueError(f"init_method={init_method!r}: expected tcp://HOST:PORT or env://")


def _tcp_store(host: str, port: int, cfg: DistConfig, timeout: datetime.timedelta):
    """The rendezvous store. Rank 0 listens on exactly ``host`` (torch's own TCPStore server would
    listen on every interface): we bind the socket and hand it over."""
    if cfg.rank != 0:
        return dist.TCPStore(host, port, cfg.world_size, False, timeout=timeout), None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise DistributedError(f"rank 0 cannot listen on {host}:{port} for the rendezvous: {exc}") from exc
    listener.listen(128)
    store = dist.TCPStore(host, port, cfg.world_size, True, timeout=timeout, wait_for_workers=False,
                          master_listen_fd=listener.fileno())
    return store, listener   # the caller keeps the socket object (its fd) alive as long as the store


class Comm:
    """The job's process groups. ``data``: gradients, memory writes, scores (on ``device``; nccl on
    CUDA); ``ctrl``: headers, offsets, objects (CPU; gloo, the same group as ``data`` on CPU)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, data=None, ctrl=None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.data, self.ctrl = data, ctrl

    @classmethod
    def init(cls, cfg: DistConfig, device: torch.device) -> Comm:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"backend='nccl' needs a CUDA device, the trainer runs on {device}")
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        host, port = rendezvous_address(cfg.init_method)
        if host in LOOPBACK and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"   # a one-host job: gloo's sockets on loopback only
        store, listener = _tcp_store(host, port, cfg, timeout)
        dist.init_process_group(backend, store=store, rank=cfg.rank, world_size=cfg.world_size, timeout=timeout)
        ctrl = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        logger.info("process group up rank=%d world_size=%d backend=%s init=%s", cfg.rank, cfg.world_size,
                    backend, cfg.init_method)
        comm = cls(cfg.rank, cfg.world_size, device, data=None, ctrl=ctrl)
        comm._store, comm._listener = store, listener
        return comm

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as exc:   # gloo / nccl: a peer died or timed out
            raise DistributedError(f"collective {what} failed on rank {self.rank} (a peer stopped or hangs; "
                                   f"restart the whole job): {exc}") from exc

    def gather_ctrl(self, t: torch.Tensor) -> torch.Tensor:
        """(...) CPU tensor per rank -> (world, ...) in rank order."""
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._call("all_gather", dist.all_gather, out, t, group=self.ctrl)
        return torch.stack(out)

    def gather_data(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._call("all_gather", dist.all_gather, out, t, group=self.data)
        return out

    def all_reduce_data(self, t: torch.Tensor) -> None:
        self._call("all_reduce", dist.all_reduce, t, group=self.data)

    def broadcast_state(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (tensors, numbers, strings, lists, dicts: what a checkpoint holds) on every
        rank. Sent as ``torch.save`` bytes in a uint8 tensor and read with ``torch.load(...,
        weights_only=True)``: nothing received from a peer is unpickled as arbitrary objects (which
        ``broadcast_object_list`` would do)."""
        payload = b""
        if self.rank == 0:
            buf = io.BytesIO()
            torch.save(obj, buf)
            payload = buf.getvalue()
        size = torch.tensor([len(payload)], dtype=torch.int64)
        self._call("broadcast", dist.broadcast, size, src=0, group=self.ctrl)
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == 0
                else torch.empty(int(size.item()), dtype=torch.uint8))
        self._call("broadcast", dist.broadcast, data, src=0, group=self.ctrl)
        if self.rank == 0:
            return obj
        return torch.load(io.BytesIO(data.numpy().tobytes()), map_location="cpu", weights_only=True)

    def broadcast_int(self, value: int) -> int:
        t = torch.tensor([value if self.rank == 0 else 0], dtype=torch.int64)
        self._call("broadcast", dist.broadcast, t, src=0, group=self.ctrl)
        return int(t.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener.close()


__all__ = ["BACKENDS", "Comm", "DistConfig", "DistributedError", "rendezvous_address"]
