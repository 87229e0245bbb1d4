"""Prometheus metrics of the API server.

Request counts and latency come from a pure ASGI middleware labelled by route
template (never the raw path: bounded label values).  For ``/events`` the latency
is the time to the response headers, not the life of the stream.  The SSE
counters are plain integers on the hub, bumped per client per event, and read
only when /metrics is scraped (a Prometheus Counter would take a lock each time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_server.hub import Hub

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterable[Metric]:
        hub = self.hub
        yield GaugeMetricFamily("api_sse_clients", "Open SSE streams", value=hub.count)
        yield GaugeMetricFamily(
            "api_subscription_up", "1 when the commit subscription is live",
            value=1 if hub.subscribed else 0,
        )
        counters = (
            ("api_sse_events_sent", "Update events written to SSE clients", hub.events_sent),
            ("api_sse_snapshot_events", "Of those, sent from snapshot reads", hub.snapshot_events),
            ("api_sse_events_pushed",
             "Of those, written by the hub straight to the socket (no task wake-up)",
             hub.events_pushed),
            ("api_sse_flushes",
             "Rounds of writes to the clients (commits that arrive together share one)",
             hub.flushes),
            ("api_sse_values_conflated",
             "Pending values replaced by a newer commit of the same key (slow clients)",
             hub.conflated),
            ("api_commits_received", "Commit notifications received", hub.messages),
            ("api_commits_ignored", "Notifications that were not commits", hub.ignored),
            ("api_redis_reconnects", "Subscriptions re-opened after Redis was lost",
             hub.reconnects),
            ("api_redis_outages", "Times Redis became unavailable", hub.outage.outages),
            ("api_sse_resyncs", "Times every stream re-read its state from Redis", hub.resyncs),
            ("api_sse_closed_on_reset",
             "Streams ended because the commit sequence went back (Redis lost its data)",
             hub.streams_closed_on_reset),
            ("api_sse_closed_stalled",
             "Streams ended because the client took no bytes for sse_stall_timeout",
             hub.streams_closed_stalled),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "api_asyncio_tasks", "asyncio tasks alive in the server",
            value=len(asyncio.all_tasks()),
        )


class Metrics:
    def __init__(self, hub: Hub) -> None:
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.registry.register(HubCollector(hub))
        self.requests = Counter(
            "api_http_requests", "HTTP requests by route, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "api_http_request_duration_seconds",
            "Time to the response headers, by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )


def route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestMetrics:
    """Counts every HTTP request by route, method and status, and times it to its
    response headers.

    The labelled children are kept in dicts: ``labels()`` costs more than the
    increment itself (it builds and checks the label tuple under a lock), and on
    the read path it was about 7% of the server's CPU.  The label sets stay small:
    routes are the app's own (or "unmatched"), methods are the ones the HTTP
    parser knows, statuses are the app's.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._latency: dict[str, Any] = {}
        self._requests: dict[tuple[str, str, int], Any] = {}

    def _observe(self, route: str, seconds: float) -> None:
        child = self._latency.get(route)
        if child is None:
            child = self._latency[route] = self.metrics.latency.labels(route)
        child.observe(seconds)

    def _count(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.requests.labels(route, method, str(status))
        child.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self._observe(route_of(scope), time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self._count(route_of(scope), scope["method"], status)
