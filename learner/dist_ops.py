"""What the ranks exchange each step: DUMN memory writes (captured, gathered, applied in rank
order), the gradient reduction that equals the mean loss over the union of the ranks' samples,
and the state digests that compare ranks (docs/learner.md, "Several learner processes").
"""
from __future__ import annotations

import functools
import hashlib

import torch

from learner.dist_comm import Comm
from learner.models.dumn_memory import N_KINDS, UserMemory

class MemoryWrites:
    """Captures the DUMN memory writes of a local training forward instead of applying them.

    Each :class:`UserMemory` of ``model`` gets a ``write_sink`` that stores its
    (w (B, 4, m), erase (B, 4, Z), add (B, 4, Z)); :func:`merge_memory_writes` later applies every
    rank's writes with the memory's ``apply_writes``. Reads inside the forward still see the memory as
    it stood at the start of the step (the model copies it before addressing).
    """

    def __init__(self, model: torch.nn.Module):
        self.memories = [m for m in model.modules() if isinstance(m, UserMemory)]
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self.memories)
        for i, um in enumerate(self.memories):
            um.write_sink = functools.partial(self._capture, i)

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
        memory.apply_writes(rows[..., :m], rows[..., m:m + z], rows[..., m + z:])


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


def stream_index_buffers(objective: torch.nn.Module) -> list[torch.Tensor]:
    """Objective buffers that count samples (CLSD's ``n_seen`` for its warm-up)."""
    return [b for name, b in objective.named_buffers() if name.endswith("n_seen")]


__all__ = ["GradientReducer", "MemoryWrites", "apply_writes", "merge_memory_writes", "pack_writes", "state_digest",
           "stream_index_buffers", "tensors_digest", "write_width"]
