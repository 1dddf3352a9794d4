"""DeepFM (Guo et al. 2017) behind the common model interface, pure torch.

Parts: ``FeatureEmbeddings`` -> field stack V (B, F, E); ``first``: hashed first-order weights of the
categorical columns -> (B, n_heads); FM second order 0.5 sum_e ((sum_f v)^2 - sum_f v^2) -> (B,),
shared by the heads; ``Towers`` (deep part) over the flattened V -> (B,) per head.
"""
from __future__ import annotations

from torch import nn

from learner.batch import SampleBatch
from learner.config import DeepFMConfig
from learner.models.base import ModelOutput, no_aux
from learner.models.embedding import FeatureEmbeddings, HashedEmbedding, Towers, field_stack, n_fields, sparse_ids


class DeepFM(nn.Module):
    """forward(batch, write_memory=None) -> ModelOutput; ``write_memory`` is accepted and ignored."""

    def __init__(self, cfg: DeepFMConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.heads
        self.embed = FeatureEmbeddings(cfg.embedding)
        self.first = HashedEmbedding(cfg.embedding.item_buckets, len(cfg.heads), cfg.embedding.n_hashes, init_std=0.0)
        self.deep = Towers(n_fields(cfg.embedding) * cfg.embedding.dim, cfg.mlp_dims, cfg.heads)

    def forward(self, batch: SampleBatch, write_memory: bool | None = None) -> ModelOutput:
        v = field_stack(self.embed, batch)                                  # (B, F, E)
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(-1)             # (B,)
        first = None
        for ids, field in sparse_ids(batch):
            w = self.first(ids, field=field)                                # (B, n_heads)
            first = w if first is None else first + w
        deep = self.deep(v.flatten(1))                                      # {head: (B,)}
        logits = {h: deep[h] + first[:, i] + fm for i, h in enumerate(self.heads)}
        return ModelOutput(logits=logits, aux_loss=no_aux(v))
