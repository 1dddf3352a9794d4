"""Wide & Deep (Cheng et al. 2016) behind the common model interface, pure torch.

Parts: ``FeatureEmbeddings`` -> field stack (B, F, E); ``wide``: hashed per-id weights of every
categorical column plus the cross feature user_id x item_category -> (B, n_heads); ``Towers`` (the
deep part) over the flattened fields -> (B,) per head. logit_h = wide_h + deep_h.
"""
from __future__ import annotations

from torch import nn

from learner.batch import SampleBatch
from learner.config import WideDeepConfig
from learner.models.base import ModelOutput, no_aux
from learner.models.embedding import FeatureEmbeddings, HashedEmbedding, Towers, field_stack, n_fields, sparse_ids


class WideDeep(nn.Module):
    """forward(batch, write_memory=None) -> ModelOutput; ``write_memory`` is accepted and ignored."""

    def __init__(self, cfg: WideDeepConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.heads
        self.embed = FeatureEmbeddings(cfg.embedding)
        self.wide = HashedEmbedding(cfg.cross_buckets, len(cfg.heads), cfg.embedding.n_hashes, init_std=0.0)
        self.deep = Towers(n_fields(cfg.embedding) * cfg.embedding.dim, cfg.mlp_dims, cfg.heads)

    def forward(self, batch: SampleBatch, write_memory: bool | None = None) -> ModelOutput:
        x = field_stack(self.embed, batch).flatten(1)                       # (B, F E)
        cross = batch.user_id * 1_000_003 + batch.item_category             # (B,)
        wide = self.wide(cross, field=999)                                  # (B, n_heads)
        for ids, field in sparse_ids(batch):
            wide = wide + self.wide(ids, field=field)                       # (B, n_heads)
        deep = self.deep(x)                                                 # {head: (B,)}
        logits = {h: deep[h] + wide[:, i] for i, h in enumerate(self.heads)}
        return ModelOutput(logits=logits, aux_loss=no_aux(x))
