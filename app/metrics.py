"""What GET /metrics reports (app.routes.metrics), in Prometheus' text format.

Two sources, one registry per app:

* `HttpMetrics`, an ASGI middleware: this API process's request counts and
  latencies, by method, route template and status.
* `RedisCollector`, read at scrape time: what lives in Redis and so is the
  same whichever API process answers. Queue depth and running jobs (RQ's
  lists and registries), the live workers and their device memory (their
  presence keys), and the workers' counters and histograms, which each
  worker adds to one hash per queue (bailan.metrics explains why Redis and
  not a port per worker).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from rq.registry import StartedJobRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.store.workers import live_workers
from bailan.metrics import BUCKETS, COUNTERS, HELP, metrics_key, parse_field
from bailan.queues import RQ_QUEUE_PREFIX, queues_by_model

log = logging.getLogger("bailan.api")


class RedisCollector(Collector):
    """The service-wide figures, read from Redis on every scrape (a handful of commands)."""

    def __init__(self, conn: redis.Redis, queue_name: str) -> None:
        self.conn = conn
        self.queue_name = queue_name

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("bailan_redis_up", "1 when Redis answered this scrape, else 0.")
        try:
            families = list(self._families())
        except redis.RedisError as exc:
            # A scrape during an outage still answers: the outage is itself the figure.
            log.warning("metrics: Redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        queues = queues_by_model(self.conn, self.queue_name)
        pipe = self.conn.pipeline(transaction=False)
        for name, _ in queues:
            pipe.llen(f"{RQ_QUEUE_PREFIX}{name}")
            pipe.zcard(StartedJobRegistry(name, connection=self.conn).key)
        pipe.hgetall(metrics_key(self.queue_name))
        answers = pipe.execute()
        depth = GaugeMetricFamily(
            "bailan_queue_depth",
            "Jobs waiting, per RQ queue and the model it feeds (model \"\": jobs that name none).",
            labels=["queue", "model"])
        running = GaugeMetricFamily("bailan_jobs_running", "Jobs a worker has started and not finished.",
                                    labels=["queue", "model"])
        for index, (name, model) in enumerate(queues):
            depth.add_metric([name, model], answers[2 * index])
            running.add_metric([name, model], answers[2 * index + 1])
        yield depth
        yield running
        yield from self._workers()
        yield from self._worker_figures(answers[-1])

    def _workers(self) -> Iterator[Metric]:
        workers = live_workers(self.conn)
        count = GaugeMetricFamily("bailan_workers", "Live worker processes (presence key not expired), by model.",
                                  labels=["model"])
        slots = GaugeMetricFamily("bailan_worker_slots", "Jobs the live workers can run at once, by model.",
                                  labels=["model"])
        by_model: dict[str, list[int]] = defaultdict(list)
        for worker in workers:
            by_model[worker.model].append(worker.max_batch or 0)
        for model, batches in sorted(by_model.items()):
            count.add_metric([model], len(batches))
            slots.add_metric([model], sum(batches))
        yield count
        yield slots
        memory = GaugeMetricFamily("bailan_gpu_memory_bytes",
                                   "CUDA memory of each live worker's device (kind: allocated, reserved, total).",
                                   labels=["worker", "model", "kind"])
        for worker in workers:
            for kind, value in worker.gauges.items():
                memory.add_metric([worker.name, worker.model, kind], value)
        yield memory

    def _worker_figures(self, raw: dict[bytes, bytes]) -> Iterator[Metric]:
        counters: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        # histogram -> labels (without le) -> {"buckets": {le: n}, "sum": s, "count": c}
        histograms: dict[str, dict[tuple[tuple[str, str], ...], dict]] = defaultdict(dict)
        for key, value in raw.items():
            name, labels = parse_field(key.decode())
            amount = float(value)
            if name in COUNTERS:
                counters[name].append((labels, amount))
                continue
            for base in BUCKETS:
                if name.startswith(base + "_"):
                    part = name[len(base) + 1:]
                    le = labels.pop("le", None)
                    series = histograms[base].setdefault(tuple(sorted(labels.items())),
                                                         {"buckets": {}, "sum": 0.0, "count": 0.0})
                    if part == "bucket" and le is not None:
                        series["buckets"][le] = amount
                    elif part in ("sum", "count"):
                        series[part] = amount
                    break
        for name, help_text in COUNTERS.items():
            # Writers label a counter differently (the reaper knows no model): the
            # family takes every label any of them used, "" where one is missing.
            label_names = sorted({k for labels, _ in counters[name] for k in labels})
            family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=label_names)
            for labels, amount in sorted(counters[name], key=lambda item: sorted(item[0].items())):
                family.add_metric([labels.get(k, "") for k in label_names], amount)
            yield family
        for base, bounds in BUCKETS.items():
            label_names = sorted({k for labels in histograms[base] for k, _ in labels})
            family = HistogramMetricFamily(base, HELP[base], labels=label_names)
            for labels, series in sorted(histograms[base].items()):
                cumulative = 0.0
                buckets = []
                for bound in bounds:
                    cumulative += series["buckets"].get(repr(float(bound)), 0.0)
                    buckets.append((repr(float(bound)), cumulative))
                buckets.append(("+Inf", series["count"]))
                values = dict(labels)
                family.add_metric([values.get(k, "") for k in label_names], buckets, series["sum"])
            yield family


# Methods counted under their own name; any other (a client may send any token) counts as "other",
# so a client cannot grow the series without bound.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetrics:
    """Counts and times every HTTP request of this process by method, route template and status.

    The route template (`/v1/jobs/{job_id}`), never the raw path, so job ids
    cannot grow the series without bound; unmatched paths count as "unmatched".
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter("bailan_http_requests", "HTTP requests answered, by method, route and status.",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("bailan_http_request_seconds",
                                 "Seconds from request to the response's first byte, by method and route.",
                                 ["method", "route"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        # The labelled children, kept: prometheus-client's labels() checks and locks on every call,
        # which on the status path cost as much as the observation itself.
        self._latencies: dict[tuple[str, str], Any] = {}
        self._counts: dict[tuple[str, str, int], Any] = {}

    def _labels(self, scope: Scope) -> tuple[str, str]:
        method = scope["method"]
        route = scope.get("route")
        return method if method in KNOWN_METHODS else "other", getattr(route, "path", None) or "unmatched"

    def _observe(self, scope: Scope, seconds: float) -> None:
        key = self._labels(scope)
        child = self._latencies.get(key)
        if child is None:
            child = self._latencies[key] = self.latency.labels(*key)
        child.observe(seconds)

    def _count(self, scope: Scope, status: int) -> None:
        key = (*self._labels(scope), status)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self.requests.labels(key[0], key[1], str(status))
        child.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        timed = False

        async def timing_send(message: Message) -> None:
            nonlocal status, timed
            if message["type"] == "http.response.start":
                status = message["status"]
                # First byte: an event stream's response lasts as long as the client stays.
                self._observe(scope, time.perf_counter() - started)
                timed = True
            await send(message)

        try:
            await self.app(scope, receive, timing_send)
        finally:
            if not timed:
                self._observe(scope, time.perf_counter() - started)
            self._count(scope, status)
