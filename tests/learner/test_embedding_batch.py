"""Hashed embeddings (unbounded ids, measured collisions), SampleBatch plumbing, synthetic batches."""
from __future__ import annotations

import dataclasses
import doctest
import importlib

import pytest
import torch

from learner import BatchError
from learner.config import EmbeddingConfig
from learner.models.embedding import FeatureEmbeddings, HashedEmbedding, collision_rate, hash_ids
from learner.synthetic import SyntheticSpec, synthetic_batch


def test_hash_range_determinism_and_salt():
    ids = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345])
    h = hash_ids(ids, 1000, salt=0)
    assert ((h >= 0) & (h < 1000)).all()
    assert torch.equal(h, hash_ids(ids.clone(), 1000, salt=0))
    assert not torch.equal(h, hash_ids(ids, 1000, salt=1))


@pytest.mark.parametrize("n_ids,n_buckets,n_hashes", [(2000, 1 << 12, 1), (5000, 1 << 16, 1), (3000, 1 << 8, 2)])
def test_collision_rate_matches_uniform_hashing(n_ids, n_buckets, n_hashes):
    r = collision_rate(n_ids, n_buckets, n_hashes=n_hashes)
    assert r["n_ids"] == n_ids
    assert abs(r["measured"] - r["expected"]) < 0.03 + 0.15 * r["expected"]


def test_unseen_ids_embed_without_growth():
    emb = HashedEmbedding(64, 4, n_hashes=2)
    n = sum(p.numel() for p in emb.parameters())
    out = emb(torch.tensor([[5, 10**17], [-3, 2**62]]))
    assert out.shape == (2, 2, 4) and torch.isfinite(out).all()
    assert sum(p.numel() for p in emb.parameters()) == n


def test_feature_embeddings_shapes_and_masking():
    cfg = EmbeddingConfig(dim=4, item_buckets=128, user_buckets=128, category_buckets=16, profile_buckets=16)
    emb = FeatureEmbeddings(cfg)
    b = synthetic_batch(5, 7, seed=0)
    assert emb.user(b).shape == (5, cfg.user_width) and emb.item(b).shape == (5, cfg.item_width)
    e, mask = emb.sequence(b, "click")
    assert e.shape == (5, 7, 4)
    assert torch.equal(e[~mask], torch.zeros_like(e[~mask]))
    bad = dataclasses.replace(b, user_profile=torch.zeros(5, 3, dtype=torch.int64))
    with pytest.raises(BatchError):
        emb.user(bad)


def test_batch_to_pin_select_validate():
    b = synthetic_batch(6, 4, seed=1)
    b.validate()
    assert b.batch_size == 6 and b.seq_len == 4
    moved = b.to("cpu", non_blocking=True)
    pinned = b.pin_memory()
    for k, v in b.tensors().items():
        assert torch.equal(moved.tensors()[k], v) and torch.equal(pinned.tensors()[k], v)
    sub = b.select(torch.tensor([4, 1]))
    assert torch.equal(sub.sample_id, b.sample_id[[4, 1]])
    with pytest.raises(BatchError, match="rows"):
        dataclasses.replace(b, clicked=torch.zeros(5)).validate()
    with pytest.raises(BatchError, match="like_mask"):
        dataclasses.replace(b, like_mask=b.like_mask.long()).validate()
    with pytest.raises(BatchError):
        b.sequence("share")


def test_synthetic_is_seeded_and_realistic():
    a, b = synthetic_batch(256, 20, seed=3), synthetic_batch(256, 20, seed=3)
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k])
    c = synthetic_batch(256, 20, seed=4)
    assert not torch.equal(a.item_id, c.item_id)
    assert 0.1 < a.clicked.mean() < 0.6
    assert torch.all(a.valid_read <= a.clicked)
    assert torch.all((a.ndt_weight > 0) == (a.valid_read > 0))
    assert a.click_mask.sum(1).max() <= 20 and (a.click_mask.sum(1) < 20).any()
    shifted = synthetic_batch(8, 5, seed=3, spec=SyntheticSpec(id_offset=10**12))
    assert (shifted.item_id >= 10**12).all()


@pytest.mark.parametrize("module", ["learner.synthetic", "learner.metrics", "learner.objectives",
                                    "learner.models", "learner.models.embedding"])
def test_docstring_examples(module):
    res = doctest.testmod(importlib.import_module(module))
    assert res.failed == 0 and res.attempted > 0
