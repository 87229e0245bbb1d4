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

``GET /events`` is also routed to it by a pure ASGI fast path (``EventsFastPath``)
ahead of FastAPI's router, whose per-request state (exit stacks, dependency
results) would otherwise stay alive for the whole life of each stream; the
FastAPI route stays for the OpenAPI schema and runs the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
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


class EventsFastPath:
    """``GET /events`` straight to the stream, without FastAPI's per-request state."""

    def __init__(self, app: ASGIApp, handler: EventsHandler, route: Any = None) -> None:
        self.app = app
        self.handler = handler
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/events" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
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
        if self.route is not None:
            scope["route"] = self.route  # for the request metrics' route label
        response = self.handler(keys, last_event_id, header)
        await response(scope, receive, send)
