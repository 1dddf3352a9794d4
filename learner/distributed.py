"""Several learner processes training one model with ``torch.distributed`` (docs/learner.md,
"Several learner processes").

Every rank is a member of the same consumer group (the group's assignment splits the partitions)
and holds a full replica of the trainer. Training runs in lockstep: each loop iteration is one
collective step, in which every rank takes part whether it holds a minibatch, nothing, or a
rebalance barrier.

One step, on every rank:

1. header: ``all_gather`` of (local sample count, rejected count, stop, rebalance barrier held,
   rank 0's "checkpoint by time", partitions touched, rank 0's durable version) on the control group;
2. offsets: ``all_gather`` of each rank's ``(partition, next offset)`` pairs; every rank applies all
   of them in rank order, so every rank holds the same global trained position;
3. when the ranks hold N > 0 samples: local score + backward (a rank without samples contributes a
   zero gradient); :class:`GradientReducer` sums ``grad_r * n_r / N`` over the ranks (the gradient of
   the mean loss over the union of the ranks' samples) and every rank steps its optimizer with it;
4. memory and metrics: ``all_gather`` of every rank's DUMN memory writes (write weights, erase, add;
   padded to the largest count) with its served scores and labels; every rank applies ALL writes
   in rank order (rank 0's samples in stream order, then rank 1's, ...) with the model's own write
   routine and feeds the same union to its metrics, so memory and metrics stay identical too.

Checkpoints are collective: rank 0 writes the file (it holds the global offsets and the common
state) and announces the version; every rank commits its own partitions once rank 0 reports the
version durable. A restart broadcasts rank 0's newest good checkpoint to every rank.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import io
import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from learner import LearnerError
from learner.checkpoint import CheckpointError
from learner.continuous import ContinuousLearner
from learner.models.dumn_memory import N_KINDS, UserMemory
from learner.stream import RebalanceBarrier, StreamBatch, from_source_offsets, to_source_offsets

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
_HEADER = ("n_local", "n_rejected", "stop", "barrier", "time_due", "n_parts", "durable_version")


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


class MemoryWrites:
    """Captures the DUMN memory writes of a local training forward instead of applying them.

    Each :class:`UserMemory` of ``model`` gets an instance-level ``_write`` that stores its
    (w (B, 4, m), erase (B, 4, Z), add (B, 4, Z)); :func:`merge_memory_writes` later applies every
    rank's writes with the class's own ``_write``. Reads inside the forward still see the memory as
    it stood at the start of the step (the model copies it before addressing).
    """

    def __init__(self, model: torch.nn.Module):
        self.memories = [m for m in model.modules() if isinstance(m, UserMemory)]
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self.memories)
        for i, um in enumerate(self.memories):
            um._write = functools.partial(self._capture, i)

    def _capture(self, i: int, w: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> None:
        self.pending[i] = (w, erase, add)

    def take(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        out, self.pending[i] = self.pending[i], None
        return out


def write_width(memory: UserMemory) -> int:
    """Floats per sample and kind of one write: m (weights) + Z (erase) + Z (add)."""
    return memory.memory.shape[1] + 2 * memory.memory.shape[2]


def pack_writes(memory: UserMemory, writes: tuple[torch.Tensor, ...] | None, n_local: int) -> torch.Tensor:
    """One rank's writes as (n_local, 4, m + 2 Z) float32 (zero rows when it had no samples)."""
    if writes is None or n_local == 0:
        return torch.zeros(n_local, N_KINDS, write_width(memory), device=memory.memory.device)
    return torch.cat([t.detach().float() for t in writes], -1)                 # (B, 4, m + 2 Z)


def apply_writes(memory: UserMemory, rows: torch.Tensor) -> None:
    """Apply ``rows`` (N, 4, m + 2 Z), in order, with the model's own write (loop on CPU, scan elsewhere)."""
    m, z = memory.memory.shape[1], memory.memory.shape[2]
    if rows.shape[0]:
        UserMemory._write(memory, rows[..., :m], rows[..., m:m + z], rows[..., m + z:])


def merge_memory_writes(comm: Comm, memory: UserMemory, local: torch.Tensor, counts: list[int]) -> None:
    """Every rank applies every rank's writes in rank order: the memory afterwards equals one process
    writing rank 0's samples, then rank 1's, ... ``local`` (counts[rank], 4, m + 2 Z)."""
    n_max = max(counts)
    if n_max == 0:
        return
    padded = local.new_zeros(n_max, *local.shape[1:])                          # (n_max, 4, m + 2 Z)
    padded[:local.shape[0]] = local
    parts = comm.gather_data(padded)
    apply_writes(memory, torch.cat([p[:c] for p, c in zip(parts, counts)]))    # (N, 4, m + 2 Z)


class GradientReducer:
    """Sums ``grad_r * n_r / N`` over the ranks, in one flat buffer with a has-gradient flag per
    parameter (a parameter no rank gave a gradient keeps ``grad = None``, so the optimizer skips it
    as a single process would) and the weighted loss as its last element."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.n_values = sum(self.sizes)
        self._buf: torch.Tensor | None = None

    def reduce(self, comm: Comm, n_local: int, n_total: int, loss: float) -> float:
        """Reduce the ``.grad`` s in place; -> the mean loss over the union."""
        dev = self.params[0].device if self.params else comm.device
        if self._buf is None:
            self._buf = torch.empty(self.n_values + len(self.params) + 1, dtype=torch.float32, device=dev)
        buf = self._buf
        buf.zero_()
        scale = n_local / n_total
        flags = buf[self.n_values:self.n_values + len(self.params)]                # (n_params,)
        at = 0
        for i, (p, n) in enumerate(zip(self.params, self.sizes)):
            if p.grad is not None and n_local:
                buf[at:at + n].copy_(p.grad.reshape(-1)).mul_(scale)
                flags[i] = 1.0
            at += n
        buf[-1] = loss * scale if n_local else 0.0
        comm.all_reduce_data(buf)
        at = 0
        for p, n, has in zip(self.params, self.sizes, flags.tolist()):
            p.grad = buf[at:at + n].view_as(p).to(p.dtype).clone() if has > 0 else None
            at += n
        return float(buf[-1])


def state_digest(module: torch.nn.Module, only: str | None = None) -> str:
    """sha256 over ``module.state_dict()`` in name order (``only``: names containing it).

    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> _ = b.load_state_dict(a.state_dict())
    >>> state_digest(a) == state_digest(b)
    True
    """
    return tensors_digest((n, t) for n, t in module.state_dict().items() if only is None or only in n)


def tensors_digest(named) -> str:
    """sha256 over (name, tensor) pairs, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda nt: nt[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stream_index_buffers(objective: torch.nn.Module) -> list[torch.Tensor]:
    """Objective buffers that count samples (CLSD's ``n_seen`` for its warm-up)."""
    return [b for name, b in objective.named_buffers() if name.endswith("n_seen")]


class DistributedLearner(ContinuousLearner):
    """:class:`ContinuousLearner` as one rank of a lockstep job (see the module docstring).

    Same constructor plus ``comm``; only rank 0 needs ``publisher``. ``n_local_samples`` and
    ``local_partitions`` count what this rank itself trained.
    """

    def __init__(self, *args, comm: Comm, dist_cfg: DistConfig = DistConfig(), **kwargs):
        super().__init__(*args, **kwargs)
        self.comm = comm
        self.dist_cfg = dist_cfg
        self.writes = MemoryWrites(self.trainer.model)
        params = [p for g in self.trainer.optimizer.param_groups for p in g["params"]]
        self.reducer = GradientReducer(params)
        self.n_local_samples = 0
        self.local_partitions: Counter[int] = Counter()
        self._audit_by_rank: list[int] = []
        self._commit_after: dict[int, dict[int, int]] = {}   # version -> offsets, until rank 0 says durable
        self._durable_version = 0                                # rank 0: newest version saved and announced

    # ---- restart ---------------------------------------------------------------------------

    def restore(self) -> int:
        """Rank 0 loads the newest good checkpoint and broadcasts it; every rank restores from it."""
        found: dict[str, Any] = {}
        if self.comm.rank == 0:
            try:   # no checkpoint: rank 0's fresh state, so that every rank starts from the same weights
                loaded = self.store.load_newest()
                found = {"loaded": None if loaded is None else [loaded[0], str(loaded[1]), loaded[2]],
                         "next_version": self.store.next_version(),
                         "initial": None if loaded else self.trainer.checkpoint_state()}
            except CheckpointError as exc:
                found = {"error": str(exc)}
        found = self.comm.broadcast_state(found)
        if "error" in found:
            raise CheckpointError(found["error"]) if self.comm.rank == 0 else DistributedError(
                f"rank 0 could not load a checkpoint: {found['error']}")
        loaded, self._version, initial = found["loaded"], found["next_version"], found["initial"]
        if loaded is None and self.comm.rank:
            self.trainer.load_checkpoint_state(initial)
        restored, audit_bytes = 0, 0
        if loaded is not None:
            restored, path, state = loaded
            meta = state.get("learner", {})
            by_rank = list(meta.get("audit_bytes_by_rank", [meta.get("audit_bytes", 0)]))
            if self.audit is not None:
                if len(by_rank) != self.comm.world_size:
                    raise DistributedError(f"checkpoint {path} was cut by {len(by_rank)} rank(s), this job has "
                                           f"{self.comm.world_size}: the per-rank audit logs cannot be matched")
                audit_bytes = int(by_rank[self.comm.rank])
            self.trainer.load_checkpoint_state(state)
            self.offsets = from_source_offsets(self.topic, self.trainer.source_offsets)
            self.stats.version = restored
            self.stats.last_checkpoint_s = float(meta.get("created_at_ms", 0)) / 1000
            self.stream.set_positions(self.offsets, unknown="earliest")
            logger.info("recover rank=%d version=%d path=%s step=%d samples=%d offsets=%s next_version=%d",
                        self.comm.rank, restored, path, self.trainer.step, self.trainer.samples_seen, self.offsets,
                        self._version)
        else:
            self.stream.set_positions({}, unknown="committed")
            logger.info("recover rank=%d version=0 (no checkpoint): group offsets or the beginning", self.comm.rank)
        if self.audit is not None:
            self.audit.open(audit_bytes)
        self._last_ckpt_step = self.trainer.step
        self._durable_version = restored
        return restored

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._last_ckpt_t = self.clock()
        self.stream.start()
        clean = False
        busy = False
        try:
            while True:
                timeout = self.dist_cfg.busy_poll_s if busy else self.dist_cfg.idle_poll_s
                item = self.stream.get(timeout_s=timeout)
                barrier = item if isinstance(item, RebalanceBarrier) else None
                batch = item if isinstance(item, StreamBatch) else None
                now = self.clock()
                time_due = (self.comm.rank == 0 and bool(self.cfg.checkpoint_every_s)
                            and now - self._last_ckpt_t >= self.cfg.checkpoint_every_s)
                header, n_total = self._step(batch, stop.is_set(), barrier is not None, time_due)
                busy = n_total > 0
                self._commit_durable(int(header[0, 6]))
                if header[:, 3].any():
                    if self._dirty:
                        self.checkpoint("rebalance", wait=True)
                    else:
                        self._sync_durable()
                    if barrier is not None:
                        barrier.reply(self.offsets)
                else:
                    every = self.cfg.checkpoint_every_steps
                    if every and self.trainer.step - self._last_ckpt_step >= every:
                        self.checkpoint("steps")
                    elif self._dirty and header[0, 4]:
                        self.checkpoint("time")
                if now - self._last_tick >= self.cfg.progress_every_s:
                    self._tick(now)
                if header[:, 2].any() or (self.cfg.max_samples and self.trainer.samples_seen >= self.cfg.max_samples):
                    break
            if self._dirty:
                self.checkpoint("final", wait=True)
            else:
                self._sync_durable()
            clean = True
        finally:
            if not clean and self._writing is not None:
                try:
                    self.wait_for_writes()
                except Exception:
                    logger.exception("checkpoint write failed while stopping")
            self._writer.shutdown(wait=True)
            self.stream.close(final_offsets=self.offsets if clean else None)
            self._tick(self.clock())
            if self.progress is not None:
                self.progress.close()
            if self.audit is not None:
                self.audit.close()
            logger.info("learner stopped rank=%d clean=%s step=%d samples=%d local_samples=%d version=%d",
                        self.comm.rank, clean, self.trainer.step, self.trainer.samples_seen, self.n_local_samples,
                        self.stats.version)

    def _step(self, item: StreamBatch | None, stop: bool, barrier: bool, time_due: bool) -> tuple[torch.Tensor, int]:
        """One collective step (module docstring, 1-4). -> (header (world, 7), samples in the step)."""
        comm, t = self.comm, self.trainer
        n_local = item.batch.batch_size if item is not None else 0
        parts = sorted(item.next_offsets.items()) if item is not None else []
        durable = self._durable_version if comm.rank == 0 else 0
        header = comm.gather_ctrl(torch.tensor([n_local, item.n_rejected if item else 0, stop, barrier, time_due,
                                                len(parts), durable], dtype=torch.int64))  # (world, 7)
        counts = header[:, 0].tolist()
        n_total = sum(counts)
        n_parts = int(header[:, 5].max())
        if n_parts:
            mine = torch.full((n_parts, 2), -1, dtype=torch.int64)                  # (P, 2) partition, offset
            if parts:
                mine[:len(parts)] = torch.tensor(parts, dtype=torch.int64)
            for p, o in comm.gather_ctrl(mine).reshape(-1, 2).tolist():           # rank order
                if p >= 0:
                    self.offsets[int(p)] = int(o)
        if n_total:
            self._train_step(item, n_local, counts, n_total)
        t.n_rejected += int(header[:, 1].sum())
        if n_total or n_parts:
            t.source_offsets = to_source_offsets(self.topic, self.offsets)
            self._dirty = True
        return header, n_total

    def _train_step(self, item: StreamBatch | None, n_local: int, counts: list[int], n_total: int) -> None:
        comm, t = self.comm, self.trainer
        first = sum(counts[:comm.rank])
        index_bufs = _stream_index_buffers(t.objective)
        starts = [int(b) for b in index_bufs]
        served = torch.empty(0, device=t.device)
        labels = torch.empty(0, 2, device=t.device)
        users = torch.empty(0, dtype=torch.int64, device=t.device)
        loss = 0.0
        if n_local:
            batch = item.batch
            batch = batch.to(t.device, non_blocking=True) if batch.device != t.device else batch
            self._note_freshness(int(self.clock() * 1000) - item.timestamps_ms)     # (B,)
            for b, s in zip(index_bufs, starts):   # this rank's samples sit at [first, first + n) of the step
                b.fill_(s + first)
            served, loss_t = t.forward_backward(batch)                               # (B,), ()
            loss = float(loss_t)
            labels = torch.stack([batch.clicked.float(), batch.valid_read.float()], -1)  # (B, 2)
            users = batch.user_id
            self.n_local_samples += n_local
            self.local_partitions.update(item.partitions.tolist())
            if self.audit is not None:
                self.audit.append(item.partitions, item.offsets, item.batch.sample_id.cpu().numpy())
        else:
            t.optimizer.zero_grad(set_to_none=True)
        for b, s in zip(index_bufs, starts):
            b.fill_(s + n_total)
        mean_loss = self.reducer.reduce(comm, n_local, n_total, loss)
        t.optimizer.step()
        for i, memory in enumerate(self.writes.memories):
            merge_memory_writes(comm, memory, pack_writes(memory, self.writes.take(i), n_local), counts)
        n_max = max(counts)
        rows = torch.zeros(n_max, 3, device=t.device)                                # (n_max, 3) score, clicked, vr
        rows[:n_local, 0] = served.float()
        rows[:n_local, 1:] = labels
        ids = torch.zeros(n_max, dtype=torch.int64, device=t.device)                 # (n_max,)
        ids[:n_local] = users
        all_rows = torch.cat([r[:c] for r, c in zip(comm.gather_data(rows), counts)])  # (N, 3)
        all_ids = torch.cat([u[:c] for u, c in zip(comm.gather_data(ids), counts)])    # (N,)
        t.record(all_rows[:, 0], all_rows[:, 1], all_rows[:, 2], all_ids, mean_loss)

    # ---- checkpoints -----------------------------------------------------------------------

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"world_size": self.comm.world_size, "audit_bytes_by_rank": list(self._audit_by_rank)}

    def checkpoint(self, reason: str, wait: bool = False) -> int:
        """Collective: every rank syncs its audit log and checks that its state digest matches rank
        0's; rank 0 cuts and writes the checkpoint; with ``wait`` every rank returns only once it is
        durable. Every rank then commits its own partitions (now or when rank 0 reports durable)."""
        audit_bytes = self.audit.sync() if self.audit is not None else 0
        digest = int(state_digest(self.trainer.model)[:15], 16)
        gathered = self.comm.gather_ctrl(torch.tensor([audit_bytes, digest], dtype=torch.int64))  # (world, 2)
        if len(set(gathered[:, 1].tolist())) != 1:
            raise DistributedError(f"ranks diverged at step {self.trainer.step}: "
                                   f"state digests {gathered[:, 1].tolist()}")
        self._audit_by_rank = gathered[:, 0].tolist()
        offsets = dict(self.offsets)
        if self.comm.rank == 0:
            version = super().checkpoint(reason, wait=wait)
        else:
            version = self._version
            self._version += 1
            self._dirty = False
            self._last_ckpt_step = self.trainer.step
            self._last_ckpt_t = self.clock()
            self.stream.set_positions(offsets)
            self._commit_after[version] = offsets
        if wait:
            self._sync_durable()
        return version

    def _sync_durable(self) -> None:
        """Rank 0 finishes its write; every rank learns it is durable and commits what it may."""
        if self.comm.rank == 0:
            self.wait_for_writes()
        durable = self.comm.broadcast_int(self._durable_version)
        self._commit_durable(durable)

    def _write(self, version: int, *args) -> None:
        super()._write(version, *args)
        self._durable_version = version

    def _commit_durable(self, durable_version: int) -> None:
        if self.comm.rank == 0:
            return                                  # rank 0 commits on its writer thread
        self.stats.version = max(self.stats.version, durable_version)
        done = [v for v in self._commit_after if v <= durable_version]
        if done:
            self.stream.request_commit(self._commit_after[max(done)])
            for v in done:
                del self._commit_after[v]

    def digest(self) -> dict[str, Any]:
        """This rank's view, for comparing ranks: state hashes, counts, partitions it trained."""
        t = self.trainer
        opt = ((f"{i}.{k}", v) for i, st in t.optimizer.state_dict()["state"].items()
               for k, v in st.items() if isinstance(v, torch.Tensor))
        return {"rank": self.comm.rank, "world_size": self.comm.world_size, "samples_seen": t.samples_seen,
                "steps": t.step, "local_samples": self.n_local_samples,
                "local_partitions": {str(p): n for p, n in sorted(self.local_partitions.items())},
                "model_sha256": state_digest(t.model), "memory_sha256": state_digest(t.model, only="memory"),
                "optimizer_sha256": tensors_digest(opt),
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())}, "version": self.stats.version,
                "config": dataclasses.asdict(self.dist_cfg), "time_s": time.time()}


__all__ = ["Comm", "DistConfig", "DistributedError", "DistributedLearner", "GradientReducer", "MemoryWrites",
           "apply_writes", "merge_memory_writes", "pack_writes", "state_digest"]
