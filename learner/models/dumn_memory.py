"""DUMN user memory network (section 3.4, eq. 8-12 and the triplet anchor of eq. 18).

Four memories M_c, M_u, M_l, M_d of m slots x Z dims (or one memory shared by the four feedback
kinds, the DUMN+UMN1 ablation) are model state: a buffer saved in ``state_dict`` and never part of
the autograd graph across minibatches.

Minibatch semantics (see docs/models.md, "Memory in a stream"):

* Reads (eq. 9-11) and write addressing (w^w, eq. 9 with the write key) of every sample in a
  minibatch use M_0, the memory as it stood at the start of the minibatch. A read therefore never
  sees a write of the same minibatch, its own included (predict-then-train safe).
* Writes (eq. 12) compose in stream order exactly: M_b = M_{b-1} * (1 - w_b e_b^T) + w_b a_b^T for
  b = 1..B. On CPU they run as an in-place loop over the samples (:func:`loop_writes`); on other
  devices each step, an element-wise affine map, is composed by a chunked scan (:func:`scan_writes`).
  Both equal the per-sample reference :func:`sequential_writes`.
* With one shared memory the four writes of sample b are applied in the order click, unclick,
  like, dislike, before the writes of sample b + 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_KINDS = 4  # click, unclick, like, dislike


def cosine_address(keys: torch.Tensor, memory: torch.Tensor, beta: torch.Tensor | None = None,
                   eps: float = 1e-8) -> torch.Tensor:
    """Eq. 9-10: softmax over slots of the cosine between each key and each slot.

    keys (B, K, Z), memory (K, m, Z), beta (B, K) or None -> weights (B, K, m).
    """
    kn = keys / (keys.norm(dim=-1, keepdim=True) + eps)                    # (B, K, Z)
    mn = memory / (memory.norm(dim=-1, keepdim=True) + eps)                # (K, m, Z)
    sim = torch.einsum("bkz,kmz->bkm", kn, mn)                             # (B, K, m)
    if beta is not None:
        sim = sim * beta.unsqueeze(-1)                                     # (B, K, m)
    return F.softmax(sim, dim=-1)                                          # (B, K, m)


def sequential_writes(memory: torch.Tensor, w: torch.Tensor, erase: torch.Tensor,
                      add: torch.Tensor) -> torch.Tensor:
    """Reference: eq. 12 applied one write at a time.

    memory (m, Z), w (N, m), erase (N, Z), add (N, Z) -> memory after the N writes (m, Z).
    """
    m = memory.clone()                                                     # (m, Z)
    for n in range(w.shape[0]):
        m = m * (1 - torch.outer(w[n], erase[n])) + torch.outer(w[n], add[n])  # (m, Z)
    return m


def scan_writes(memory: torch.Tensor, w: torch.Tensor, erase: torch.Tensor, add: torch.Tensor,
                chunk: int = 64) -> torch.Tensor:
    """Eq. 12 for N ordered writes as a chunked scan; equal to :func:`sequential_writes`.

    Write n is the element-wise affine map M -> M * g_n + h_n with g_n = 1 - w_n e_n^T and
    h_n = w_n a_n^T. Over a chunk of C writes the composition is
    M_C = M_0 * prod_n g_n + sum_n h_n * prod_{n' > n} g_{n'}; the suffix products come from a
    reversed cumulative product. memory (m, Z), w (N, m), erase (N, Z), add (N, Z) -> (m, Z).
    """
    out = memory
    for s in range(0, w.shape[0], chunk):
        wc, ec, ac = w[s:s + chunk], erase[s:s + chunk], add[s:s + chunk]
        g = 1 - wc.unsqueeze(-1) * ec.unsqueeze(1)                         # (C, m, Z)
        h = wc.unsqueeze(-1) * ac.unsqueeze(1)                             # (C, m, Z)
        rev = torch.flip(g, [0]).cumprod(0)                                # (C, m, Z) rev[i] = g_{C-1-i}..g_{C-1}
        suffix = torch.cat([torch.flip(rev[:-1], [0]), torch.ones_like(g[:1])], 0)  # (C, m, Z) prod_{n'>n} g
        out = out * rev[-1] + (h * suffix).sum(0)                          # (m, Z)
    return out


@torch.no_grad()
def loop_writes(memory: torch.Tensor, w: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """Eq. 12 for N ordered writes to K memories at once, in place; equal to
    :func:`sequential_writes` per memory. memory (K, m, Z), w (N, K, m), erase (N, K, Z),
    add (N, K, Z) -> memory (K, m, Z), modified in place.

    Three in-place element-wise kernels per write on a memory small enough to stay in cache beat
    the scan's large (C, m, Z) temporaries on a CPU by about ten times.
    """
    we = torch.empty_like(memory)                                          # (K, m, Z) scratch
    for n in range(w.shape[0]):
        wn = w[n].unsqueeze(-1)                                            # (K, m, 1)
        torch.mul(wn, erase[n].unsqueeze(1), out=we)                       # (K, m, Z) w e^T
        memory.addcmul_(memory, we, value=-1)                              # M * (1 - w e^T)
        memory.addcmul_(wn, add[n].unsqueeze(1))                           # + w a^T
    return memory


class UserMemory(nn.Module):
    """UMN: controllers (eq. 8), cosine read (eq. 9-11), ordered erase/add writes (eq. 12).

    forward(short (B, 4, E), e_user (B, Du), write) -> (r (B, 4, Z) reads of eq. 11,
    q (B, 4, Z) triplet anchors of eq. 18). One controller FFN per feedback kind maps
    Concat(f^o_k, e_user) to a read key, a write key, an erase vector (sigmoid) and an add vector
    (tanh), plus NTM key strengths when ``key_strength``.
    """

    def __init__(self, in_dim: int, n_slots: int, slot_dim: int, controller_dim: int,
                 n_memories: int = 4, key_strength: bool = False, init_std: float = 0.1,
                 write_chunk: int = 64):
        super().__init__()
        self.slot_dim, self.key_strength, self.write_chunk = slot_dim, key_strength, write_chunk
        self.kind_to_memory = list(range(N_KINDS)) if n_memories == N_KINDS else [0] * N_KINDS
        n_out = 4 * slot_dim + (2 if key_strength else 0)
        self.controllers = nn.ModuleList(
            nn.Sequential(nn.Linear(in_dim, controller_dim), nn.ReLU(), nn.Linear(controller_dim, n_out))
            for _ in range(N_KINDS))
        self.register_buffer("memory", torch.randn(n_memories, n_slots, slot_dim) * init_std)  # (n_mem, m, Z)
        # where a training forward's writes go: None applies them (apply_writes); a callable
        # (w, erase, add) receives them instead (the distributed learner applies every rank's later)
        self.write_sink = None

    def controller(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 4, Du + E) -> read_key, write_key, erase, add (B, 4, Z) and betas (B, 4) or None."""
        out = torch.stack([c(x[:, k]) for k, c in enumerate(self.controllers)], 1)  # (B, 4, n_out)
        z = self.slot_dim
        res = {"read_key": out[..., :z], "write_key": out[..., z:2 * z],
               "erase": torch.sigmoid(out[..., 2 * z:3 * z]), "add": torch.tanh(out[..., 3 * z:4 * z]),
               "read_beta": None, "write_beta": None}                     # (B, 4, Z) each
        if self.key_strength:
            res["read_beta"] = 1 + F.softplus(out[..., 4 * z])            # (B, 4)
            res["write_beta"] = 1 + F.softplus(out[..., 4 * z + 1])       # (B, 4)
        return res

    def forward(self, short: torch.Tensor, e_user: torch.Tensor,
                write: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b = short.shape[0]
        x = torch.cat([short, e_user.unsqueeze(1).expand(b, N_KINDS, e_user.shape[-1])], -1)  # (B, 4, E+Du)
        c = self.controller(x)
        m0 = self.memory.detach().clone()[self.kind_to_memory]            # (4, m, Z) minibatch-start memory
        m0 = m0.to(c["read_key"].dtype)
        w_r = cosine_address(c["read_key"], m0, c["read_beta"])           # (B, 4, m)
        r = torch.einsum("bkm,kmz->bkz", w_r, m0)                         # (B, 4, Z) eq. 11
        w_w = cosine_address(c["write_key"], m0, c["write_beta"])         # (B, 4, m)
        # eq. 18 anchor: the write-weighted read of M_0 after this sample's own write
        w2 = w_w * w_w                                                    # (B, 4, m)
        q = (torch.einsum("bkm,kmz->bkz", w_w, m0)
             - torch.einsum("bkm,kmz->bkz", w2, m0) * c["erase"]
             + w2.sum(-1, keepdim=True) * c["add"])                       # (B, 4, Z)
        if write:
            (self.write_sink or self.apply_writes)(w_w.detach(), c["erase"].detach(), c["add"].detach())
        return r, q

    @torch.no_grad()
    def apply_writes(self, w: torch.Tensor, erase: torch.Tensor, add: torch.Tensor) -> None:
        """Apply the B x 4 writes (w (B, 4, m), erase/add (B, 4, Z)) in stream order.

        On CPU the writes run as an in-place loop over samples on a cache-resident (n_mem, m, Z)
        memory (:func:`loop_writes`, every memory advanced together); elsewhere as the chunked scan
        (:func:`scan_writes`), whose few large kernels suit a GPU. Both equal :func:`sequential_writes`.
        """
        dt = self.memory.dtype
        n_mem = self.memory.shape[0]
        if n_mem == N_KINDS:
            ws, es, as_ = w.to(dt), erase.to(dt), add.to(dt)                 # (B, 4, m), (B, 4, Z) x2
        else:   # one shared memory: sample b's kinds c, u, l, d in order, then sample b + 1
            ws = w.reshape(-1, 1, w.shape[-1]).to(dt)                          # (4B, 1, m)
            es = erase.reshape(-1, 1, erase.shape[-1]).to(dt)                  # (4B, 1, Z)
            as_ = add.reshape(-1, 1, add.shape[-1]).to(dt)                     # (4B, 1, Z)
        if self.memory.device.type == "cpu":
            self.memory.copy_(loop_writes(self.memory.clone(), ws, es, as_))
            return
        new = torch.stack([scan_writes(self.memory[k], ws[:, k], es[:, k], as_[:, k], self.write_chunk)
                           for k in range(n_mem)])                             # (n_mem, m, Z)
        self.memory.copy_(new)
