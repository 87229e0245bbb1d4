"""The FastAPI application: routes, middleware and the hub's lifespan.

Routes are DESIGN.md's table.  Reads answer the stored bytes spliced by
kv_updater.message.render_event (no JSON round trip); errors are JSON
``{"detail": ...}`` and never carry a stack trace.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Header, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from api_server.auth import TokenGuard, token_from
from api_server.hub import Hub
from api_server.metrics import Metrics, RequestMetrics
from api_server.settings import ApiSettings
from api_server.sse import SERVER_SEND, FastPaths, HubEventSource
from api_server.store import Store
from api_server.stream import Client
from kv_updater.logs import RateLimitedLog
from kv_updater.message import render_event

log = logging.getLogger("api_server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_FILTER_KEYS = 1_000
READY_TIMEOUT = 1.0


class StoredValue(BaseModel):
    """What GET /keys/{type} answers (documentation only: the body is spliced bytes)."""

    type: str
    updated: str
    valid: str | None
    values: dict[str, Any]
    seq: int


class KeyEntry(BaseModel):
    type: str
    seq: int


class KeyList(BaseModel):
    keys: list[KeyEntry]


class Problem(BaseModel):
    detail: str


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def make_redis(settings: ApiSettings) -> aioredis.Redis:
    """The read client: a bounded pool, so 10,000 streams opening at once queue for
    connections instead of opening 10,000 of them."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=10,
        socket_timeout=5,
        socket_connect_timeout=2,
        client_name="api-server",
    )
    return aioredis.Redis(connection_pool=pool)


class ApiApp(FastAPI):
    """FastAPI, keeping the server's own ``send`` in the scope of /events for the
    hub's direct writes (see api_server.sse)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/events":
            scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(settings: ApiSettings, static_dir: Path = STATIC_DIR) -> FastAPI:
    client = make_redis(settings)
    probe = aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=READY_TIMEOUT, socket_connect_timeout=READY_TIMEOUT,
        client_name="api-server-probe", max_connections=4,
    )
    store = Store(client, settings.layout, probe, url=settings.redis_url)
    # An outage under load must not write one ERROR per request.
    errors = RateLimitedLog(log, burst=1, interval=10.0, what="Redis errors")
    rules = settings.type_rules()
    hub = Hub(
        store,
        rules,
        settings.redis_url,
        settings.stored_channel,
        max_clients=settings.max_sse_clients,
        keepalive=settings.keepalive_seconds,
        flush_interval=settings.sse_flush_ms / 1000,
        stall_timeout=settings.sse_stall_timeout,
    )
    metrics = Metrics(hub)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.start()
        # What start-up built lives for good: keep it out of every GC pass, which
        # otherwise scans it again and again while thousands of streams run.
        gc.freeze()
        try:
            yield
        finally:
            await hub.stop()
            store.close()
            await client.aclose()
            await probe.aclose()

    app = ApiApp(
        title="api_server",
        summary="REST reads of the Redis KV and an SSE stream of its commits",
        version="0.1.0",
        docs_url=None,
        lifespan=lifespan,
    )
    app.state.hub = hub

    @app.exception_handler(RedisError)
    async def _redis_down(request: Request, exc: RedisError) -> JSONResponse:
        errors.log(logging.ERROR, "Redis error serving %s: %s", request.url.path, exc)
        return _json(503, "Redis unavailable")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return _json(500, "internal error")

    async def read_value(type_: str, if_none_match: str | None) -> Response:
        # The pattern and the namespace are checked before Redis is touched.
        type_json = rules.type_json(type_)
        if type_json is None:
            return _json(404, "unknown key")
        try:
            stored = await store.get(type_)
        except RedisError as exc:  # answered here: the fast path has no handlers
            errors.log(logging.ERROR, "Redis error reading %r: %s", type_, exc)
            return _json(503, "Redis unavailable")
        if stored is None:
            return _json(404, "unknown key")
        etag = f'"{stored.seq}"'
        if if_none_match == etag:
            return Response(status_code=304, headers={"ETag": etag})
        body = render_event(type_json, stored.value, stored.seq)
        return Response(body, media_type="application/json", headers={"ETag": etag})

    def open_events(keys: list[str], last_event_id: str | None, header: str | None) -> Response:
        """Validate an /events request and register its client (the limit is exact:
        registration happens here, before any await)."""
        types: frozenset[str] | None = None
        names = {n.strip() for item in keys for n in item.split(",") if n.strip()}
        if names:
            if len(names) > MAX_FILTER_KEYS:
                return _json(400, f"at most {MAX_FILTER_KEYS} keys in a filter")
            bad = sorted(n for n in names if not rules.type_allowed(n))
            if bad:
                return _json(400, f"not a valid key name: {bad[0][:200]!r}")
            types = frozenset(names)
        # The header wins: a browser reconnecting keeps the URL it started with.
        raw_id = (header if header is not None else last_event_id or "").strip()
        since = 0
        if raw_id:
            if not raw_id.isdigit():
                return _json(400, "Last-Event-ID must be a commit seq (an integer)")
            since = int(raw_id)
        client = Client(types, since)
        if not hub.register(client):
            return _json(503, "too many SSE clients", {"Retry-After": "5"})
        return HubEventSource(hub, client)

    value_doc: dict[int | str, dict[str, Any]] = {
        200: {"model": StoredValue, "description": "the stored value, its type and seq"},
        404: {"model": Problem, "description": "not a key the updater wrote"},
    }

    @app.get("/keys", response_model=KeyList, tags=["keys"])
    async def list_keys() -> Response:
        """Every key the updater wrote, with the seq of its last commit (oldest first)."""
        pairs = await store.index()
        body = orjson.dumps({"keys": [{"type": t, "seq": s} for t, s in pairs]})
        return Response(body, media_type="application/json")

    @app.get("/keys/{type}", responses=value_doc, tags=["keys"])
    async def get_key(
        type: str, if_none_match: Annotated[str | None, Header()] = None
    ) -> Response:
        """The stored value plus ``type`` and ``seq`` (``ETag`` is the seq)."""
        return await read_value(type, if_none_match)

    @app.get("/key/{type}", responses=value_doc, tags=["keys"])
    async def get_key_legacy(
        type: str, if_none_match: Annotated[str | None, Header()] = None
    ) -> Response:
        """Same as /keys/{type}: the original API server's route."""
        return await read_value(type, if_none_match)

    @app.get(
        "/events",
        tags=["stream"],
        response_class=EventSourceResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "SSE stream"},
            400: {"model": Problem},
            503: {"model": Problem, "description": "at max_sse_clients"},
        },
    )
    async def events(
        keys: Annotated[
            list[str] | None, Query(description="types to stream: comma-separated or repeated")
        ] = None,
        last_event_id: Annotated[
            str | None, Query(description="resume after this seq (when no header can be set)")
        ] = None,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Response:
        """SSE: the current value of every (filtered) key, then live commits.

        Every event is ``event: update``, ``id: <seq>``, ``data: <commit JSON>``.
        With a Last-Event-ID (the header wins over the query) only keys committed
        after it are sent first.  Ids strictly increase; a slow client gets the
        newest value of each key rather than every intermediate one.
        """
        return open_events(keys or [], last_event_id, last_event_id_header)

    @app.get("/live", tags=["health"])
    async def live() -> dict[str, str]:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get("/ready", tags=["health"], responses={503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        """Readiness: Redis answers and the commit subscription is alive."""
        redis_ok = False
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                redis_ok = await store.ping()
        except (RedisError, OSError, TimeoutError):
            redis_ok = False
        ok = redis_ok and hub.subscribed
        body = {"status": "ok" if ok else "unavailable", "redis": redis_ok,
                "subscription": hub.subscribed}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats", tags=["health"])
    async def stats(collect: bool = False) -> dict[str, Any]:
        """Internal figures for leak checks: clients, tasks, memory (``collect`` runs gc)."""
        if collect:
            gc.collect()
        return {
            "clients": hub.count,
            "pending_values": hub.pending_values(),
            "tasks": len(asyncio.all_tasks()),
            "rss_bytes": _rss_bytes(),
            "allocated_blocks": sys.getallocatedblocks(),
            "events_sent": hub.events_sent,
            "events_pushed": hub.events_pushed,
            "flushes": hub.flushes,
            "streams_closed_stalled": hub.streams_closed_stalled,
            "snapshot_events": hub.snapshot_events,
            "values_conflated": hub.conflated,
            "commits_received": hub.messages,
            "subscribed": hub.subscribed,
            "generation": hub.generation,
        }

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        index = static_dir / "index.html"
        if not index.is_file():
            return _json(404, "the dashboard is not installed")
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        # With an api_token the page must fetch the schema with it too.
        token = token_from(request.scope)
        url = app.openapi_url or "/openapi.json"
        if token is not None and request.query_params.get("token") is not None:
            url += "?token=" + quote(token.decode("latin-1"), safe="")
        return get_swagger_ui_html(openapi_url=url, title="api_server - docs")

    if static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=static_dir), name="static")

    # Outermost first at run time: metrics, CORS (so preflights and 401s carry
    # CORS headers), the token guard, then the /events fast path.
    paths = {getattr(r, "path", None): r for r in app.routes}
    app.add_middleware(
        FastPaths, events=open_events, read=read_value,
        routes={"/events": paths["/events"], "/keys/": paths["/keys/{type}"],
                "/key/": paths["/key/{type}"]},
    )
    if settings.token:
        app.add_middleware(TokenGuard, token=settings.token)
    if settings.origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.origins,
            allow_methods=["GET", "HEAD", "OPTIONS"],
            allow_headers=["Authorization", "Last-Event-ID", "Cache-Control", "If-None-Match"],
            expose_headers=["ETag"],
            max_age=600,
        )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
