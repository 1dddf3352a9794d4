"""Model-version messages: round trip, NaN metrics, and refusal of malformed bytes."""
from __future__ import annotations

import doctest
import math

import pytest

import learner.versions as versions
from learner.versions import ModelVersion, VersionFormatError


def test_doctests():
    assert doctest.testmod(versions).failed == 0


def test_round_trip_with_offsets_and_nan_metric():
    v = ModelVersion(version=7, path="runs/v7.pt", created_at_ms=1, samples_seen=100, model="dumn",
                     metrics={"auc": 0.7, "gauc": math.nan}, source_offsets={"samples/0": 40, "samples/2": 60})
    back = ModelVersion.decode(v.encode())
    assert back.version == 7 and back.source_offsets == {"samples/0": 40, "samples/2": 60}
    assert back.metrics["auc"] == 0.7 and math.isnan(back.metrics["gauc"])
    assert v.key == b"dumn"


@pytest.mark.parametrize("raw, reason", [
    (b"", "expected a JSON object"),
    (None, "expected a JSON object"),
    (b"\xff\xfe", "bad model version message"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"version": 1}', "missing"),
    (b'{"version": 1, "path": "", "created_at_ms": 0, "samples_seen": 0}', "path=''"),
    (b'{"version": 1, "path": "p", "created_at_ms": 0, "samples_seen": 0, "schema": 9}', "schema=9"),
    (b'{"version": 1, "path": "p", "created_at_ms": 0, "samples_seen": 0, "metrics": {"auc": "x"}}', "metrics"),
    (b'{"version": 1, "path": "p", "created_at_ms": 0, "samples_seen": 0, "evil": 1}', "unexpected keyword"),
])
def test_malformed_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(VersionFormatError, match=reason):
        ModelVersion.decode(raw)
