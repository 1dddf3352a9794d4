"""Model registry: every model maps a SampleBatch to a ModelOutput with the same interface.

>>> from learner.config import DINConfig, EmbeddingConfig
>>> model = build_model("din", DINConfig(embedding=EmbeddingConfig(dim=4, item_buckets=64,
...     user_buckets=64, category_buckets=16, profile_buckets=16), mlp_dims=(8,), attention_dims=(8,)))
>>> sorted(MODEL_CONFIGS)
['dcn', 'deepfm', 'din', 'dumn', 'wide_deep']
"""
from __future__ import annotations

from typing import Any

from torch import nn

from learner import UnknownModelError
from learner.config import DCNConfig, DeepFMConfig, DINConfig, DUMNConfig, WideDeepConfig
from learner.models.base import ModelOutput
from learner.models.dcn import DCN
from learner.models.deepfm import DeepFM
from learner.models.din import DIN
from learner.models.dumn import DUMN
from learner.models.wide_deep import WideDeep

MODEL_CONFIGS: dict[str, type] = {
    "dumn": DUMNConfig, "wide_deep": WideDeepConfig, "deepfm": DeepFMConfig, "dcn": DCNConfig, "din": DINConfig,
}
_MODELS: dict[str, type[nn.Module]] = {
    "dumn": DUMN, "wide_deep": WideDeep, "deepfm": DeepFM, "dcn": DCN, "din": DIN,
}


def build_model(name: str, config: Any | None = None) -> nn.Module:
    """The model registered as ``name``, built from ``config`` (its config class's defaults when None)."""
    if name not in _MODELS:
        raise UnknownModelError(f"model {name!r} unknown; registered: {sorted(_MODELS)}")
    cfg = MODEL_CONFIGS[name]() if config is None else config
    if not isinstance(cfg, MODEL_CONFIGS[name]):
        raise ValueError(f"model {name!r} needs a {MODEL_CONFIGS[name].__name__}, got {type(cfg).__name__}")
    return _MODELS[name](cfg)


__all__ = ["MODEL_CONFIGS", "ModelOutput", "build_model"]
