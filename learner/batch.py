"""In-memory tensor minibatch the models and objectives consume.

The wire format of samples belongs to the stream joiner; whatever decodes it builds a
:class:`SampleBatch`. B is the batch size, T the (padded) behaviour-sequence length, F_u / F_i the
number of extra user / item profile fields. Sequences hold the most recent entries first or last,
the models do not care; padding positions have ``*_mask == False`` and any id.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from learner import BatchError

SEQUENCE_KINDS = ("click", "unclick", "like", "dislike")


@dataclass
class SampleBatch:
    """One minibatch of labeled impressions, in stream order (row b happened before row b + 1).

    ids are int64 and unbounded (hashed by the models); labels are float32 in {0, 1};
    ``ndt_weight`` is the normalized dwell time T_N of a valid read (dwell-time paper eq. 1),
    ignored for negatives.
    """

    user_id: torch.Tensor          # (B,) int64
    item_id: torch.Tensor          # (B,) int64
    item_category: torch.Tensor    # (B,) int64
    user_group: torch.Tensor       # (B,) int64, e.g. activeness code (CLSD x_local)
    user_profile: torch.Tensor     # (B, F_u) int64, e.g. age group
    item_profile: torch.Tensor     # (B, F_i) int64, e.g. duration bucket
    click_items: torch.Tensor      # (B, T) int64
    click_cats: torch.Tensor       # (B, T) int64
    click_mask: torch.Tensor       # (B, T) bool, True = real entry
    unclick_items: torch.Tensor    # (B, T)
    unclick_cats: torch.Tensor     # (B, T)
    unclick_mask: torch.Tensor     # (B, T)
    like_items: torch.Tensor       # (B, T)
    like_cats: torch.Tensor        # (B, T)
    like_mask: torch.Tensor        # (B, T)
    dislike_items: torch.Tensor    # (B, T)
    dislike_cats: torch.Tensor     # (B, T)
    dislike_mask: torch.Tensor     # (B, T)
    clicked: torch.Tensor          # (B,) float32
    valid_read: torch.Tensor       # (B,) float32
    ndt_weight: torch.Tensor       # (B,) float32
    sample_id: torch.Tensor        # (B,) int64

    @property
    def batch_size(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.click_items.shape[1])

    @property
    def device(self) -> torch.device:
        return self.user_id.device

    def sequence(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items, cats, mask) of one behaviour sequence, each (B, T)."""
        if kind not in SEQUENCE_KINDS:
            raise BatchError(f"sequence kind {kind!r} not in {SEQUENCE_KINDS}")
        return getattr(self, f"{kind}_items"), getattr(self, f"{kind}_cats"), getattr(self, f"{kind}_mask")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SampleBatch":
        """A copy on ``device``; with ``non_blocking`` and pinned host memory the copies overlap compute."""
        return SampleBatch(**{k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def pin_memory(self) -> "SampleBatch":
        """A copy in page-locked host memory (needs a CUDA build; a no-op copy otherwise)."""
        if not torch.cuda.is_available():
            return SampleBatch(**{k: v.clone() for k, v in self.tensors().items()})
        return SampleBatch(**{k: v.pin_memory() for k, v in self.tensors().items()})

    def select(self, index: torch.Tensor | slice) -> "SampleBatch":
        """Rows ``index`` of every tensor, in the given order."""
        return SampleBatch(**{k: v[index] for k, v in self.tensors().items()})

    def validate(self) -> None:
        """Raise BatchError when shapes, dtypes or devices disagree."""
        b, t = self.batch_size, self.seq_len
        for name, v in self.tensors().items():
            if v.shape[0] != b:
                raise BatchError(f"{name} has {v.shape[0]} rows, user_id has {b}")
            if v.device != self.device:
                raise BatchError(f"{name} is on {v.device}, user_id on {self.device}")
        for name in ("user_id", "item_id", "item_category", "user_group", "sample_id"):
            v = getattr(self, name)
            if v.dim() != 1 or v.dtype != torch.int64:
                raise BatchError(f"{name} must be (B,) int64, got {tuple(v.shape)} {v.dtype}")
        for name in ("user_profile", "item_profile"):
            v = getattr(self, name)
            if v.dim() != 2 or v.dtype != torch.int64:
                raise BatchError(f"{name} must be (B, F) int64, got {tuple(v.shape)} {v.dtype}")
        for kind in SEQUENCE_KINDS:
            items, cats, mask = self.sequence(kind)
            for name, v, dt in ((f"{kind}_items", items, torch.int64), (f"{kind}_cats", cats, torch.int64),
                                (f"{kind}_mask", mask, torch.bool)):
                if tuple(v.shape) != (b, t) or v.dtype != dt:
                    raise BatchError(f"{name} must be ({b}, {t}) {dt}, got {tuple(v.shape)} {v.dtype}")
        for name in ("clicked", "valid_read", "ndt_weight"):
            v = getattr(self, name)
            if v.dim() != 1 or not v.is_floating_point():
                raise BatchError(f"{name} must be (B,) float, got {tuple(v.shape)} {v.dtype}")
