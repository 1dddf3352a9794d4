"""Deep & Cross Network (Wang et al. 2017) behind the common model interface, pure torch.

Parts: ``FeatureEmbeddings`` -> x0 (B, D) flattened fields; ``CrossNet``: x_{l+1} = x0 (x_l . w_l)
+ b_l + x_l -> (B, D); deep MLP -> (B, H_last); ``Towers`` (a linear layer per head) over
Concat(cross, deep) -> (B,) per head.
"""
from __future__ import annotations

import torch
from torch import nn

from learner.batch import SampleBatch
from learner.config import DCNConfig
from learner.models.base import ModelOutput, no_aux
from learner.models.embedding import FeatureEmbeddings, Towers, field_stack, mlp, n_fields


class CrossNet(nn.Module):
    """forward(x0 (B, D)) -> x_L (B, D) after ``n_layers`` cross layers."""

    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_layers, dim) / dim ** 0.5)     # (L, D)
        self.b = nn.Parameter(torch.zeros(n_layers, dim))                  # (L, D)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0                                                              # (B, D)
        for l in range(self.w.shape[0]):
            x = x0 * (x @ self.w[l]).unsqueeze(-1) + self.b[l] + x          # (B, D)
        return x


class DCN(nn.Module):
    """forward(batch, write_memory=None) -> ModelOutput; ``write_memory`` is accepted and ignored."""

    def __init__(self, cfg: DCNConfig):
        super().__init__()
        self.cfg = cfg
        d = n_fields(cfg.embedding) * cfg.embedding.dim
        self.embed = FeatureEmbeddings(cfg.embedding)
        self.cross = CrossNet(d, cfg.n_cross_layers)
        self.deep = mlp(d, cfg.mlp_dims)
        self.towers = Towers(d + cfg.mlp_dims[-1], (), cfg.heads)

    def forward(self, batch: SampleBatch, write_memory: bool | None = None) -> ModelOutput:
        x0 = field_stack(self.embed, batch).flatten(1)                      # (B, D)
        h = torch.cat([self.cross(x0), self.deep(x0)], -1)                  # (B, D + H_last)
        return ModelOutput(logits=self.towers(h), aux_loss=no_aux(x0))
