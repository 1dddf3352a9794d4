"""A tiny Prometheus text-format endpoint (stdlib ``http.server`` on a thread), 127.0.0.1 by default.

:class:`MetricsRegistry` holds gauges and counters with optional labels and renders the text
exposition format 0.0.4; :class:`MetricsServer` serves it at ``/metrics``.
:func:`update_learner_metrics` maps the continuous learner's live view onto ``streamrec_learner_*``.

>>> r = MetricsRegistry()
>>> r.describe("streamrec_learner_samples_total", "counter", "samples trained on")
>>> r.set("streamrec_learner_samples_total", 42)
>>> r.describe("streamrec_learner_consumer_lag", "gauge", "records behind the end of the partition")
>>> r.set("streamrec_learner_consumer_lag", 3, {"topic": "samples", "partition": "0"})
>>> print(r.render(), end="")
# HELP streamrec_learner_samples_total samples trained on
# TYPE streamrec_learner_samples_total counter
streamrec_learner_samples_total 42
# HELP streamrec_learner_consumer_lag records behind the end of the partition
# TYPE streamrec_learner_consumer_lag gauge
streamrec_learner_consumer_lag{partition="0",topic="samples"} 3
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TYPES = ("gauge", "counter")


@dataclass(frozen=True)
class PrometheusConfig:
    """Where the endpoint listens. ``port`` 0 picks a free one; ``host`` stays loopback unless
    the operator opens it on purpose."""

    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} is not in 0..65535")
        if not self.host:
            raise ValueError("host='' (use 127.0.0.1, or 0.0.0.0 to listen on every interface)")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class MetricsRegistry:
    """Named metrics, each a gauge or a counter, with one value per label set. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}

    def describe(self, name: str, kind: str, help_text: str) -> None:
        if kind not in _TYPES:
            raise ValueError(f"kind={kind!r} must be one of {_TYPES}")
        with self._lock:
            self._meta[name] = (kind, help_text)
            self._values.setdefault(name, {})

    def set(self, name: str, value: float, labels: dict[str, Any] | None = None) -> None:
        key = tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))
        with self._lock:
            if name not in self._meta:
                raise KeyError(f"metric {name!r} not described")
            self._values[name][key] = float(value)

    def replace(self, name: str, values: dict[tuple[tuple[str, str], ...], float]) -> None:
        """Swap every labelled value of ``name`` at once (e.g. the lag of the partitions owned now)."""
        with self._lock:
            self._values[name] = dict(values)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._meta

    def get(self, name: str, labels: dict[str, Any] | None = None) -> float:
        key = tuple(sorted((str(k), str(v)) for k, v in (labels or {}).items()))
        with self._lock:
            return self._values[name][key]

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            for name, (kind, help_text) in self._meta.items():
                out.append(f"# HELP {name} {help_text}")
                out.append(f"# TYPE {name} {kind}")
                for key, value in self._values[name].items():
                    labels = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                    out.append(f"{name}{{{labels}}} {_number(value)}" if labels else f"{name} {_number(value)}")
        return "\n".join(out) + "\n"


class MetricsServer:
    """Serves ``registry.render()`` at ``/metrics`` on a daemon thread; ``close()`` stops it."""

    def __init__(self, cfg: PrometheusConfig, registry: MetricsRegistry):
        self.cfg = cfg
        self.registry = registry
        handler = _handler(registry)
        self._server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus", daemon=True)
        self._thread.start()
        logger.info("metrics endpoint listening url=%s", self.url)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _handler(registry: MetricsRegistry):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            body = registry.render().encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:  # scrapes are per-request facts, not state changes
            logger.debug("scrape " + fmt, *args)

    return Handler


LEARNER_METRICS = (
    ("streamrec_learner_samples_total", "counter", "samples trained on (each scored first)", "samples"),
    ("streamrec_learner_steps_total", "counter", "training steps (minibatches)", "steps"),
    ("streamrec_learner_rejected_total", "counter", "records that broke the sample contract (dead-lettered)", "rejected"),
    ("streamrec_learner_samples_per_second", "gauge", "training throughput over the last seconds", "samples_per_s"),
    ("streamrec_learner_loss", "gauge", "loss of the last minibatch", "loss"),
    ("streamrec_learner_window_auc", "gauge", "prequential click AUC over the sliding window", "window_auc"),
    ("streamrec_learner_window_gauc", "gauge", "prequential click GAUC over the sliding window", "window_gauc"),
    ("streamrec_learner_window_valid_read_auc", "gauge", "prequential valid-read AUC over the sliding window",
     "window_vr_auc"),
    ("streamrec_learner_model_version", "gauge", "version of the newest checkpoint", "version"),
    ("streamrec_learner_versions_published_total", "counter", "model versions announced on model-updates", "versions"),
    ("streamrec_learner_checkpoint_age_seconds", "gauge", "seconds since the newest durable checkpoint",
     "checkpoint_age_s"),
    ("streamrec_learner_version_publish_failures_total", "counter", "announcements that failed", "publish_failures"),
)


def describe_learner_metrics(registry: MetricsRegistry) -> None:
    for name, kind, help_text, _ in LEARNER_METRICS:
        registry.describe(name, kind, help_text)
    registry.describe("streamrec_learner_consumer_lag", "gauge",
                      "records between the trained position and the end of each owned partition")
    registry.describe("streamrec_learner_freshness_seconds", "gauge",
                      "time from a sample being produced to being inside a training step (recent samples)")


def update_learner_metrics(registry: MetricsRegistry, snap: dict[str, Any], topic: str) -> None:
    """Copy a :meth:`learner.continuous.ContinuousLearner.snapshot` into the registry."""
    if not registry.has("streamrec_learner_consumer_lag"):
        describe_learner_metrics(registry)
    for name, _, _, key in LEARNER_METRICS:
        registry.set(name, snap[key])
    registry.replace("streamrec_learner_consumer_lag",
                     {(("partition", str(p)), ("topic", topic)): float(v) for p, v in snap["lag"].items()})
    registry.set("streamrec_learner_freshness_seconds", snap["freshness_p50_s"], {"quantile": "0.5"})
    registry.set("streamrec_learner_freshness_seconds", snap["freshness_p99_s"], {"quantile": "0.99"})


__all__ = ["CONTENT_TYPE", "MetricsRegistry", "MetricsServer", "PrometheusConfig", "describe_learner_metrics",
           "update_learner_metrics"]
