"""Frozen model and objective configs, validated in ``__post_init__``.

Defaults follow the papers where they give a value (DUMN section 4.1.3: T = 100, E = 16, controller
FFN 512, m = 256, Z = 64; CLSD eq. 4: alpha = 1.0). Values the papers leave open are marked
"unspecified" in docs/models.md together with the value chosen here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HEAD_NAMES = ("main", "weighted")
OBJECTIVE_TERMS = ("bce", "clsd", "valid_read", "ndt_weighted")
LABEL_FIELDS = ("clicked", "valid_read")
LOCAL_FIELDS = ("user_group", "user_id", "item_category", "item_id")


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name}={value!r} must be > 0")


def require_positive(obj: object, *names: str) -> None:
    """Raise ValueError naming the first of ``obj``'s fields ``names`` that is not > 0.

    >>> from types import SimpleNamespace
    >>> require_positive(SimpleNamespace(a=1, b=0), "a", "b")
    Traceback (most recent call last):
    ...
    ValueError: b=0 must be > 0
    """
    for name in names:
        _positive(name, getattr(obj, name))


def require_non_negative(obj: object, *names: str) -> None:
    """Raise ValueError naming the first of ``obj``'s fields ``names`` that is < 0."""
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name}={getattr(obj, name)!r} must be >= 0")


def _dims(name: str, dims: tuple[int, ...]) -> None:
    if not isinstance(dims, tuple) or any((not isinstance(d, int)) or d <= 0 for d in dims):
        raise ValueError(f"{name}={dims!r} must be a tuple of positive ints")


def _heads(heads: tuple[str, ...]) -> None:
    if not heads or len(set(heads)) != len(heads) or any(h not in HEAD_NAMES for h in heads):
        raise ValueError(f"heads={heads!r} must be distinct names from {HEAD_NAMES}")
    if heads[0] != "main":
        raise ValueError(f"heads={heads!r} must start with 'main'")


@dataclass(frozen=True)
class EmbeddingConfig:
    """Hashed id embeddings shared by all models (see learner/models/embedding.py).

    Ids are unbounded 64-bit integers; each family is hashed into its own table of ``*_buckets``
    rows. ``n_hashes`` > 1 sums that many independently hashed rows per id (fewer full collisions).
    ``n_user_profile`` / ``n_item_profile`` are the widths of ``SampleBatch.user_profile`` /
    ``item_profile``.
    """

    dim: int = 16
    item_buckets: int = 1 << 18
    category_buckets: int = 1 << 12
    user_buckets: int = 1 << 18
    profile_buckets: int = 1 << 12
    n_hashes: int = 1
    n_user_profile: int = 1
    n_item_profile: int = 1

    def __post_init__(self) -> None:
        require_positive(self, "dim", "item_buckets", "category_buckets", "user_buckets", "profile_buckets",
                         "n_hashes")
        require_non_negative(self, "n_user_profile", "n_item_profile")

    @property
    def user_width(self) -> int:
        """Width of e_user: user_id, user_group and the user profile fields, E each."""
        return self.dim * (2 + self.n_user_profile)

    @property
    def item_width(self) -> int:
        """Width of e_item: item_id, item_category and the item profile fields, E each."""
        return self.dim * (2 + self.n_item_profile)


@dataclass(frozen=True)
class DUMNConfig:
    """DUMN (Bian et al., RecSys '21). Every component can be switched off for ablations."""

    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    n_heads: int = 2                    # H of eq. 1 (unspecified in the paper)
    attention_scale: str = "seq_len"    # eq. 1 divides by sqrt(T); "head_dim" divides by sqrt(E/H)
    n_slots: int = 256                  # m
    slot_dim: int = 64                  # Z
    controller_dim: int = 512           # FFN of eq. 8
    mlp_dims: tuple[int, ...] = (200, 80)  # FFN of eq. 15 (unspecified)
    heads: tuple[str, ...] = ("main",)
    use_fp: bool = True                 # False: DUMN-FP, no orthogonal mapping (eq. 6-7)
    use_umn: bool = True                # False: DUMN-UMN, no memory, no triplet loss
    n_memories: int = 4                 # 1: DUMN+UMN1, one memory shared by the four feedbacks
    use_triplet: bool = True            # False: DUMN-TL
    fusion: str = "pair"                # "pair" (eq. 13) or "concat" (DUMN_CONCAT)
    triplet_margin: float = 0.2         # eq. 17 margin (unspecified)
    key_strength: bool = False          # NTM key strength beta in eq. 9 (absent in the paper)
    memory_init_std: float = 0.1
    write_chunk: int = 64               # samples per chunk of the write scan

    def __post_init__(self) -> None:
        require_positive(self, "n_heads", "n_slots", "slot_dim", "controller_dim", "write_chunk")
        if self.embedding.dim % self.n_heads:
            raise ValueError(f"embedding.dim={self.embedding.dim} not divisible by n_heads={self.n_heads}")
        if self.attention_scale not in ("seq_len", "head_dim"):
            raise ValueError(f"attention_scale={self.attention_scale!r} must be 'seq_len' or 'head_dim'")
        if self.n_memories not in (1, 4):
            raise ValueError(f"n_memories={self.n_memories!r} must be 1 or 4")
        if self.fusion not in ("pair", "concat"):
            raise ValueError(f"fusion={self.fusion!r} must be 'pair' or 'concat'")
        if self.triplet_margin < 0:
            raise ValueError(f"triplet_margin={self.triplet_margin!r} must be >= 0")
        _positive("memory_init_std", self.memory_init_std)
        _dims("mlp_dims", self.mlp_dims)
        _heads(self.heads)


@dataclass(frozen=True)
class WideDeepConfig:
    """Wide & Deep (Cheng et al. 2016): hashed linear wide part + MLP over field embeddings."""

    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    mlp_dims: tuple[int, ...] = (200, 80)
    heads: tuple[str, ...] = ("main",)
    cross_buckets: int = 1 << 18        # wide cross feature user_id x item_category

    def __post_init__(self) -> None:
        _dims("mlp_dims", self.mlp_dims)
        _heads(self.heads)
        _positive("cross_buckets", self.cross_buckets)


@dataclass(frozen=True)
class DeepFMConfig:
    """DeepFM (Guo et al. 2017): first-order + FM second-order + MLP over the same field embeddings."""

    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    mlp_dims: tuple[int, ...] = (200, 80)
    heads: tuple[str, ...] = ("main",)

    def __post_init__(self) -> None:
        _dims("mlp_dims", self.mlp_dims)
        _heads(self.heads)


@dataclass(frozen=True)
class DCNConfig:
    """Deep & Cross (Wang et al. 2017): cross network x_{l+1} = x0 x_l^T w_l + b_l + x_l beside an MLP."""

    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    n_cross_layers: int = 3
    mlp_dims: tuple[int, ...] = (200, 80)
    heads: tuple[str, ...] = ("main",)

    def __post_init__(self) -> None:
        _positive("n_cross_layers", self.n_cross_layers)
        _dims("mlp_dims", self.mlp_dims)
        _heads(self.heads)


@dataclass(frozen=True)
class DINConfig:
    """DIN (Zhou et al. 2018): target attention over the click sequence, unnormalised weights."""

    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    attention_dims: tuple[int, ...] = (80, 40)
    mlp_dims: tuple[int, ...] = (200, 80)
    heads: tuple[str, ...] = ("main",)

    def __post_init__(self) -> None:
        _dims("attention_dims", self.attention_dims)
        _dims("mlp_dims", self.mlp_dims)
        _heads(self.heads)


@dataclass(frozen=True)
class CLSDConfig:
    """CLSD (Liu et al.): global self-distillation (eq. 2) + local AdGate (eq. 3) -> eq. 4.

    ``warmup_samples``: the first samples are trained with L_ori (the paper warms up for about a
    third of training; set it to about a third of the expected stream). ``local_combine`` chooses
    the numerically safe reading of log(p + p_local): ``"logit_sum"`` uses sigmoid(z + z_local),
    ``"clamped_sum"`` clamps p + p_local into [eps, 1 - eps]. ``local_fields`` name the x_local
    columns fed to AdGate: a (B,) id field of SampleBatch, or ``"user_profile.<k>"`` for column k of
    the user profile (e.g. the age group, the paper's choice).
    """

    alpha: float = 1.0
    warmup_samples: int = 500_000
    use_local: bool = True
    local_fields: tuple[str, ...] = ("user_group",)
    local_buckets: int = 64
    local_dim: int = 8
    local_hidden: tuple[int, ...] = (16,)
    local_combine: str = "logit_sum"
    eps: float = 1e-6
    head: str = "main"
    label: str = "clicked"

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha!r} must be >= 0")
        if self.warmup_samples < 0:
            raise ValueError(f"warmup_samples={self.warmup_samples!r} must be >= 0")
        if not self.local_fields:
            raise ValueError("local_fields must name at least one SampleBatch field")
        for spec in self.local_fields:
            name, _, col = spec.partition(".")
            ok = name in LOCAL_FIELDS if not col else (name in ("user_profile", "item_profile") and col.isdigit())
            if not ok:
                raise ValueError(f"local_fields entry {spec!r}: use one of {LOCAL_FIELDS} or 'user_profile.<k>'")
        _positive("local_buckets", self.local_buckets)
        _positive("local_dim", self.local_dim)
        _dims("local_hidden", self.local_hidden)
        if self.local_combine not in ("logit_sum", "clamped_sum"):
            raise ValueError(f"local_combine={self.local_combine!r} must be 'logit_sum' or 'clamped_sum'")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"eps={self.eps!r} must be in (0, 0.5)")
        if self.head not in HEAD_NAMES:
            raise ValueError(f"head={self.head!r} must be one of {HEAD_NAMES}")
        if self.label not in LABEL_FIELDS:
            raise ValueError(f"label={self.label!r} must be one of {LABEL_FIELDS}")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which loss terms to sum. ``("bce",)`` is L_ori; ``("valid_read", "ndt_weighted")`` is the
    dwell-time paper's MTL (needs model heads ("main", "weighted")); ``("clsd", "ndt_weighted")``
    with ``clsd.label = "valid_read"`` is MTL + CLSD. The model's auxiliary loss (DUMN's triplet
    L2) is added when ``include_model_aux``."""

    terms: tuple[str, ...] = ("bce",)
    clsd: CLSDConfig = field(default_factory=CLSDConfig)
    include_model_aux: bool = True

    def __post_init__(self) -> None:
        if not self.terms or len(set(self.terms)) != len(self.terms):
            raise ValueError(f"terms={self.terms!r} must be distinct and non-empty")
        bad = [t for t in self.terms if t not in OBJECTIVE_TERMS]
        if bad:
            raise ValueError(f"terms {bad!r} unknown; choose from {OBJECTIVE_TERMS}")
        main_terms = [t for t in self.terms if t in ("bce", "clsd", "valid_read")]
        if len(main_terms) > 1:
            raise ValueError(f"terms={self.terms!r}: 'bce', 'clsd' and 'valid_read' all train the main head; pick one")
