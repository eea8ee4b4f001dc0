"""Prometheus metrics of the controller and the workers (``GET /metrics``, the Prometheus text format).

Each server owns a :class:`prometheus_client.CollectorRegistry` (no process-wide default registry, so several
servers can live in one process, as they do in tests). Values that live elsewhere (queue lengths, the registry, an
engine's own counters) are read when scraped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from llava_med.constants import ErrorCode

__all__ = ["CONTENT_TYPE", "ControllerMetrics", "WorkerMetrics", "error_label"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def error_label(code: ErrorCode | int) -> str:
    """``BAD_IMAGE`` for 40002, the number for codes this version does not know."""
    try:
        return ErrorCode(int(code)).name
    except ValueError:
        return str(int(code))


class _Live(Collector):
    """Gauges read at scrape time from ``read()``: ``{name: (help, value or {label_value: value})}``."""

    def __init__(self, read: Callable[[], Mapping[str, tuple[str, float | Mapping[str, float]]]], label: str) -> None:
        self._read = read
        self._label = label

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (help_text, value) in self._read().items():
            if isinstance(value, Mapping):
                family = GaugeMetricFamily(name, help_text, labels=[self._label])
                for key, item in value.items():
                    family.add_metric([key], float(item))
            else:
                family = GaugeMetricFamily(name, help_text, value=float(value))
            yield family


class _Base:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerMetrics(_Base):
    """Requests, errors by code, tokens, time to first token and latency of a worker, plus its queue length and the
    engine's own figures (``Engine.metrics()``: running batch size, image-cache hits, ...)."""

    def __init__(self, queue_length: Callable[[], int], engine_metrics: Callable[[], Mapping[str, float]]) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("llava_med_worker_requests", "Generation requests received", registry=r)
        self.errors = Counter("llava_med_worker_errors", "Requests that ended with an error, by error code",
                              ["code"], registry=r)
        self.tokens = Counter("llava_med_worker_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llava_med_worker_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first streamed text", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.latency = Histogram("llava_med_worker_request_duration_seconds",
                                 "Seconds from a request's arrival to its last chunk", buckets=_LATENCY_BUCKETS,
                                 registry=r)
        queue = Gauge("llava_med_worker_queue_length", "Requests running or waiting in the worker", registry=r)
        queue.set_function(lambda: float(queue_length()))

        def engine() -> dict[str, tuple[str, float]]:
            return {f"llava_med_engine_{_metric_name(k)}": (f"Engine figure {k}", v) for k, v in engine_metrics().items()}

        r.register(_Live(engine, "name"))


class ControllerMetrics(_Base):
    """Relayed requests and their errors, registrations, and the registry (workers, models, queue lengths)."""

    def __init__(self, registry_view: Callable[[], Mapping[str, tuple[str, float | Mapping[str, float]]]]) -> None:
        super().__init__()
        r = self.registry
        self.relayed = Counter("llava_med_controller_relayed_requests", "Requests relayed by the controller",
                               registry=r)
        self.errors = Counter("llava_med_controller_errors", "Relayed requests that ended with an error, by code",
                              ["code"], registry=r)
        self.dispatched = Counter("llava_med_controller_dispatched", "Workers named for a model (address requests "
                                  "and relays)", ["model"], registry=r)
        self.registrations = Counter("llava_med_controller_registrations", "Registration attempts, by outcome",
                                     ["outcome"], registry=r)
        r.register(_Live(registry_view, "worker"))


def _metric_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)
