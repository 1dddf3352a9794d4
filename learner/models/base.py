"""What every model returns: named head logits plus a model-internal auxiliary loss."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """``logits``: {head: (B,)} pre-sigmoid scores, "main" always present.
    ``aux_loss``: () scalar the model adds to any objective (DUMN's triplet L2; 0 otherwise).
    ``aux_parts``: named () scalars that make up ``aux_loss``, for logging.
    """

    logits: dict[str, torch.Tensor]
    aux_loss: torch.Tensor
    aux_parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def main(self) -> torch.Tensor:
        return self.logits["main"]                                                  # (B,)


def no_aux(like: torch.Tensor) -> torch.Tensor:
    """A () zero on the device and dtype of ``like``."""
    return like.new_zeros(())
