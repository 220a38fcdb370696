"""Prometheus metrics of the service, in their own registry, served on ``/metrics``.

The names are part of the service's interface (dashboards and alerts are built on them):
``roi_`` prefix, base units (seconds, bytes), ``_total`` on counters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

# From 10 us (a small batch's kernel on the CPU; with 100 us as the lowest bound, 82 % of the
# CPU's compute observations fell in it) to 10 s (a large batch on the CPU under load).
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.000075,
    0.0001,
    0.00015,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
BATCH_BOX_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServiceMetrics:
    """Every metric of one server. Each server has its own registry, so that several servers
    can live in one process (tests, benchmarks)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple, object] = {}
        r = self.registry
        # The server process's CPU time, resident memory and open files (process_* on Linux).
        ProcessCollector(registry=r)
        # protocol: "roi_v1", or "oip" (the Open Inference Protocol, roi_server.oip).
        self.requests = Counter(
            "roi_requests",
            "Requests answered, by protocol, op and gRPC status code.",
            ["protocol", "op", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "roi_request_duration_seconds",
            "Server-side time of a request, from arrival to its response being ready.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "roi_queue_wait_seconds",
            "Time a request waited in the batcher before its batch was launched.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "roi_compute_seconds",
            "Kernel time of an executed batch (with its host-device copies on CUDA).",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "roi_batch_requests", "Requests per executed batch.", buckets=BATCH_REQUEST_BUCKETS, registry=r
        )
        self.batch_boxes = Histogram("roi_batch_boxes", "Boxes per executed batch.", buckets=BATCH_BOX_BUCKETS, registry=r)
        self.batches = Counter("roi_batches", "Batches executed (kernel launches), by op.", ["op"], registry=r)
        self.queue_depth = Gauge("roi_queue_depth", "Requests waiting in the batcher for the device.", registry=r)
        self.in_flight = Gauge("roi_requests_in_flight", "Requests being handled (decoding, queued or computing).", registry=r)
        self.received_bytes = Counter("roi_received_bytes", "Bytes of request messages received.", registry=r)
        self.sent_bytes = Counter("roi_sent_bytes", "Bytes of response messages sent.", registry=r)
        self.device_memory = Gauge(
            "roi_device_memory_bytes", "CUDA memory allocated by the server's tensors.", ["device"], registry=r
        )
        self.server_info = Gauge("roi_server_info", "Constant 1, labelled with the server's version and device.", ["version", "device"], registry=r)
        self.shm_regions = Gauge(
            "roi_shared_memory_regions", "Shared memory regions registered by clients on this host.", registry=r
        )
        self.shm_mapped_bytes = Gauge(
            "roi_shared_memory_mapped_bytes",
            "Bytes of clients' shared memory mapped by the server (unregistered regions count until the "
            "requests using them finish).",
            registry=r,
        )
        # Feature handles (roi_server.features).
        self.feature_budget = Gauge("roi_feature_store_budget_bytes", "The feature store's byte budget.", registry=r)
        self.feature_bytes = Gauge(
            "roi_feature_store_bytes", "Bytes the feature store holds: stored handles and uploads in progress.", registry=r
        )
        self.feature_handles = Gauge("roi_feature_store_handles", "Feature handles stored.", registry=r)
        self.feature_uploads = Counter(
            "roi_feature_uploads", "UploadFeatures calls, by gRPC status code.", ["code"], registry=r
        )
        self.feature_hits = Counter("roi_feature_hits", "Pool requests that named a live feature handle.", registry=r)
        self.feature_misses = Counter(
            "roi_feature_misses",
            "Pool requests that named a feature handle the store does not hold, by reason (unknown, expired, "
            "evicted, released).",
            ["reason"],
            registry=r,
        )
        self.feature_evictions = Counter(
            "roi_feature_evictions", "Feature handles evicted to make room for an upload.", registry=r
        )

    def child(self, metric, *values: str):
        """``metric.labels(*values)``, looked up once: labels() costs microseconds on every
        call, and the request path records several metrics per request."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def set_server(self, version: str, device: str, memory_allocated: Callable[[], float] | None) -> None:
        self.server_info.labels(version=version, device=device).set(1)
        if memory_allocated is not None:
            self.device_memory.labels(device=device).set_function(memory_allocated)


class MetricsHTTPServer:
    """``/metrics`` on its own thread (prometheus_client's WSGI server)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        server: WSGIServer = self._server
        return int(server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        thread: threading.Thread = self._thread
        thread.join(timeout=5)
