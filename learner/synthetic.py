"""Synthetic SampleBatches for tests and benchmarks only -- never training data.

Shapes and value ranges resemble the KuaiRand stream: Zipf-distributed item popularity, users with a
few preferred categories, behaviour sequences of random length <= T, a click rate near 0.3, valid
reads a subset of clicks, and a normalized-dwell-time weight computed with the dwell-time paper's
eq. 1 constants from a log-normal dwell. Clicks depend on user-category affinity so a model can learn.

>>> b = synthetic_batch(4, 6, seed=0)
>>> b.click_items.shape, b.clicked.dtype
(torch.Size([4, 6]), torch.float32)
>>> bool((synthetic_batch(4, 6, seed=0).item_id == b.item_id).all())
True
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from learner.batch import SEQUENCE_KINDS, SampleBatch
from learner.config import require_positive


@dataclass(frozen=True)
class SyntheticSpec:
    """Id-space sizes and rates of the synthetic stream."""

    n_users: int = 1000
    n_items: int = 5000
    n_categories: int = 50
    n_groups: int = 9
    n_user_profile: int = 1
    n_item_profile: int = 1
    id_offset: int = 0           # added to every user/item id: an offset past training gives unseen ids

    def __post_init__(self) -> None:
        require_positive(self, "n_users", "n_items", "n_categories", "n_groups")


def _synthetic_ndt(dwell_s: np.ndarray) -> np.ndarray:
    """Dwell-time paper eq. 1 with its published constants (offset 15, tau 20, A 2.319, B 0.744)."""
    return 2.319 / (1.0 + np.exp(-(dwell_s - 15.0) / 20.0)) - 0.744


def synthetic_batch(batch_size: int, seq_len: int, *, seed: int, spec: SyntheticSpec = SyntheticSpec(),
                    start_sample_id: int = 0) -> SampleBatch:
    """A reproducible synthetic batch; the same (seed, spec) gives the same tensors."""
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size={batch_size!r} and seq_len={seq_len!r} must be > 0")
    rng = np.random.default_rng(seed)
    B, T = batch_size, seq_len
    users = rng.integers(0, spec.n_users, B)                                   # (B,)
    item_cat = (np.arange(spec.n_items) * 7919) % spec.n_categories           # (n_items,)
    user_fav = (users[:, None] * 31 + np.arange(3)[None, :] * 17) % spec.n_categories  # (B, 3)

    def zipf_items(shape: tuple[int, ...]) -> np.ndarray:
        return (rng.zipf(1.3, size=shape) - 1) % spec.n_items

    items = zipf_items((B,))                                                   # (B,)
    cats = item_cat[items]                                                     # (B,)
    affinity = (cats[:, None] == user_fav).any(axis=1).astype(np.float64)     # (B,)
    p_click = 1.0 / (1.0 + np.exp(-(-1.6 + 2.2 * affinity)))                  # (B,)
    clicked = (rng.random(B) < p_click).astype(np.float32)                     # (B,)
    dwell_s = np.exp(rng.normal(3.4, 1.0, B))                                  # (B,)
    valid = clicked * (dwell_s > 15.0)                                         # (B,)
    ndt = np.where(valid > 0, _synthetic_ndt(dwell_s), 0.0).astype(np.float32)  # (B,)

    out: dict[str, torch.Tensor] = {}
    for kind, mean_len in zip(SEQUENCE_KINDS, (0.6, 0.9, 0.2, 0.1)):
        lengths = np.minimum(rng.poisson(mean_len * T, B), T)                  # (B,)
        seq = zipf_items((B, T))                                               # (B, T)
        if kind in ("click", "like"):   # positive feedback leans towards the user's categories
            fav_items = user_fav[:, rng.integers(0, 3, (T,))] + spec.n_categories * rng.integers(0, 20, (B, T))
            seq = np.where(rng.random((B, T)) < 0.5, fav_items % spec.n_items, seq)
        mask = np.arange(T)[None, :] < lengths[:, None]                       # (B, T)
        out[f"{kind}_items"] = torch.from_numpy((seq + spec.id_offset).astype(np.int64))
        out[f"{kind}_cats"] = torch.from_numpy(item_cat[seq].astype(np.int64))
        out[f"{kind}_mask"] = torch.from_numpy(mask)
    return SampleBatch(
        user_id=torch.from_numpy((users + spec.id_offset).astype(np.int64)),
        item_id=torch.from_numpy((items + spec.id_offset).astype(np.int64)),
        item_category=torch.from_numpy(cats.astype(np.int64)),
        user_group=torch.from_numpy((users % spec.n_groups).astype(np.int64)),
        user_profile=torch.from_numpy(((users[:, None] * (3 + np.arange(spec.n_user_profile))) % 8).astype(np.int64)),
        item_profile=torch.from_numpy(rng.integers(0, 10, (B, spec.n_item_profile)).astype(np.int64)),
        clicked=torch.from_numpy(clicked),
        valid_read=torch.from_numpy(valid.astype(np.float32)),
        ndt_weight=torch.from_numpy(ndt),
        sample_id=torch.arange(start_sample_id, start_sample_id + B, dtype=torch.int64),
        **out,
    )
