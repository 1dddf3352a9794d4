"""Hashed id embeddings for unbounded id spaces, shared by every model.

Ids are arbitrary int64 values. Each family (items, categories, users, profile fields) owns one
table of fixed size, allocated up front, so an id never seen before maps to an existing row and the
optimizer never has to be rebuilt mid-stream. The price is collisions: :func:`collision_rate`
measures it for a table size and id count.

>>> h = hash_ids(torch.tensor([0, 1, 2**62]), n_buckets=8, salt=3)
>>> bool(((h >= 0) & (h < 8)).all())
True
>>> rate = collision_rate(n_ids=1000, n_buckets=1 << 16)
>>> 0.0 < rate["measured"] < 0.05
True
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learner.batch import SampleBatch
from learner.config import EmbeddingConfig


def _i64(x: int) -> int:
    """A 64-bit unsigned constant as the signed int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def hash_ids(ids: torch.Tensor, n_buckets: int, salt: int = 0) -> torch.Tensor:
    """splitmix64-style mix of int64 ids (wrapping arithmetic) reduced to [0, n_buckets)."""
    offset = _i64(((salt + 1) * 0x9E3779B97F4A7C15) % (1 << 64))
    x = ids.to(torch.int64) + offset                                # same shape as ids
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    x = x ^ (x >> 31)
    return torch.remainder(x, n_buckets)


def collision_rate(n_ids: int, n_buckets: int, n_hashes: int = 1, seed: int = 0) -> dict[str, float]:
    """Fraction of ``n_ids`` distinct random ids whose row (all ``n_hashes`` rows) is shared with another id.

    ``expected`` is the analytic rate for uniform hashing, 1 - (1 - 1/n_buckets**n_hashes)**(n_ids - 1).
    """
    if n_ids <= 0 or n_buckets <= 0 or n_hashes <= 0:
        raise ValueError(f"n_ids={n_ids!r}, n_buckets={n_buckets!r}, n_hashes={n_hashes!r} must be > 0")
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(np.unique(rng.integers(-(1 << 62), 1 << 62, int(n_ids * 1.1) + 8))[:n_ids])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]
    codes = torch.zeros_like(ids)
    for k in range(n_hashes):
        codes = codes * n_buckets + hash_ids(ids, n_buckets, salt=k)   # exact while n_buckets**n_hashes < 2**63
    _, inverse, counts = torch.unique(codes, return_inverse=True, return_counts=True)
    measured = float((counts[inverse] > 1).double().mean())
    space = float(n_buckets) ** n_hashes
    expected = 1.0 - (1.0 - 1.0 / space) ** (ids.numel() - 1)
    return {"n_ids": float(ids.numel()), "n_buckets": float(n_buckets), "measured": measured, "expected": expected}


def trim_padding(batch: SampleBatch) -> SampleBatch:
    """The batch with its sequences cut after the last position that is real in any row of any
    kind (at least 1). Cut positions are padding everywhere, which every model masks out (DUMN:
    masked keys, discarded by the pooling, never sampled by the triplet loss; its eq. 1 keeps
    sqrt(T) of the full T), so no output changes. Short real-data histories make the sequence
    work this much cheaper."""
    from learner.batch import SEQUENCE_KINDS
    masks = [batch.sequence(kind)[2] for kind in SEQUENCE_KINDS]
    real = torch.stack([m.any(0) for m in masks]).any(0)                    # (T,)
    t_eff = max(1, int(real.nonzero().max()) + 1) if bool(real.any()) else 1
    if t_eff == batch.seq_len:
        return batch
    cut = {f"{kind}_{part}": getattr(batch, f"{kind}_{part}")[:, :t_eff]
           for kind in SEQUENCE_KINDS for part in ("items", "cats", "mask")}
    return SampleBatch(**{**batch.tensors(), **cut})



class HashedEmbedding(nn.Module):
    """Embedding of unbounded ids: sum of ``n_hashes`` rows picked by independent hashes.

    forward(ids (...,)) -> (..., E). ``field`` salts the hash so two fields sharing a table do not
    share rows for equal raw ids.
    """

    def __init__(self, n_buckets: int, dim: int, n_hashes: int = 1, init_std: float = 0.05):
        super().__init__()
        self.n_buckets, self.n_hashes = n_buckets, n_hashes
        self.weight = nn.Parameter(torch.randn(n_buckets, dim) * init_std)   # (N, E)

    def forward(self, ids: torch.Tensor, field: int = 0) -> torch.Tensor:
        return self.multi([(ids, field)])[0]                                    # (..., E)

    def multi(self, parts: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """``[forward(ids, field) for ids, field in parts]`` as ONE table lookup: the backward then
        builds one dense table-sized gradient instead of one per part (the same sum)."""
        rows = torch.cat([hash_ids(ids.reshape(-1), self.n_buckets, salt=field * 1_000_003 + k)
                          for k in range(self.n_hashes) for ids, field in parts])  # (n_hashes * N,)
        e = F.embedding(rows, self.weight)                                          # (n_hashes * N, E)
        if self.n_hashes > 1:
            e = e.view(self.n_hashes, -1, e.shape[-1]).sum(0)                      # (N, E)
        out = e.split([ids.numel() for ids, _ in parts])
        return [o.view(*ids.shape, o.shape[-1]) for o, (ids, _) in zip(out, parts)]  # (..., E) each


class FeatureEmbeddings(nn.Module):
    """Embedding layer shared by all models (DUMN section 3.2).

    user(batch)  -> e_user (B, E * (2 + F_u)): user_id, user_group, user_profile fields
    item(batch)  -> e_item (B, E * (2 + F_i)): item_id, item_category, item_profile fields
    sequence(batch, kind) -> (B, T, E): item embedding + category embedding per entry, zero where
    masked. Target items and sequence entries share the item and category tables.
    """

    def __init__(self, cfg: EmbeddingConfig):
        super().__init__()
        self.cfg = cfg
        self.items = HashedEmbedding(cfg.item_buckets, cfg.dim, cfg.n_hashes)
        self.categories = HashedEmbedding(cfg.category_buckets, cfg.dim, cfg.n_hashes)
        self.users = HashedEmbedding(cfg.user_buckets, cfg.dim, cfg.n_hashes)
        self.profile = HashedEmbedding(cfg.profile_buckets, cfg.dim, cfg.n_hashes)

    def _check_profile(self, t: torch.Tensor, n: int, name: str) -> None:
        if t.shape[1] != n:
            from learner import BatchError
            raise BatchError(f"{name} has {t.shape[1]} fields, the embedding config expects {n}")

    def user_fields(self, batch: SampleBatch) -> torch.Tensor:
        """(B, 2 + F_u, E) user field embeddings."""
        self._check_profile(batch.user_profile, self.cfg.n_user_profile, "user_profile")
        parts = [self.users(batch.user_id), self.profile(batch.user_group, field=1)]      # (B, E) each
        parts += [self.profile(batch.user_profile[:, k], field=10 + k) for k in range(self.cfg.n_user_profile)]
        return torch.stack(parts, dim=1)                                                   # (B, 2+F_u, E)

    def item_fields(self, batch: SampleBatch) -> torch.Tensor:
        """(B, 2 + F_i, E) item field embeddings."""
        self._check_profile(batch.item_profile, self.cfg.n_item_profile, "item_profile")
        parts = [self.items(batch.item_id), self.categories(batch.item_category)]          # (B, E) each
        parts += [self.profile(batch.item_profile[:, k], field=100 + k) for k in range(self.cfg.n_item_profile)]
        return torch.stack(parts, dim=1)                                                   # (B, 2+F_i, E)

    def user(self, batch: SampleBatch) -> torch.Tensor:
        return self.user_fields(batch).flatten(1)                                          # (B, E*(2+F_u))

    def item(self, batch: SampleBatch) -> torch.Tensor:
        return self.item_fields(batch).flatten(1)                                          # (B, E*(2+F_i))

    def sequence(self, batch: SampleBatch, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_seq (B, T, E), mask (B, T) bool)."""
        items, cats, mask = batch.sequence(kind)
        e = self.items(items) + self.categories(cats)                                      # (B, T, E)
        return e * mask.unsqueeze(-1).to(e.dtype), mask                                    # (B, T, E)

    def all_fields(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One lookup per table (target items and the four sequences together, which makes the
        backward cheaper): (user_fields(batch) (B, 2+F_u, E), item_fields(batch) (B, 2+F_i, E),
        e_seq (4, B, T, E), mask (4, B, T)) where ``e_seq[k], mask[k] == sequence(batch, kind k)``
        in the order click, unclick, like, dislike."""
        from learner.batch import SEQUENCE_KINDS
        cfg = self.cfg
        self._check_profile(batch.user_profile, cfg.n_user_profile, "user_profile")
        self._check_profile(batch.item_profile, cfg.n_item_profile, "item_profile")
        seqs = [batch.sequence(kind) for kind in SEQUENCE_KINDS]
        b, t = batch.batch_size, batch.seq_len
        seq_items = torch.stack([s[0] for s in seqs])                                      # (4, B, T)
        seq_cats = torch.stack([s[1] for s in seqs])                                       # (4, B, T)
        mask = torch.stack([s[2] for s in seqs])                                           # (4, B, T)
        item_t, item_s = self.items.multi([(batch.item_id, 0), (seq_items, 0)])           # (B, E), (4, B, T, E)
        cat_t, cat_s = self.categories.multi([(batch.item_category, 0), (seq_cats, 0)])   # (B, E), (4, B, T, E)
        prof = self.profile.multi([(batch.user_group, 1)]
                                  + [(batch.user_profile[:, k], 10 + k) for k in range(cfg.n_user_profile)]
                                  + [(batch.item_profile[:, k], 100 + k) for k in range(cfg.n_item_profile)])
        n_u = 1 + cfg.n_user_profile
        user = torch.stack([self.users(batch.user_id), *prof[:n_u]], dim=1)                # (B, 2+F_u, E)
        item = torch.stack([item_t, cat_t, *prof[n_u:]], dim=1)                            # (B, 2+F_i, E)
        e_seq = (item_s + cat_s) * mask.unsqueeze(-1).to(item_s.dtype)                     # (4, B, T, E)
        return user, item, e_seq.view(len(seqs), b, t, -1), mask

    def mean_pool(self, batch: SampleBatch, kind: str) -> torch.Tensor:
        """(B, E) masked mean of a sequence; zero for an empty sequence."""
        e, mask = self.sequence(batch, kind)                                               # (B, T, E)
        n = mask.sum(1, keepdim=True).clamp(min=1).to(e.dtype)                            # (B, 1)
        return e.sum(1) / n                                                                # (B, E)


def mlp(in_dim: int, dims: tuple[int, ...], out_dim: int | None = None) -> nn.Sequential:
    """Linear+ReLU stack; a final Linear to ``out_dim`` when given."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in dims:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class Towers(nn.Module):
    """One MLP tower per output head over a shared representation (shared-bottom MTL).

    forward(x (B, D)) -> {head: logits (B,)}.
    """

    def __init__(self, in_dim: int, dims: tuple[int, ...], heads: tuple[str, ...]):
        super().__init__()
        self.towers = nn.ModuleDict({h: mlp(in_dim, dims, 1) for h in heads})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {h: t(x).squeeze(-1) for h, t in self.towers.items()}                      # (B,) each


def sparse_ids(batch: SampleBatch) -> list[tuple[torch.Tensor, int]]:
    """(ids (B,), field salt) of every categorical column: the inputs of wide / first-order parts."""
    cols = [(batch.user_id, 0), (batch.user_group, 1), (batch.item_id, 2), (batch.item_category, 3)]
    cols += [(batch.user_profile[:, k], 10 + k) for k in range(batch.user_profile.shape[1])]
    cols += [(batch.item_profile[:, k], 100 + k) for k in range(batch.item_profile.shape[1])]
    return cols


def field_stack(embed: FeatureEmbeddings, batch: SampleBatch) -> torch.Tensor:
    """(B, F, E) field embeddings for the non-sequential baselines: user fields, item fields and the
    masked mean of each of the four behaviour sequences (F = 4 + F_u + F_i + 4)."""
    user, item, e_seq, mask = embed.all_fields(trim_padding(batch))                            # one lookup per table
    n = mask.sum(2, keepdim=True).clamp(min=1).to(e_seq.dtype)                                  # (4, B, 1)
    pooled = (e_seq.sum(2) / n).transpose(0, 1)                                                # (B, 4, E) masked means
    return torch.cat([user, item, pooled], 1)                                                  # (B, F, E)


def n_fields(cfg: EmbeddingConfig) -> int:
    return 2 + cfg.n_user_profile + 2 + cfg.n_item_profile + 4
