"""Tiny model configs for the learner tests (the machine is shared: one thread, small tensors)."""
from __future__ import annotations

import pytest
import torch

from learner.config import DCNConfig, DeepFMConfig, DINConfig, DUMNConfig, EmbeddingConfig, WideDeepConfig

torch.set_num_threads(1)

TINY_EMBEDDING = EmbeddingConfig(dim=8, item_buckets=512, category_buckets=64, user_buckets=256,
                                 profile_buckets=64)
TINY_DUMN = dict(embedding=TINY_EMBEDDING, n_slots=8, slot_dim=8, controller_dim=16, mlp_dims=(16,),
                 write_chunk=5)


def tiny_config(name: str, heads: tuple[str, ...] = ("main",), **overrides):
    """The registry model ``name`` at test size."""
    if name.startswith("dumn"):
        return DUMNConfig(**{**TINY_DUMN, "heads": heads, **overrides})
    cls = {"wide_deep": WideDeepConfig, "deepfm": DeepFMConfig, "dcn": DCNConfig, "din": DINConfig}[name]
    kw = dict(embedding=TINY_EMBEDDING, mlp_dims=(16,), heads=heads)
    if name == "wide_deep":
        kw["cross_buckets"] = 512
    if name == "din":
        kw["attention_dims"] = (8,)
    return cls(**{**kw, **overrides})


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
