# -*- test-case-name: tests.test_metrics -*-
"""
Tests for L{aiproxy.metrics}: the metric names and labels of docs/operations.md,
counting from access records, bounded model labels, and the exchanges
feeding them through the monitor; and the access record's attempts and
C{logging} extras (driven by a L{Clock}, without sockets).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.wsgi import WSGIResource

from aiproxy.exchange.relay import StreamRelay, TimedStreamRelay
from aiproxy.metrics import MODEL_LABEL_LENGTH, Metrics, MetricsSite, metrics_site
from aiproxy.monitor import ExchangeMonitor
from tests.test_proxy import (
    API_KEY,
    CHAT,
    CHAT_STREAM,
    DONE,
    USAGE,
    Gateway,
    delta,
    json_response,
    make_table,
    request_bytes,
    stream_response,
)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    Every sample of a scrape of C{metrics}, parsed back with
    C{prometheus_client}'s parser: value by (name, labels).
    """
    text = generate_latest(metrics.registry).decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """
    One sample's value, or L{None} when there is no such series.
    """
    return samples(metrics).get((name, frozenset(labels.items())))


def requests_total(
    metrics: Metrics,
    status: str,
    request_type: str,
    route: str = "chat",
    instance: str = "ai-proxy-openai",
) -> float | None:
    """
    The C{aiproxy_requests_total} sample of one route, instance, status and
    request type (by default the test table's route), or L{None}.
    """
    return value(
        metrics,
        "aiproxy_requests_total",
        route=route,
        instance=instance,
        status=status,
        request_type=request_type,
    )


def families(metrics: Metrics) -> dict[str, Any]:
    """
    The metric families of a scrape, by name.
    """
    text = generate_latest(metrics.registry).decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


RECORD = {
    "route_id": "chat",
    "instance": "ai-proxy-openai",
    "status": 200,
    "request_type": "ai_stream",
    "llm_model": "gpt-test",
    "prompt_tokens": 7,
    "completion_tokens": 3,
    "cache_read_input_tokens": 2,
    "cache_creation_input_tokens": None,
    "reasoning_tokens": 1,
    "bytes_in": 40,
    "bytes_out": 900,
    "abort_reason": None,
}


class MetricNamesTests(SynchronousTestCase):
    """
    The names, types and labels docs/operations.md pins.
    """

    def test_spec_families(self) -> None:
        """
        A scrape parses with C{prometheus_client}'s parser and holds the
        documented families with their types and label names.
        """
        metrics = Metrics()
        metrics.observe_record(
            {**RECORD, "abort_reason": "client_disconnect"}, duration=1.0, ttft=0.1
        )
        found = families(metrics)
        expected = {
            "aiproxy_requests": ("counter", {"route", "instance", "status", "request_type"}),
            "aiproxy_request_duration_seconds": ("histogram", {"route", "request_type"}),
            "aiproxy_ttft_seconds": ("histogram", {"route"}),
            "aiproxy_tokens": ("counter", {"model", "type"}),
            "aiproxy_aborts": ("counter", {"reason"}),
            "aiproxy_active_streams": ("gauge", set()),
        }
        for name, (kind, labels) in expected.items():
            self.assertEqual(found[name].type, kind, name)
            names = {key for sample in found[name].samples for key in sample.labels} - {"le"}
            self.assertEqual(names, labels, name)
        self.assertEqual(requests_total(metrics, "200", "ai_stream"), 1.0)

    def test_other_families(self) -> None:
        """
        Beyond the required set: upstream TTFT, gateway latency, chunk gaps, bytes,
        requests in flight and reloads.
        """
        found = families(Metrics())
        for name in (
            "aiproxy_upstream_ttft_seconds",
            "aiproxy_gateway_latency_seconds",
            "aiproxy_stream_chunk_gap_seconds",
            "aiproxy_bytes_in",
            "aiproxy_bytes_out",
            "aiproxy_in_flight_requests",
            "aiproxy_config_reloads",
        ):
            self.assertIn(name, found)

    def test_private_registry(self) -> None:
        """
        Each L{Metrics} has its own registry: two can coexist, and the
        process-global registry holds none of them.
        """
        first, second = Metrics(), Metrics()
        first.observe_record(RECORD)
        self.assertIsNot(first.registry, second.registry)
        self.assertIsNone(requests_total(second, "200", "ai_stream"))
        self.assertNotIn(b"aiproxy_", generate_latest(REGISTRY))


class RecordTests(SynchronousTestCase):
    """
    L{Metrics.observe_record} counts one finished request.
    """

    def test_tokens_by_model_and_type(self) -> None:
        """
        Token counts go to C{aiproxy_tokens_total} by model and type; a
        missing count makes no series.
        """
        metrics = Metrics()
        metrics.observe_record(RECORD)
        metrics.observe_record(RECORD)
        self.assertEqual(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="prompt"), 14.0
        )
        self.assertEqual(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="completion"), 6.0
        )
        self.assertEqual(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="cache_read"), 4.0
        )
        self.assertEqual(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="reasoning"), 2.0
        )
        self.assertIsNone(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="cache_creation")
        )

    def test_bytes_and_abort(self) -> None:
        """
        Bytes in and out are summed by route; an abort reason is counted.
        """
        metrics = Metrics()
        metrics.observe_record({**RECORD, "abort_reason": "max_response_bytes", "status": 502})
        self.assertEqual(value(metrics, "aiproxy_bytes_in_total", route="chat"), 40.0)
        self.assertEqual(value(metrics, "aiproxy_bytes_out_total", route="chat"), 900.0)
        self.assertEqual(value(metrics, "aiproxy_aborts_total", reason="max_response_bytes"), 1.0)

    def test_histograms(self) -> None:
        """
        The timings given are observed in their histograms; those not given
        are not.
        """
        metrics = Metrics()
        metrics.observe_record(
            RECORD, duration=1.5, ttft=0.2, upstream_ttft=0.15, gateway_latency=0.001
        )
        metrics.observe_record({**RECORD, "request_type": "ai_chat"}, duration=0.5)
        self.assertEqual(
            value(
                metrics,
                "aiproxy_request_duration_seconds_count",
                route="chat",
                request_type="ai_stream",
            ),
            1.0,
        )
        self.assertEqual(
            value(
                metrics,
                "aiproxy_request_duration_seconds_sum",
                route="chat",
                request_type="ai_stream",
            ),
            1.5,
        )
        self.assertEqual(value(metrics, "aiproxy_ttft_seconds_count", route="chat"), 1.0)
        self.assertEqual(
            value(metrics, "aiproxy_ttft_seconds_bucket", route="chat", le="0.25"), 1.0
        )
        self.assertEqual(value(metrics, "aiproxy_ttft_seconds_bucket", route="chat", le="0.1"), 0.0)
        self.assertEqual(value(metrics, "aiproxy_upstream_ttft_seconds_sum", route="chat"), 0.15)
        self.assertEqual(value(metrics, "aiproxy_gateway_latency_seconds_sum", route="chat"), 0.001)

    def test_rejection_record(self) -> None:
        """
        A record without route, instance or request type (a 404) is counted
        with empty labels.
        """
        metrics = Metrics()
        metrics.observe_record(
            {"route_id": None, "instance": None, "status": 404, "request_type": None}
        )
        self.assertEqual(requests_total(metrics, "404", "", route="", instance=""), 1.0)


class ModelLabelTests(SynchronousTestCase):
    """
    Model names come from clients: their label values are bounded.
    """

    def test_truncated(self) -> None:
        """
        A long model name is cut to L{MODEL_LABEL_LENGTH} characters.
        """
        metrics = Metrics()
        self.assertEqual(metrics.model_label("m" * 500), "m" * MODEL_LABEL_LENGTH)

    def test_capped(self) -> None:
        """
        Past C{max_models} distinct names, new ones count as C{_other};
        known ones keep their label.
        """
        metrics = Metrics(max_models=2)
        self.assertEqual(
            [metrics.model_label(m) for m in ("a", "b", "c", "a")], ["a", "b", "_other", "a"]
        )

    def test_missing(self) -> None:
        """
        No model name is the empty label.
        """
        self.assertEqual(Metrics().model_label(None), "")


class GapObserverTests(SynchronousTestCase):
    """
    L{Metrics.gap_observer}: one labelled histogram lookup per route.
    """

    def test_observe(self) -> None:
        """
        The function returned observes into the route's gap histogram, and
        is the same labelled child for every stream of the route.
        """
        metrics = Metrics()
        observe = metrics.gap_observer("chat")
        observe(0.02)
        metrics.gap_observer("chat")(0.2)
        self.assertEqual(observe.__self__, metrics.gap_observer("chat").__self__)  # type: ignore[attr-defined]
        self.assertEqual(
            value(metrics, "aiproxy_stream_chunk_gap_seconds_count", route="chat"), 2.0
        )
        self.assertEqual(
            value(metrics, "aiproxy_stream_chunk_gap_seconds_bucket", route="chat", le="0.025"), 1.0
        )


class SiteTests(SynchronousTestCase):
    """
    L{metrics_site}: C{/metrics} and nothing else.
    """

    def test_path(self) -> None:
        """
        The resource is served at C{/metrics} of a L{MetricsSite}.
        """
        resource = Resource()
        site = metrics_site(Metrics(), resource)
        self.assertIsInstance(site, MetricsSite)
        self.assertIs(site.resource.children[b"metrics"], resource)
        self.assertEqual(list(site.resource.children), [b"metrics"])

    def test_prometheus_resource(self) -> None:
        """
        By default the resource is C{prometheus_client}'s Twisted resource
        (a WSGI resource) over the metrics' own registry.
        """
        site = metrics_site(Metrics())
        self.assertIsInstance(site.resource.children[b"metrics"], WSGIResource)


def monitored(
    testcase: SynchronousTestCase, table: Any, metrics: Metrics | None
) -> tuple[Gateway, ExchangeMonitor]:
    """
    A test L{Gateway} whose exchanges report to a monitor with C{metrics}.
    """
    gateway = Gateway(testcase, table)
    monitor = ExchangeMonitor(gateway.clock, metrics)
    gateway.resource.monitor = monitor
    gateway.resource._no_route.monitor = monitor
    return gateway, monitor


class ExchangeMetricsTests(SynchronousTestCase):
    """
    Exchanges feed the metrics through the monitor.
    """

    def test_stream(self) -> None:
        """
        A stream counts as an active stream while it runs; at its end the
        request, its duration, TTFT (client and upstream), gateway latency,
        each inter-chunk gap and the tokens are counted.
        """
        metrics = Metrics()
        gateway, monitor = monitored(self, make_table({"streaming_flush_interval_ms": 0}), metrics)
        gateway.send(CHAT_STREAM)
        gateway.clock.advance(0.25)
        upstream = gateway.answer(stream_response())
        self.assertEqual(value(metrics, "aiproxy_active_streams"), 1.0)
        self.assertEqual(value(metrics, "aiproxy_in_flight_requests"), 1.0)
        gateway.clock.advance(0.25)
        upstream.data(delta("Hel"))
        gateway.clock.advance(0.1)
        upstream.data(delta("lo"))
        gateway.clock.advance(0.3)
        upstream.data(USAGE + DONE)
        gateway.clock.advance(0.35)
        upstream.end()
        self.assertTrue(gateway.response().complete)
        self.assertEqual(value(metrics, "aiproxy_active_streams"), 0.0)
        self.assertEqual(value(metrics, "aiproxy_in_flight_requests"), 0.0)
        self.assertEqual(requests_total(metrics, "200", "ai_stream"), 1.0)
        self.assertAlmostEqual(
            value(
                metrics,
                "aiproxy_request_duration_seconds_sum",
                route="chat",
                request_type="ai_stream",
            ),
            1.25,
        )
        self.assertAlmostEqual(value(metrics, "aiproxy_ttft_seconds_sum", route="chat"), 0.5)
        self.assertAlmostEqual(
            value(metrics, "aiproxy_upstream_ttft_seconds_sum", route="chat"), 0.5
        )
        self.assertEqual(value(metrics, "aiproxy_gateway_latency_seconds_sum", route="chat"), 0.0)
        self.assertEqual(
            value(metrics, "aiproxy_stream_chunk_gap_seconds_count", route="chat"), 2.0
        )
        self.assertAlmostEqual(
            value(metrics, "aiproxy_stream_chunk_gap_seconds_sum", route="chat"), 0.4
        )
        self.assertEqual(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="prompt"), 7.0
        )
        self.assertEqual(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="completion"), 3.0
        )
        self.assertEqual(monitor.in_flight, {})

    def test_non_stream(self) -> None:
        """
        A non-streamed answer is counted as C{ai_chat} without TTFT or gaps.
        """
        metrics = Metrics()
        gateway, _ = monitored(self, make_table(), metrics)
        gateway.send(CHAT)
        body = (
            b'{"model":"gpt-test-0","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
        )
        upstream = gateway.answer(json_response(body))
        upstream.data(body)
        upstream.end()
        self.assertEqual(requests_total(metrics, "200", "ai_chat"), 1.0)
        self.assertIsNone(value(metrics, "aiproxy_ttft_seconds_count", route="chat"))
        self.assertIsNone(value(metrics, "aiproxy_stream_chunk_gap_seconds_count", route="chat"))
        self.assertEqual(
            value(metrics, "aiproxy_tokens_total", model="gpt-test", type="completion"), 2.0
        )

    def test_client_disconnect(self) -> None:
        """
        A client leaving mid-stream counts as a 499 and a
        C{client_disconnect} abort, and the stream is no longer active.
        """
        metrics = Metrics()
        gateway, _ = monitored(self, make_table({"streaming_flush_interval_ms": 0}), metrics)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        gateway.disconnect()
        self.assertEqual(value(metrics, "aiproxy_aborts_total", reason="client_disconnect"), 1.0)
        self.assertEqual(value(metrics, "aiproxy_active_streams"), 0.0)
        self.assertEqual(requests_total(metrics, "499", "ai_stream"), 1.0)

    def test_no_route(self) -> None:
        """
        A 404 is counted.
        """
        metrics = Metrics()
        gateway, _ = monitored(self, make_table(), metrics)
        gateway.send(CHAT, path=b"/nowhere")
        self.assertEqual(gateway.response().status, 404)
        self.assertEqual(requests_total(metrics, "404", "", route="", instance=""), 1.0)

    def test_head_refusals(self) -> None:
        """
        The listener's refusals of a request head (414, 431, 400) are
        counted as requests of no route, and their reasons as aborts, like
        a 404.
        """
        metrics = Metrics()
        gateway, _ = monitored(self, make_table(), metrics)
        for data in (
            request_bytes(path=b"/v1/chat/completions?" + b"a" * 20000),
            request_bytes(headers={b"x-big": b"a" * 20000}),
            b"GARBAGE\r\n\r\n",
        ):
            gateway.connect()
            gateway.channel.dataReceived(data)
        for status in ("414", "431", "400"):
            self.assertEqual(
                requests_total(metrics, status, "", route="", instance=""), 1.0, status
            )
        for reason in ("request_line_too_long", "request_headers_too_large", "bad_request"):
            self.assertEqual(value(metrics, "aiproxy_aborts_total", reason=reason), 1.0, reason)

    def test_metrics_off_hot_path(self) -> None:
        """
        Without metrics the exchange relays through the plain stream relay
        (no per-chunk timing) and records no timings, yet the monitor still
        tracks it.
        """
        gateway, monitor = monitored(self, make_table(), None)
        upstream = gateway.stream()
        upstream.data(delta("a"))
        [exchange] = list(monitor.in_flight)
        self.assertIs(type(upstream.protocol), StreamRelay)
        self.assertIsNone(exchange.timings.first_chunk)
        upstream.data(DONE)
        upstream.end()
        self.assertEqual(monitor.in_flight, {})

    def test_metrics_on_timed_handler(self) -> None:
        """
        With metrics the exchange relays through the timed stream relay,
        which times the first chunk.
        """
        gateway, monitor = monitored(self, make_table(), Metrics())
        upstream = gateway.stream()
        [exchange] = list(monitor.in_flight)
        self.assertIsInstance(upstream.protocol, TimedStreamRelay)
        upstream.data(delta("a"))
        self.assertEqual(exchange.timings.first_chunk, gateway.clock.seconds())


class AccessRecordTests(SynchronousTestCase):
    """
    The access record's upstream attempts and the route's C{logging}
    extras (APISIX's C{llm_summary}, C{llm_request}, C{llm_response_text}).
    """

    def stream(self, gateway: Gateway) -> None:
        gateway.send(CHAT_STREAM, headers={b"authorization": b"Bearer client-secret"})
        upstream = gateway.answer(stream_response())
        gateway.clock.advance(0.25)
        upstream.data(delta("Hel"), delta("lo"), USAGE, DONE)
        upstream.end()

    def test_attempts(self) -> None:
        """
        One attempt: the instance, the upstream's status and the time from
        sending the request to the end.
        """
        gateway = Gateway(self, make_table())
        self.stream(gateway)
        self.assertEqual(
            gateway.record["attempts"],
            [{"instance": "ai-proxy-openai", "status": 200, "duration_ms": 250}],
        )

    def test_attempt_without_response(self) -> None:
        """
        An upstream that never answered has an attempt without status.
        """
        gateway = Gateway(self, make_table())
        gateway.send(CHAT)
        gateway.upstream.deferred.errback(ConnectionRefusedError())
        self.assertEqual(gateway.record["attempts"][0]["status"], None)
        self.assertEqual(gateway.record["status"], 502)

    def test_no_attempt(self) -> None:
        """
        A request refused before the upstream call has no attempt.
        """
        gateway = Gateway(self, make_table())
        gateway.send(b"not json")
        self.assertEqual(gateway.record["attempts"], [])

    def test_off_by_default(self) -> None:
        """
        Without C{logging} options neither summary nor payloads are logged.
        """
        gateway = Gateway(self, make_table())
        self.stream(gateway)
        for key in ("llm_summary", "llm_request", "llm_response_text"):
            self.assertNotIn(key, gateway.record)

    def test_summaries(self) -> None:
        """
        C{logging.summaries} adds C{llm_summary}: model, duration, tokens.
        """
        gateway = Gateway(self, make_table({"logging": {"summaries": True}}))
        self.stream(gateway)
        self.assertEqual(
            gateway.record["llm_summary"],
            {
                "model": "gpt-test",
                "duration": 250,
                "prompt_tokens": 7,
                "completion_tokens": 3,
                "total_tokens": 10,
                "upstream_response_time": 250,
                "stream": True,
            },
        )
        self.assertNotIn("llm_request", gateway.record)

    def test_payloads(self) -> None:
        """
        C{logging.payloads} adds the conversation and the streamed answer's
        text, never a credential (the route's key or the client's
        C{Authorization}).
        """
        gateway = Gateway(self, make_table({"logging": {"payloads": True}}))
        self.stream(gateway)
        record = gateway.record
        self.assertEqual(
            record["llm_request"],
            {"model": "gpt-test", "messages": CHAT["messages"], "stream": True},
        )
        self.assertEqual(record["llm_response_text"], {"content": "Hello"})
        self.assertNotIn("llm_summary", record)
        text = json.dumps(record)
        self.assertNotIn(API_KEY, text)
        self.assertNotIn("client-secret", text)
