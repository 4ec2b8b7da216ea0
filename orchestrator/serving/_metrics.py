"""The serving process's Prometheus metrics (``GET /metrics`` on the HTTP server), with prometheus_client.

=============================================================  ==========================================
``orchestrator_serving_requests_total{model,version}``         requests that named a served model, every
                                                               front (MindSpore gRPC/REST, KServe)
``orchestrator_serving_request_failures_total{model,version,   those that failed (or had an instance that
reason}``                                                      failed): bad_request, not_served,
                                                               unavailable, timeout, error
``orchestrator_serving_request_duration_seconds{model}``       a request's time in the dispatcher
``orchestrator_serving_queue_seconds{servable,version}``       an instance's wait from ``call_servable`` to
                                                               its model run (the batcher's gathering)
``orchestrator_serving_compute_seconds{servable,version}``     one model run on the pool (including any
                                                               wait for a free pool worker)
``orchestrator_serving_batch_size{servable,version}``          instances (rows) per model run
``orchestrator_serving_workers_alive{servable,version}``       backends serving it now: cluster workers
                                                               in rotation, or 1 for one in this process
``orchestrator_serving_model_ready{model,version}``            1 while some worker can serve the model
=============================================================  ==========================================

``model`` is the KServe model name (``_kserve_models``: ``NAME`` or ``NAME.METHOD``). Requests
naming no served model are not labelled per model (a client could make up names without end):
they count in ``orchestrator_serving_unknown_model_requests_total``. The queue, compute and batch
metrics are those of the servables in this process: a cluster master sees requests and workers;
each worker keeps its own (``orchestrate serve --worker ... --http-port P`` shows them).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ._kserve_models import model_name

PREFIX = "orchestrator_serving"
REASONS = {1: "error", 2: "not_served", 3: "bad_request", 4: "unavailable", 5: "timeout"}  # _dispatch's error codes
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _TableCollector:
    """Workers alive and readiness, read from the dispatcher's table at each scrape."""

    def __init__(self, dispatcher):
        self._dispatcher = dispatcher

    def describe(self):
        return []

    def collect(self):
        alive = GaugeMetricFamily(f"{PREFIX}_workers_alive", "Backends serving the servable version now",
                                  labels=["servable", "version"])
        ready = GaugeMetricFamily(f"{PREFIX}_model_ready", "1 while some worker can serve the model version",
                                  labels=["model", "version"])
        known = self._dispatcher.known()
        for (name, version), count in sorted(self._dispatcher.backend_counts().items()):
            alive.add_metric([name, str(version)], count)
            methods = {m for spec in known[name].values() for m in spec.methods}
            for method in sorted(known[name][version].methods):
                ready.add_metric([model_name(name, method, methods), str(version)], 1 if count else 0)
        yield alive
        yield ready


class Metrics:
    """One process's metrics in their own registry (never the global one: two servers in one test process)."""

    def __init__(self, dispatcher):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Requests that named a served model", ["model", "version"],
                                registry=r)
        self.failures = Counter(f"{PREFIX}_request_failures", "Requests that failed, or had an instance that failed",
                                ["model", "version", "reason"], registry=r)
        self.unknown = Counter(f"{PREFIX}_unknown_model_requests", "Requests naming no served model", registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "A request's time in the server", ["model"],
                                  buckets=SECONDS, registry=r)
        self.queue = Histogram(f"{PREFIX}_queue_seconds", "An instance's wait before its model run",
                               ["servable", "version"], buckets=SECONDS, registry=r)
        self.compute = Histogram(f"{PREFIX}_compute_seconds", "One model run", ["servable", "version"],
                                 buckets=SECONDS, registry=r)
        self.batch = Histogram(f"{PREFIX}_batch_size", "Instances per model run", ["servable", "version"],
                               buckets=BATCH_SIZES, registry=r)
        r.register(_TableCollector(dispatcher))

    def servable(self, name: str, version: int):
        """(queue, compute, batch) histograms of one servable version, labelled once."""
        labels = (name, str(version))
        return self.queue.labels(*labels), self.compute.labels(*labels), self.batch.labels(*labels)

    def request_done(self, dispatcher, spec, reply, seconds: float) -> None:
        known = dispatcher.known().get(spec.name)
        methods = {m for signature in (known or {}).values() for m in signature.methods}
        if spec.method_name not in methods:
            self.unknown.inc()
            return
        wanted = reply.servable_spec.version_number or spec.version_number
        if wanted and wanted not in known:
            self.unknown.inc()  # a made-up version: no label of its own (a client could make them up without end)
            return
        model = model_name(spec.name, spec.method_name, methods)
        # A request that failed before a version was chosen counts for the newest one it could have run on.
        version = str(wanted or max(v for v, s in known.items() if spec.method_name in s.methods))
        self.requests.labels(model, version).inc()
        self.duration.labels(model).observe(seconds)
        failed = [e.error_code for e in reply.error_msg if e.error_code]
        if failed:
            self.failures.labels(model, version, REASONS.get(failed[0], "error")).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

