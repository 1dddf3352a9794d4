"""DUMN: Denoising User-aware Memory Network (Bian et al., RecSys '21), pure torch.

Parts, in the order the data flows (equation numbers are the paper's):

* ``FeatureEmbeddings`` (3.2): e_user (B, Du), e_item (B, Di), four sequences (B, T, E).
* ``SequenceEncoder`` (eq. 1-2): multi-head self-attention per feedback sequence -> O (B, T, E).
* ``TargetAttentionPool`` (eq. 3-5): target-aware pooling -> f (B, E).
* ``orthogonal_map`` (eq. 6-7): f_c^o = f_c - proj(f_c, f_d), f_u^o = f_u - proj(f_u, f_l).
* ``UserMemory`` (eq. 8-12, learner/models/dumn_memory.py): long-term reads r (B, 4, Z).
* ``PairGate`` (eq. 13-14): R_cross (B, 4 (E + Z)).
* ``Towers`` (eq. 15): logits per head (B,).
* ``TripletLoss`` (eq. 17-20): L2, returned as the model's ``aux_loss``; L = L1 + L2 is formed by
  the objective (learner/objectives.py), which adds ``aux_loss`` to L1.

Interpretations of the paper are listed in docs/models.md and next to the code they affect.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from learner.batch import SEQUENCE_KINDS, SampleBatch
from learner.config import DUMNConfig
from learner.models.base import ModelOutput, no_aux
from learner.models.dumn_memory import N_KINDS, UserMemory
from learner.models.embedding import FeatureEmbeddings, Towers, hash_ids, trim_padding


class SequenceEncoder(nn.Module):
    """Eq. 1-2. Head h projects its own slice e_h (B, T, E/H) with W^Q_h, W^K_h, W^V_h (E/H x E/H);
    scores are divided by sqrt(T) as printed (``attention_scale="head_dim"`` uses sqrt(E/H));
    Concat(heads) W^F. Padded keys are masked; an empty sequence attends to position 0 only (its
    output is discarded by the pooling). forward(x (B, T, E), mask (B, T)) -> O (B, T, E).
    """

    def __init__(self, dim: int, n_heads: int, attention_scale: str):
        super().__init__()
        self.n_heads, self.head_dim, self.attention_scale = n_heads, dim // n_heads, attention_scale
        d = self.head_dim
        self.wq = nn.Parameter(torch.randn(n_heads, d, d) / math.sqrt(d))   # (H, d, d)
        self.wk = nn.Parameter(torch.randn(n_heads, d, d) / math.sqrt(d))   # (H, d, d)
        self.wv = nn.Parameter(torch.randn(n_heads, d, d) / math.sqrt(d))   # (H, d, d)
        self.wf = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        xh = x.view(b, t, self.n_heads, self.head_dim)                      # (B, T, H, d)
        q = torch.einsum("bthd,hde->bhte", xh, self.wq)                     # (B, H, T, d)
        k = torch.einsum("bthd,hde->bhte", xh, self.wk)                     # (B, H, T, d)
        v = torch.einsum("bthd,hde->bhte", xh, self.wv)                     # (B, H, T, d)
        empty = ~mask.any(1, keepdim=True)                                  # (B, 1)
        first = torch.arange(t, device=x.device).unsqueeze(0) == 0          # (1, T)
        keys = (mask | (empty & first))[:, None, None, :]                   # (B, 1, 1, T)
        scale = 1.0 / math.sqrt(t if self.attention_scale == "seq_len" else self.head_dim)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=scale)  # (B, H, T, d)
        return self.wf(heads.transpose(1, 2).reshape(b, t, e))             # (B, T, E)


def encode_all(encoders: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor,
               scale_len: int | None = None) -> torch.Tensor:
    """The K :class:`SequenceEncoder` s applied to their own sequences in ONE attention call (their
    weights stacked): equal to ``stack([encoders[k](x[k], mask[k]) for k])``. ``scale_len`` is the
    T of eq. 1's sqrt(T) when x holds only the first positions of longer padded sequences.

    x (K, B, T, E), mask (K, B, T) -> O (K, B, T, E).
    """
    enc0 = encoders[0]
    n_k, b, t, e = x.shape
    h, d = enc0.n_heads, enc0.head_dim
    w = torch.stack([torch.cat([m.wq, m.wk, m.wv], -1) for m in encoders])  # (K, H, d, 3d)
    xh = x.view(n_k, b, t, h, d)                                            # (K, B, T, H, d)
    qkv = torch.einsum("kbthd,khde->kbhte", xh, w)                          # (K, B, H, T, 3d)
    q, k, v = qkv.reshape(n_k * b, h, t, 3 * d).split(d, dim=-1)           # (K B, H, T, d) each
    flat = mask.reshape(n_k * b, t)                                         # (K B, T)
    empty = ~flat.any(1, keepdim=True)                                      # (K B, 1)
    first = torch.arange(t, device=x.device).unsqueeze(0) == 0              # (1, T)
    keys = (flat | (empty & first))[:, None, None, :]                       # (K B, 1, 1, T)
    scale = 1.0 / math.sqrt((scale_len or t) if enc0.attention_scale == "seq_len" else d)
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=scale)  # (K B, H, T, d)
    heads = heads.view(n_k, b, h, t, d).transpose(2, 3).reshape(n_k, b, t, e)     # (K, B, T, E)
    wf = torch.stack([m.wf.weight for m in encoders])                       # (K, E_out, E_in)
    return torch.einsum("kbte,kfe->kbtf", heads, wf)                        # (K, B, T, E)


class TargetAttentionPool(nn.Module):
    """Eq. 3-5: alpha_j = ReLU(Concat(e_user, e_item, o_j) W_c), softmax over real positions,
    f = sum_j alpha~_j o_j. W_c is applied as [W_ctx; W_o] so the (B, T, Du + Di + E) concat is
    never materialised (same value). An empty sequence pools to f = 0.
    forward(e_user (B, Du), e_item (B, Di), o (B, T, E), mask (B, T)) -> f (B, E).
    """

    def __init__(self, user_dim: int, item_dim: int, dim: int):
        super().__init__()
        self.w_ctx = nn.Linear(user_dim + item_dim, 1)
        self.w_o = nn.Linear(dim, 1, bias=False)

    def forward(self, e_user: torch.Tensor, e_item: torch.Tensor, o: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        ctx = self.w_ctx(torch.cat([e_user, e_item], -1))                  # (B, 1)
        # element-wise products, not (B T, E) x (E, 1) matmuls: their backward is far cheaper
        alpha = F.relu(ctx + (o * self.w_o.weight[0].to(o.dtype)).sum(-1))  # (B, T)
        alpha = alpha.masked_fill(~mask, -1e30)                             # (B, T)
        weights = F.softmax(alpha.float(), dim=-1).to(o.dtype) * mask.to(o.dtype)  # (B, T)
        return (weights.unsqueeze(-1) * o).sum(1)                           # (B, E)


def orthogonal_map(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Eq. 6-7: a - project(a, b), project(a, b) = (a . b / |b|^2) b. a, b (B, E) -> (B, E).

    ``eps`` keeps b = 0 (an empty explicit-feedback sequence) well defined: nothing is removed.
    """
    coef = (a * b).sum(-1, keepdim=True) / ((b * b).sum(-1, keepdim=True) + eps)  # (B, 1)
    return a - coef * b                                                            # (B, E)


class PairGate(nn.Module):
    """Eq. 13-14: U_k = Concat(f_k * sigmoid(f_k W1_k), r_k * sigmoid(r_k W2_k)), R = Concat_k U_k.

    W1_k is E x E and W2_k is Z x Z (each gate matches its own vector). ``mode="concat"`` is the
    DUMN_CONCAT ablation (U_k = Concat(f_k, r_k)); without memory (r None) only the f half is kept.
    forward(short (B, 4, E), long (B, 4, Z) or None) -> R (B, 4 (E + Z)) or (B, 4 E).
    """

    def __init__(self, short_dim: int, long_dim: int | None, mode: str):
        super().__init__()
        self.mode = mode
        self.w1 = nn.Parameter(torch.randn(N_KINDS, short_dim, short_dim) / math.sqrt(short_dim))  # (4, E, E)
        self.w2 = (nn.Parameter(torch.randn(N_KINDS, long_dim, long_dim) / math.sqrt(long_dim))
                   if long_dim else None)                                   # (4, Z, Z)

    def out_dim(self, short_dim: int, long_dim: int | None) -> int:
        return N_KINDS * (short_dim + (long_dim or 0))

    def forward(self, short: torch.Tensor, long: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "concat":
            parts = [short] if long is None else [short, long]
            return torch.cat(parts, -1).flatten(1)                          # (B, 4 (E + Z))
        gs = short * torch.sigmoid(torch.einsum("bke,kef->bkf", short, self.w1))   # (B, 4, E)
        if long is None:
            return gs.flatten(1)                                            # (B, 4 E)
        gl = long * torch.sigmoid(torch.einsum("bkz,kzy->bky", long, self.w2))     # (B, 4, Z)
        return torch.cat([gs, gl], -1).flatten(1)                           # (B, 4 (E + Z))


# triplet pairs of eq. 17: memory kind -> (positive sequence, negative sequence)
TRIPLET_PAIRS = ((0, 1), (1, 0), (2, 3), (3, 2))   # <c,u>, <u,c>, <l,d>, <d,l>


def sample_entries(e_seq: torch.Tensor, mask: torch.Tensor, sample_id: torch.Tensor,
                   salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One real entry per row, chosen by a hash of (sample_id, salt) so replays repeat the choice.

    e_seq (B, T, E), mask (B, T) -> (s (B, E), has_entry (B,) bool).
    """
    n = mask.sum(1)                                                         # (B,)
    pick = torch.remainder(hash_ids(sample_id, 1 << 30, salt=salt), n.clamp(min=1))  # (B,)
    rank = mask.long().cumsum(1) - 1                                        # (B, T)
    hit = mask & (rank == pick.unsqueeze(1))                                # (B, T)
    idx = hit.long().argmax(1)                                              # (B,)
    s = e_seq[torch.arange(e_seq.shape[0], device=e_seq.device), idx]       # (B, E)
    return s, n > 0


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 19 for all pairs: a (N, Z), b (P, Z) -> 1 - cos (N, P)."""
    an = a / (a.norm(dim=-1, keepdim=True) + eps)                          # (N, Z)
    bn = b / (b.norm(dim=-1, keepdim=True) + eps)                          # (P, Z)
    return 1 - an @ bn.T                                                    # (N, P)


def hardest(a: torch.Tensor, b: torch.Tensor, farthest: bool, eps: float = 1e-8) -> torch.Tensor:
    """Per row of a, the cosine distance to its farthest (or nearest) row of b:
    ``cosine_distance(a, b).max(1).values`` (``.min`` when not ``farthest``) with the same value
    and gradient (at exact ties the gradient may go to another of the tied rows). The (N, P)
    similarity matrix is only searched, without grad; the chosen pairs are then
    recomputed with grad, so the backward is O(N Z) instead of O(N P Z) and needs no (N, P)
    buffers. a (N, Z), b (P, Z) -> (N,)."""
    an = a / (a.norm(dim=-1, keepdim=True) + eps)                          # (N, Z)
    with torch.no_grad():   # farthest = least similar; 1 - cos is not formed for the (N, P) search
        sim = an @ (b / (b.norm(dim=-1, keepdim=True) + eps)).T            # (N, P)
        idx = (sim.min(1) if farthest else sim.max(1)).indices             # (N,)
    bn = b[idx] / (b[idx].norm(dim=-1, keepdim=True) + eps)                # (N, Z)
    return 1 - (an * bn).sum(-1)                                           # (N,)


class TripletLoss(nn.Module):
    """Eq. 17-20 with the hardest in-batch samples (section 4.3.4).

    For memory kind k every sample b is an anchor q_{b,k} (eq. 18). The candidate positives are one
    entry sampled from each row's positive sequence across the whole minibatch (the negatives
    likewise), embedded by the embedding layer and mapped E -> Z by a learned linear projection
    (the paper compares E-dim s with Z-dim q without saying how). Hardest positive: the farthest;
    hardest negative: the nearest. L_k = mean_b max(d(q, s+) - d(q, s-) + margin, 0); L2 = sum_k L_k.
    forward(q (B, 4, Z), seqs [(e (B, T, E), mask (B, T))] * 4, sample_id (B,)) -> (L2 (), parts).
    """

    def __init__(self, dim: int, slot_dim: int, margin: float):
        super().__init__()
        self.margin = margin
        self.proj = nn.Linear(dim, slot_dim, bias=False)

    def forward(self, q: torch.Tensor, seqs: list[tuple[torch.Tensor, torch.Tensor]],
                sample_id: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sampled = []
        for k, (e, mask) in enumerate(seqs):
            s, ok = sample_entries(e, mask, sample_id, salt=7000 + k)       # (B, E), (B,)
            sampled.append(self.proj(s[ok]))                                # (P_k, Z)
        total = q.new_zeros(())
        parts = {}
        for k, (pos, neg) in enumerate(TRIPLET_PAIRS):
            sp, sn = sampled[pos], sampled[neg]
            if sp.shape[0] == 0 or sn.shape[0] == 0:
                parts[f"triplet_{SEQUENCE_KINDS[k]}"] = q.new_zeros(())
                continue
            d_pos = hardest(q[:, k], sp, farthest=True)                     # (B,)
            d_neg = hardest(q[:, k], sn, farthest=False)                    # (B,)
            lk = F.relu(d_pos - d_neg + self.margin).mean()                 # ()
            parts[f"triplet_{SEQUENCE_KINDS[k]}"] = lk
            total = total + lk
        return total, parts


class DUMN(nn.Module):
    """DUMN wired from its parts. forward(batch, write_memory=None) -> ModelOutput.

    ``write_memory=None`` writes the memory when the module is in training mode; pass False for a
    no-grad teacher or prediction pass in training mode and True to write in eval mode.
    """

    def __init__(self, cfg: DUMNConfig):
        super().__init__()
        self.cfg = cfg
        ec = cfg.embedding
        e, du, di = ec.dim, ec.user_width, ec.item_width
        self.embed = FeatureEmbeddings(ec)
        self.encoders = nn.ModuleList(SequenceEncoder(e, cfg.n_heads, cfg.attention_scale) for _ in range(N_KINDS))
        self.pools = nn.ModuleList(TargetAttentionPool(du, di, e) for _ in range(N_KINDS))
        z = cfg.slot_dim if cfg.use_umn else None
        self.memory = (UserMemory(e + du, cfg.n_slots, cfg.slot_dim, cfg.controller_dim, cfg.n_memories,
                                  cfg.key_strength, cfg.memory_init_std, cfg.write_chunk)
                       if cfg.use_umn else None)
        self.triplet = TripletLoss(e, cfg.slot_dim, cfg.triplet_margin) if cfg.use_umn and cfg.use_triplet else None
        self.fusion = PairGate(e, z, cfg.fusion)
        self.towers = Towers(du + di + self.fusion.out_dim(e, z), cfg.mlp_dims, cfg.heads)

    def forward(self, batch: SampleBatch, write_memory: bool | None = None) -> ModelOutput:
        write = self.training if write_memory is None else write_memory
        t_full = batch.seq_len
        user_f, item_f, e_seq, mask = self.embed.all_fields(trim_padding(batch))  # one lookup per table
        e_user, e_item = user_f.flatten(1), item_f.flatten(1)               # (B, Du), (B, Di)
        # unbind, not [k]: its backward stacks the four gradients instead of zero-filling four (4, B, T, E)
        masks = mask.unbind(0)                                              # (B, T) x4
        seqs = list(zip(e_seq.unbind(0), masks))                            # [(B, T, E), (B, T)] x4
        o_all = encode_all(self.encoders, e_seq, mask, t_full).unbind(0)    # (B, T', E) x4
        f = [self.pools[k](e_user, e_item, o_all[k], masks[k]) for k in range(N_KINDS)]  # (B, E) each
        f_c, f_u, f_l, f_d = f
        if self.cfg.use_fp:
            f_c = orthogonal_map(f_c, f_d)                                  # (B, E)
            f_u = orthogonal_map(f_u, f_l)                                  # (B, E)
        short = torch.stack([f_c, f_u, f_l, f_d], 1)                        # (B, 4, E)
        long, aux, parts = None, no_aux(e_user), {}
        if self.memory is not None:
            long, q = self.memory(short, e_user, write=write)               # (B, 4, Z) each
            if self.triplet is not None:
                aux, parts = self.triplet(q, seqs, batch.sample_id)
        r_cross = self.fusion(short, long)                                  # (B, 4 (E + Z))
        logits = self.towers(torch.cat([e_user, e_item, r_cross], -1))      # {head: (B,)}
        return ModelOutput(logits=logits, aux_loss=aux, aux_parts=parts)
