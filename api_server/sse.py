"""The SSE response of /events: sse-starlette's EventSourceResponse, lean per client.

``EventSourceResponse`` runs four tasks per stream (body, ping, exit-signal watch,
disconnect watch) under an anyio task group; measured on uvicorn that is ~37 KB of
server memory per idle client behind a FastAPI route, against ~9 KB for a bare
ASGI stream.  DESIGN.md allows 20 KB per idle client at 10,000 clients, so this
subclass keeps sse-starlette's headers and HEAD handling but streams with one
extra task only:

- the body is written from the request's own task;
- keep-alives come from the hub (one timer for all clients), not a task each;
- shutdown is the hub closing every client (api_server.__main__ hooks uvicorn's
  exit signal), not a watcher per stream;
- one small task waits for ``http.disconnect`` so a client that goes away is
  unregistered at once, even when nothing is being published.

``GET /events`` is also routed to it by a pure ASGI fast path (``FastPaths``)
ahead of FastAPI's router, whose per-request state (exit stacks, dependency
results) would otherwise stay alive for the whole life of each stream; the
FastAPI route stays for the OpenAPI schema and runs the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api_server.hub import Hub
from api_server.stream import Client


class HubEventSource(EventSourceResponse):
    def __init__(self, hub: Hub, client: Client) -> None:
        self.events = hub.stream(client)
        super().__init__(self.events, ping=0)
        self.hub = hub
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "HEAD":
            self.hub.unregister(self.client)
            await super().__call__(scope, receive, send)  # headers only, no stream
            return
        client = self.client
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, client))
        body = self.events
        try:
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(Exception):
                await body.aclose()
            self.hub.unregister(client)


async def _watch_disconnect(receive: Receive, client: Client) -> None:
    while not client.closed:
        message = await receive()
        if message["type"] == "http.disconnect":
            client.closed = True
            client.wake()
            return


EventsHandler = Callable[[list[str], str | None, str | None], Response]
ReadHandler = Callable[[str, str | None], Awaitable[Response]]


class FastPaths:
    """The hot routes straight to their handlers, ahead of FastAPI's router.

    ``GET /events``: FastAPI's per-request state (exit stacks, dependency results)
    would otherwise stay alive for the whole life of each stream.  ``GET
    /keys/{type}`` and ``/key/{type}``: dependency solving costs more than the
    read itself.  The FastAPI routes stay for the OpenAPI schema (and any other
    method) and run the same handlers; this only skips the routing machinery.
    """

    def __init__(
        self, app: ASGIApp, events: EventsHandler, read: ReadHandler,
        routes: dict[str, Any],
    ) -> None:
        self.app = app
        self.events = events
        self.read = read
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            if path == "/events":
                await self._events(scope, receive, send)
                return
            for prefix in ("/keys/", "/key/"):
                if path.startswith(prefix):
                    name = path[len(prefix):]
                    if name and "/" not in name:
                        await self._read(prefix, name, scope, receive, send)
                        return
        await self.app(scope, receive, send)

    async def _read(self, prefix: str, name: str, scope: Scope, receive: Receive,
                    send: Send) -> None:
        scope["route"] = self.routes.get(prefix)
        etag: str | None = None
        for key, value in scope["headers"]:
            if key == b"if-none-match":
                etag = value.decode("latin-1")
        response = await self.read(name, etag)
        await response(scope, receive, send)

    async def _events(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys: list[str] = []
        last_event_id: str | None = None
        query: bytes = scope.get("query_string", b"")
        if query:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if name == "keys":
                    keys.append(value)
                elif name == "last_event_id":
                    last_event_id = value
        header: str | None = None
        for name, value in scope["headers"]:
            if name == b"last-event-id":
                header = value.decode("latin-1")
        scope["route"] = self.routes.get("/events")
        response = self.events(keys, last_event_id, header)
        await response(scope, receive, send)
