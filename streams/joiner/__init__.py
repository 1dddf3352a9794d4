"""Stream joiner, pure core: event-time join, valid-read rules, normalized dwell time, labelling.

The faust app (``app.py``: a task over each fetch, a rocksdict feature store per partition with
its changelog) wraps these: decode -> :class:`JoinCore`
-> :func:`label_samples` with the feature store's statistics and snapshots -> ``samples`` topic.
Semantics and diagrams: docs/joiner.md.
"""
from streams.joiner.config import JoinerConfig, NdtConfig, ValidReadConfig, user_group_code
from streams.joiner.join import JoinCore
from streams.joiner.ndt import NdtParams, derive_params, gain_beyond, ndt_weight_ms, normalized_dwell_time
from streams.joiner.records import JoinedImpression, JoinOutput, LateEvent, OrphanEvent
from streams.joiner.validread import (
    RULE_MIN_DWELL,
    RULE_P10_UNKNOWN,
    RULE_T1,
    RULE_T2,
    RULE_T3,
    RULE_X_L_UNKNOWN,
    DwellStatistics,
    describe_rules,
    label_batch,
    label_samples,
    primary_rule,
    valid_read_batch,
)

__all__ = [
    "DwellStatistics", "JoinCore", "JoinOutput", "JoinedImpression", "JoinerConfig", "LateEvent",
    "NdtConfig", "NdtParams", "OrphanEvent", "RULE_MIN_DWELL", "RULE_P10_UNKNOWN", "RULE_T1", "RULE_T2",
    "RULE_T3", "RULE_X_L_UNKNOWN", "ValidReadConfig", "derive_params", "describe_rules", "gain_beyond",
    "label_batch", "label_samples", "ndt_weight_ms", "normalized_dwell_time", "primary_rule", "user_group_code",
    "valid_read_batch",
]
