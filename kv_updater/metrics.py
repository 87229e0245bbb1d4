"""The updater's Prometheus metrics and its /metrics, /live, /ready endpoint.

The endpoint runs in a thread with the standard library's WSGI server: probes and
scrapes stay answerable even when the event loop is busy with a burst, and the
hot loop never pays for HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)


class UpdaterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "kvupdater_messages_received", "Messages received on the channel", registry=r
        )
        self.committed = Counter(
            "kvupdater_messages_committed", "Messages written (one seq each)", registry=r
        )
        self.stale = Counter(
            "kvupdater_messages_stale", "Messages older than the stored value", registry=r
        )
        self.unchanged = Counter(
            "kvupdater_messages_unchanged", "Replays identical to the stored value", registry=r
        )
        self.superseded = Counter(
            "kvupdater_messages_superseded",
            "Messages replaced by a later update of the same key in the same atomic batch",
            registry=r,
        )
        self.rejected = Counter(
            "kvupdater_messages_rejected", "Messages rejected, by reason", ["reason"], registry=r
        )
        self.dead_lettered = Counter(
            "kvupdater_dead_letters", "Rejected messages kept in the dead-letter stream", registry=r
        )
        self.validated = Counter(
            "kvupdater_validations", "Written keys read back and found right", registry=r
        )
        self.validation_failures = Counter(
            "kvupdater_validation_failures",
            "Written keys read back holding neither the value nor a newer commit",
            registry=r,
        )
        self.reconnects = Counter(
            "kvupdater_reconnects", "Times the Redis connection was lost and retried", registry=r
        )
        self.batch_size = Histogram(
            "kvupdater_batch_size", "Messages per atomic commit", buckets=BATCH_BUCKETS, registry=r
        )
        self.commit_seconds = Histogram(
            "kvupdater_commit_seconds", "Duration of one batch commit round trip", registry=r
        )
        self.backlog_bytes = Gauge(
            "kvupdater_backlog_bytes", "Bytes received from Redis and not yet parsed", registry=r
        )
        self.ready = Gauge("kvupdater_ready", "1 when subscribed and Redis answers", registry=r)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds must not flood the log


class HealthServer:
    """/metrics, /live and /ready on their own port, in a daemon thread."""

    def __init__(
        self, host: str, port: int, metrics: UpdaterMetrics, is_ready: Callable[[], bool]
    ) -> None:
        metrics_app = make_wsgi_app(metrics.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/live":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            if path == "/ready":
                if is_ready():
                    start_response("200 OK", [("Content-Type", "text/plain")])
                    return [b"ready\n"]
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"not ready\n"]
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]

        self.server: WSGIServer = make_server(host, port, app, handler_class=_QuietHandler)
        self.port = self.server.server_port
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            args=(0.1,),
            name="kv-updater-health",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
