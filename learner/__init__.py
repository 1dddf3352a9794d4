"""Continuous learner: models, objectives, prequential training, checkpoints.

Every error raised on purpose by this package derives from :class:`LearnerError`; configuration
values that cannot be used raise ``ValueError`` from the config dataclasses' ``__post_init__``.
"""
from __future__ import annotations


class LearnerError(Exception):
    """Root of the learner's own errors."""


class BatchError(LearnerError):
    """A SampleBatch has missing fields, wrong dtypes or inconsistent shapes."""


class UnknownModelError(LearnerError):
    """``build_model`` was given a name that is not in the registry."""


class MissingHeadError(LearnerError):
    """An objective needs an output head the model was not built with (check ``heads`` in its config)."""


class MetricsError(LearnerError):
    """A metrics accumulator was fed arrays of different lengths or restored from a foreign state."""
