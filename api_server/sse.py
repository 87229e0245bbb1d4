"""The SSE response of /events: sse-starlette's EventSourceResponse, lean per client.

``EventSourceResponse`` runs four tasks per stream (body, ping, exit-signal watch,
disconnect watch) under an anyio task group; measured on uvicorn that is ~37 KB of
server memory per idle client behind a FastAPI route, against ~9 KB for a bare
ASGI stream.  DESIGN.md allows 20 KB per idle client at 10,000 clients, so this
subclass keeps sse-starlette's headers (the route is GET only: HEAD is 405) but
streams with one extra task only:

- the body is written from the request's own task;
- keep-alives come from the hub (one timer for all clients), not a task each;
- shutdown is the hub closing every client (api_server.__main__ hooks uvicorn's
  exit signal), not a watcher per stream;
- one small task waits for ``http.disconnect`` so a client that goes away is
  unregistered at once, even when nothing is being published;
- live commits and keep-alives are written by the hub itself, straight on the
  connection's transport, while the client's task stays parked (``Client.push``).

That last point goes below ASGI on purpose.  Measured with 100 clients at 1,000
commits/s, waking each client's task to pass its bytes down the ASGI ``send``
chain (a future, a task step, a generator resume, three send wrappers) cost as
much CPU as the ``write`` system call itself, and the CPU is what the latency
waits for on a busy machine.  ``uvicorn_body_writer`` recognises uvicorn's
httptools connection (the server ``python -m api_server`` runs) and writes the
body chunks exactly as its ``send`` would (chunked framing, its flow control and
disconnect flags).  Under any other server, or if uvicorn's internals change,
it answers None and every byte goes through ``send`` as before;
tests/test_api_sse.py checks that the direct path is the one in use.

``GET /events`` is also routed to it by a pure ASGI fast path (``FastPaths``)
ahead of FastAPI's router, whose per-request state (exit stacks, dependency
results) would otherwise stay alive for the whole life of each stream; the
FastAPI route stays for the OpenAPI schema and runs the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar
from urllib.parse import parse_qsl

from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api_server.hub import Hub
from api_server.stream import Client, Writer

if sys.platform == "win32":  # no send-queue ioctl: the transport's buffer alone
    _OUTQ: int | None = None
else:
    import fcntl
    import termios

    _OUTQ = termios.TIOCOUTQ
    """ioctl: bytes in a socket's kernel send queue (SIOCOUTQ on Linux)."""

SERVER_SEND = "api_server.server_send"
"""Scope key of the server's own ``send`` (set by ``app.ApiApp``), before middleware wraps
it.  The middleware in between (request metrics, CORS, error handling) only looks at
``http.response.start``, which still goes through all of it."""


class HubEventSource(EventSourceResponse):
    def __init__(self, hub: Hub, client: Client) -> None:
        self.events = hub.stream(client)
        super().__init__(self.events, ping=0)
        self.hub = hub
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.client
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        client.writer = uvicorn_body_writer(scope.get(SERVER_SEND))
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


class _UvicornBody:
    """The body of one chunked uvicorn (httptools) response, written straight on its
    transport, as ``RequestResponseCycle.send`` would write it."""

    __slots__ = ("_closing", "_cycle", "_flow", "_write")
    last: ClassVar[tuple[bytes | None, bytes]] = (None, b"")
    """The last body piece written and its chunk framing."""

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._flow = cycle.flow
        self._write = cycle.transport.write
        self._closing = cycle.transport.is_closing

    def writable(self) -> bool:
        # is_closing: a reset found by a write closes the transport at once, while
        # uvicorn only hears of it (``disconnected``) on the next loop iteration.
        return not (self._flow.write_paused or self._cycle.disconnected or self._closing())

    def buffered(self) -> int:
        # The transport's own buffer only drains when the kernel has a third of its
        # send buffer (up to MBs) free again, seconds apart for a slow reader; the
        # kernel's send queue shrinks with every read of the client.
        transport = self._cycle.transport
        size = int(transport.get_write_buffer_size())
        sock = transport.get_extra_info("socket")
        if sock is not None and _OUTQ is not None:
            with contextlib.suppress(OSError, ValueError):
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
        return size

    def abort(self) -> None:
        # uvicorn's connection_lost then marks the cycle disconnected and resumes
        # writing, so a send waiting for the drain returns.
        self._cycle.transport.abort()

    def write(self, data: bytes) -> None:
        # A commit's frame is one shared object that a flush writes to every client
        # in turn: frame it as an HTTP chunk once, not once per client.  (One
        # tuple, read and replaced whole: safe even with servers in several threads.)
        last = _UvicornBody.last
        if last[0] is data:
            chunk = last[1]
        else:
            chunk = b"%x\r\n%b\r\n" % (len(data), data)
            _UvicornBody.last = (data, chunk)
        try:  # noqa: SIM105 - the hot path: a try is free, suppress() is a context manager
            self._write(chunk)
        except RuntimeError:
            # uvloop raises on a transport it already closed (that same window):
            # the client is gone, uvicorn's disconnect follows; nothing to undo.
            pass


def uvicorn_body_writer(send: Any) -> Writer | None:
    """A direct writer for the response ``send`` belongs to, after its start was sent;
    None unless ``send`` is uvicorn's httptools ``RequestResponseCycle.send`` of a
    chunked response with every attribute this relies on."""
    cycle: Any = getattr(send, "__self__", None)
    if type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl":
        return None
    try:
        usable = (
            cycle.chunked_encoding is True
            and cycle.response_started
            and not cycle.response_complete
            and isinstance(cycle.disconnected, bool)
            and isinstance(cycle.flow.write_paused, bool)
            and callable(cycle.transport.write)
        )
    except AttributeError:
        return None
    return _UvicornBody(cycle) if usable else None


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
