# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics: a L{Metrics} object owning its own
C{CollectorRegistry} (never the process-global one), fed by the
gateway's L{aiproxy.monitor.ExchangeMonitor} from each request's access
record, and served on its own C{metrics_listen} endpoint at C{/metrics}.

The label set is documented in C{docs/operations.md}. Label values that a
client controls (the model name) are truncated to L{MODEL_LABEL_LENGTH}
characters and capped at L{MAX_MODELS} distinct values, beyond which they
are counted as C{"_other"}, so that no client can grow the scrape without
bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

__all__ = [
    "MAX_MODELS",
    "MODEL_LABEL_LENGTH",
    "Metrics",
    "MetricsSite",
    "metrics_site",
]

#: Longest model label value; longer names are cut.
MODEL_LABEL_LENGTH = 64

#: Distinct model label values kept; later new models count as C{_other}.
MAX_MODELS = 200

#: Request durations: from a few milliseconds to the longest streams.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
)

#: Times to first token.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)

#: Time the gateway itself adds: sub-millisecond to tens of milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

#: Gaps between two upstream chunks of a stream.
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: Record keys counted in C{aiproxy_tokens_total}, by their C{type} label.
_TOKEN_TYPES = (
    ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"),
    ("cache_read", "cache_read_input_tokens"),
    ("cache_creation", "cache_creation_input_tokens"),
    ("reasoning", "reasoning_tokens"),
)


def _label(value: Any) -> str:
    """
    A label value: C{""} for L{None}, else the value as text.
    """
    return "" if value is None else str(value)


class Metrics:
    """
    The gateway's metrics in one private registry.

    @ivar registry: the C{CollectorRegistry} holding them all; scrape it
        with C{prometheus_client.generate_latest(metrics.registry)}.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, max_models: int = MAX_MODELS
    ) -> None:
        self.registry = registry = registry if registry is not None else CollectorRegistry()
        self._max_models = max_models
        self._models: set[str] = set()
        self._gap_children: dict[str, Any] = {}
        self.requests = Counter(
            "aiproxy_requests",
            "Requests answered, by route, instance, HTTP status and request type.",
            ["route", "instance", "status", "request_type"],
            registry=registry,
        )
        self.attempts = Counter(
            "aiproxy_upstream_attempts",
            "Upstream attempts, by route, instance and the upstream's status (empty when no "
            "answer came); a request that fell back to another instance has several.",
            ["route", "instance", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "aiproxy_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            ["route", "request_type"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "aiproxy_ttft_seconds",
            "Streams only: time from the request's arrival to the first body chunk from upstream.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.upstream_ttft = Histogram(
            "aiproxy_upstream_ttft_seconds",
            "Streams only: time from sending the upstream request to its first body chunk.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.gateway_latency = Histogram(
            "aiproxy_gateway_latency_seconds",
            "Streams only: time to first byte the gateway adds, i.e. the client's time to "
            "first byte minus the upstream's (request handling before the upstream call, "
            "and relaying the first chunk).",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.chunk_gap = Histogram(
            "aiproxy_stream_chunk_gap_seconds",
            "Gaps between two consecutive upstream chunks of a stream.",
            ["route"],
            buckets=GAP_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "aiproxy_tokens",
            "Tokens reported by upstreams, by model (llm_model) and type.",
            ["model", "type"],
            registry=registry,
        )
        self.consumer_tokens = Counter(
            "aiproxy_consumer_tokens",
            "Tokens reported by upstreams for the requests of each consumer (key-auth), by type.",
            ["consumer", "type"],
            registry=registry,
        )
        self.aborts = Counter(
            "aiproxy_aborts",
            "Responses ended early, by reason.",
            ["reason"],
            registry=registry,
        )
        # livesum: with worker processes, the live workers' values summed.
        self.active_streams = Gauge(
            "aiproxy_active_streams",
            "Streamed responses being relayed now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "aiproxy_in_flight_requests",
            "Requests being proxied now (streamed or not).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.bytes_in = Counter(
            "aiproxy_bytes_in",
            "Request body bytes received from clients, by route.",
            ["route"],
            registry=registry,
        )
        self.bytes_out = Counter(
            "aiproxy_bytes_out",
            "Response body bytes sent to clients, by route.",
            ["route"],
            registry=registry,
        )
        self.reloads = Counter(
            "aiproxy_config_reloads",
            "Configuration reloads (SIGHUP), by result (success or failure).",
            ["result"],
            registry=registry,
        )
        self.client_connections = Gauge(
            "aiproxy_client_connections",
            "Client connections open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.client_connections_refused = Counter(
            "aiproxy_client_connections_refused",
            "Client connections closed at once because max_client_connections were open.",
            registry=registry,
        )

    def model_label(self, model: str | None) -> str:
        """
        The C{model} label value of a model name: truncated, and C{_other}
        once L{MAX_MODELS} distinct names were seen.
        """
        if not model:
            return ""
        model = model[:MODEL_LABEL_LENGTH]
        if model not in self._models:
            if len(self._models) >= self._max_models:
                return "_other"
            self._models.add(model)
        return model

    def gap_observer(self, route_id: str) -> Callable[[float], None]:
        """
        The function to call with each inter-chunk gap of a stream on
        C{route_id}: the labelled histogram's C{observe}, looked up once per
        route rather than once per chunk.
        """
        child = self._gap_children.get(route_id)
        if child is None:
            child = self._gap_children[route_id] = self.chunk_gap.labels(route=route_id)
        return child.observe  # type: ignore[no-any-return]

    def stream_started(self) -> None:
        """
        A streamed response began.
        """
        self.active_streams.inc()

    def stream_ended(self) -> None:
        """
        A streamed response ended (whichever way).
        """
        self.active_streams.dec()

    def exchange_started(self) -> None:
        """
        A request is being proxied.
        """
        self.in_flight.inc()

    def exchange_ended(self) -> None:
        """
        A proxied request ended.
        """
        self.in_flight.dec()

    def observe_record(
        self,
        record: Mapping[str, Any],
        duration: float | None = None,
        ttft: float | None = None,
        upstream_ttft: float | None = None,
        gateway_latency: float | None = None,
    ) -> None:
        """
        Count one finished request from its access record.

        @param duration: seconds from arrival to the end of the response.
        @param ttft: seconds to the first upstream chunk (streams only).
        @param upstream_ttft: seconds from the upstream request to its first
            chunk (streams only).
        @param gateway_latency: seconds the gateway added to the client's
            time to first byte (streams only).
        """
        route = _label(record.get("route_id"))
        request_type = _label(record.get("request_type"))
        self.requests.labels(
            route=route,
            instance=_label(record.get("instance")),
            status=_label(record.get("status")),
            request_type=request_type,
        ).inc()
        for attempt in record.get("attempts") or ():
            self.attempts.labels(
                route=route,
                instance=_label(attempt.get("instance")),
                status=_label(attempt.get("status")),
            ).inc()
        if duration is not None:
            self.request_duration.labels(route=route, request_type=request_type).observe(duration)
        if ttft is not None:
            self.ttft.labels(route=route).observe(ttft)
        if upstream_ttft is not None:
            self.upstream_ttft.labels(route=route).observe(upstream_ttft)
        if gateway_latency is not None:
            self.gateway_latency.labels(route=route).observe(max(gateway_latency, 0.0))
        reason = record.get("abort_reason")
        if reason:
            self.aborts.labels(reason=reason).inc()
        bytes_in = record.get("bytes_in")
        if bytes_in:
            self.bytes_in.labels(route=route).inc(bytes_in)
        bytes_out = record.get("bytes_out")
        if bytes_out:
            self.bytes_out.labels(route=route).inc(bytes_out)
        model = None
        consumer = record.get("consumer")
        for kind, key in _TOKEN_TYPES:
            count = record.get(key)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                if model is None:
                    model = self.model_label(record.get("llm_model"))
                self.tokens.labels(model=model, type=kind).inc(count)
                if consumer is not None:
                    self.consumer_tokens.labels(consumer=consumer, type=kind).inc(count)


class MetricsSite(Site):
    """
    The site of the C{metrics_listen} endpoint (named so in its log lines).
    """

    noisy = False

    def log(self, request: Any) -> None:
        """
        Scrapes are not logged: one every few seconds would drown the log.
        """


def metrics_site(
    metrics: Metrics | CollectorRegistry, resource: IResource | None = None
) -> MetricsSite:
    """
    A site serving C{metrics}' registry (or the registry C{metrics}) at
    C{/metrics} (and 404 elsewhere) with C{prometheus_client}'s Twisted
    resource.

    @param resource: the resource served at C{/metrics}; by default
        C{prometheus_client.twisted.MetricsResource} over the registry
        (a WSGI resource run in the reactor's thread pool).
    """
    if resource is None:
        # Imported here: prometheus_client.twisted imports the global reactor.
        from prometheus_client.twisted import MetricsResource

        registry = metrics.registry if isinstance(metrics, Metrics) else metrics
        resource = MetricsResource(registry)
    root = Resource()
    root.putChild(b"metrics", resource)
    return MetricsSite(root)
