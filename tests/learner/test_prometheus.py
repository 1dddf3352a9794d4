"""The Prometheus endpoint: text format over real HTTP, loopback by default, the learner's metrics."""
from __future__ import annotations

import math
import re
import urllib.error
import urllib.request

import pytest

from learner.prometheus import (CONTENT_TYPE, MetricsRegistry, MetricsServer, PrometheusConfig,
                                describe_learner_metrics, update_learner_metrics)

# one sample line of the text exposition format: name{labels} value
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse(text: str) -> dict[str, dict[str, float]]:
    """{name: {label string: value}}; every line must be a comment or a well-formed sample."""
    out: dict[str, dict[str, float]] = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        m = LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(4)
        assert name in types, f"{name} has no # TYPE line before it"
        out.setdefault(name, {})[labels] = float(value)
    return out


def snapshot(**overrides):
    snap = {"samples": 4096, "steps": 16, "rejected": 2, "samples_per_s": 812.5, "loss": 0.61, "window_auc": 0.7,
            "window_gauc": 0.65, "window_vr_auc": float("nan"), "version": 7, "versions": 7,
            "checkpoint_age_s": 1.5, "lag": {0: 12, 2: 0}, "freshness_p50_s": 0.12, "freshness_p99_s": 0.48,
            "publish_failures": 0}
    snap.update(overrides)
    return snap


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode("utf-8")


def test_endpoint_binds_loopback_by_default_and_serves_text_format():
    assert PrometheusConfig().host == "127.0.0.1"
    registry = MetricsRegistry()
    update_learner_metrics(registry, snapshot(), topic="samples")
    with MetricsServer(PrometheusConfig(), registry) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        status, ctype, body = get(server.url)
        assert status == 200 and ctype == CONTENT_TYPE
        m = parse(body)
        assert m["streamrec_learner_samples_total"][""] == 4096
        assert m["streamrec_learner_model_version"][""] == 7
        assert m["streamrec_learner_consumer_lag"] == {'{partition="0",topic="samples"}': 12,
                                                       '{partition="2",topic="samples"}': 0}
        assert math.isnan(m["streamrec_learner_window_valid_read_auc"][""])
        assert m["streamrec_learner_freshness_seconds"]['{quantile="0.99"}'] == 0.48
        for name in ("streamrec_learner_samples_per_second", "streamrec_learner_loss", "streamrec_learner_window_auc",
                     "streamrec_learner_window_gauc", "streamrec_learner_checkpoint_age_seconds"):
            assert name in m, name
        # a partition given up disappears from the lag
        update_learner_metrics(registry, snapshot(samples=5000, lag={2: 3}), topic="samples")
        m = parse(get(server.url)[2])
        assert m["streamrec_learner_samples_total"][""] == 5000
        assert m["streamrec_learner_consumer_lag"] == {'{partition="2",topic="samples"}': 3}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{host}:{port}/other", timeout=10)
        assert err.value.code == 404


def test_registry_escapes_labels_and_rejects_undescribed_metrics():
    r = MetricsRegistry()
    r.describe("x_total", "counter", "x")
    r.set("x_total", 1, {"path": 'a"b\\c\nd'})
    assert parse(r.render())["x_total"] == {'{path="a\\"b\\\\c\\nd"}': 1}
    with pytest.raises(KeyError):
        r.set("y", 1)
    with pytest.raises(ValueError):
        r.describe("z", "histogram", "z")
    with pytest.raises(ValueError):
        PrometheusConfig(port=70000)


def test_learner_metrics_are_all_described():
    r = MetricsRegistry()
    describe_learner_metrics(r)
    update_learner_metrics(r, snapshot(), topic="samples")
    names = set(parse(r.render()))
    assert {"streamrec_learner_samples_total", "streamrec_learner_samples_per_second", "streamrec_learner_consumer_lag",
            "streamrec_learner_loss", "streamrec_learner_window_auc", "streamrec_learner_window_gauc",
            "streamrec_learner_window_valid_read_auc", "streamrec_learner_model_version",
            "streamrec_learner_checkpoint_age_seconds", "streamrec_learner_freshness_seconds"} <= names


@pytest.mark.parametrize("name", ["learner.prometheus", "learner.progress", "learner.stream", "learner.checkpoint_store"])
def test_module_doctests(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_progress_line_rewrites_in_place_on_a_terminal_and_thins_out_in_a_log():
    import io

    from learner.progress import ProgressLine

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    line = ProgressLine(tty)
    line.update(snapshot(samples=10))
    line.update(snapshot(samples=2_000_000))
    line.close()
    frames = tty.getvalue().split("\r")
    assert frames[0] == "" and "10 samples" in frames[1] and "2.0M samples" in frames[2]
    assert tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1

    now = [0.0]
    log = io.StringIO()
    line = ProgressLine(log, plain_every_s=10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 9.9, 10.0, 15.0, 20.5):
        now[0] = t
        line.update(snapshot(steps=int(t * 10)))
    assert [l.split(" | ")[0] for l in log.getvalue().splitlines()] == ["v7 step 0", "v7 step 100", "v7 step 205"]
