"""Deep Interest Network (Zhou et al. 2018) behind the common model interface, pure torch.

Parts: ``FeatureEmbeddings`` -> e_user (B, Du), e_item (B, Di), click sequence (B, T, E) and the
target in the same space t = item + category embedding (B, E); ``ActivationUnit``: weight_j =
MLP(Concat(t, k_j, t - k_j, t * k_j)), not softmax-normalised (as in DIN), masked; pooled interest
sum_j weight_j k_j (B, E); ``Towers`` over Concat(e_user, e_item, interest) -> (B,) per head.
"""
from __future__ import annotations

import torch
from torch import nn

from learner.batch import SampleBatch
from learner.config import DINConfig
from learner.models.base import ModelOutput, no_aux
from learner.models.embedding import FeatureEmbeddings, Towers, mlp


class ActivationUnit(nn.Module):
    """forward(t (B, E), keys (B, T, E), mask (B, T)) -> interest (B, E)."""

    def __init__(self, dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(4 * dim, hidden, 1)

    def forward(self, t: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = t.unsqueeze(1).expand_as(keys)                                  # (B, T, E)
        w = self.net(torch.cat([q, keys, q - keys, q * keys], -1)).squeeze(-1)  # (B, T)
        w = w * mask.to(w.dtype)                                            # (B, T)
        return torch.einsum("bt,bte->be", w, keys)                          # (B, E)


class DIN(nn.Module):
    """forward(batch, write_memory=None) -> ModelOutput; ``write_memory`` is accepted and ignored."""

    def __init__(self, cfg: DINConfig):
        super().__init__()
        self.cfg = cfg
        ec = cfg.embedding
        self.embed = FeatureEmbeddings(ec)
        self.attention = ActivationUnit(ec.dim, cfg.attention_dims)
        self.towers = Towers(ec.user_width + ec.item_width + ec.dim, cfg.mlp_dims, cfg.heads)

    def forward(self, batch: SampleBatch, write_memory: bool | None = None) -> ModelOutput:
        e_user = self.embed.user(batch)                                     # (B, Du)
        e_item = self.embed.item(batch)                                     # (B, Di)
        target = self.embed.items(batch.item_id) + self.embed.categories(batch.item_category)  # (B, E)
        keys, mask = self.embed.sequence(batch, "click")                    # (B, T, E), (B, T)
        interest = self.attention(target, keys, mask)                       # (B, E)
        logits = self.towers(torch.cat([e_user, e_item, interest], -1))     # {head: (B,)}
        return ModelOutput(logits=logits, aux_loss=no_aux(e_user))
