"""Helpers of the api_server tests: a real api_server process, a raw SSE client,
commits made with kv_updater's own Committer, and the KV read back for checks.

Nothing here mocks Redis or the server: the server is ``python -m api_server``
on a free port, clients speak HTTP/1.1 over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
from harness import Service, free_port, wait_until

from kv_updater.commit import Committer
from kv_updater.keys import KeyLayout
from kv_updater.message import Accepted, MessageRules, render_event

LAYOUT = KeyLayout()
STORED_CHANNEL = "update:stored"
RULES = MessageRules(LAYOUT)
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------- the server ----
class Api:
    """A running api_server process and its base URL."""

    def __init__(self, service: Service, port: int) -> None:
        self.service = service
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base + path, timeout=10, **kwargs)

    def get_options(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.options(self.base + path, timeout=10, **kwargs)

    def stats(self, collect: bool = False, token: str | None = None) -> dict[str, Any]:
        params = {"collect": "true"} if collect else {}
        if token:
            params["token"] = token
        data: dict[str, Any] = self.get("/stats", params=params).json()
        return data

    def metric(self, name: str, token: str | None = None) -> float:
        """The value of an unlabelled metric from /metrics."""
        text = self.get("/metrics", params={"token": token} if token else {}).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")


def api_args(redis_url: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    return ["--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(port), *extra]


@contextlib.contextmanager
def running_api(
    redis_url: str, extra: Sequence[str] = (), env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Iterator[Api]:
    port = free_port()
    with Service("api_server", api_args(redis_url, port, extra), env) as svc:
        api = Api(svc, port)

        def answers() -> bool:
            if svc.proc is not None and svc.proc.poll() is not None:
                raise AssertionError(f"api_server exited {svc.proc.returncode}:\n{svc.log}")
            try:
                path = "/ready" if wait_ready else "/live"
                return api.get(path).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answers, 20, 0.05, "api_server to answer")
        yield api


# ---------------------------------------------------------------- commits ----
def message(type_: str, n: int, pad: int = 0, **values: Any) -> Accepted:
    """An accepted message of ``type_``; ``n`` orders its ``updated`` instant."""
    updated = (_EPOCH + timedelta(microseconds=n)).isoformat().replace("+00:00", "Z")
    doc = {"type": type_, "updated": updated, "values": {"n": n, "pad": "x" * pad, **values}}
    parsed = RULES.parse(json.dumps(doc).encode())
    assert isinstance(parsed, Accepted), parsed
    return parsed


@dataclass
class CommitLog:
    """Every commit made by a test: seq -> (type, commit JSON)."""

    by_seq: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    counter: int = 0

    def next_n(self) -> int:
        self.counter += 1
        return self.counter


class Writer:
    """Commits through kv_updater.commit.Committer, as the updater would."""

    def __init__(self, redis_url: str, log: CommitLog | None = None) -> None:
        self.client = aioredis.Redis.from_url(redis_url)
        self.committer = Committer(self.client, LAYOUT, STORED_CHANNEL, validate=False)
        self.log = log or CommitLog()

    async def commit(self, batch: list[Accepted]) -> list[int]:
        outcome = await self.committer.commit(batch)
        for msg, seq in zip(batch, outcome.statuses, strict=True):
            if seq > 0:
                self.log.by_seq[seq] = (msg.type, render_event(msg.type_json, msg.stored, seq))
        return outcome.statuses

    async def put(self, type_: str, pad: int = 0, **values: Any) -> int:
        statuses = await self.commit([message(type_, self.log.next_n(), pad, **values)])
        return statuses[0]

    async def close(self) -> None:
        self.committer.close()
        await self.client.aclose()


async def commit_types(
    redis_url: str, types: Sequence[str], log: CommitLog | None = None
) -> CommitLog:
    """One commit per type, in one atomic batch."""
    writer = Writer(redis_url, log)
    try:
        await writer.commit([message(t, writer.log.next_n()) for t in types])
    finally:
        await writer.close()
    return writer.log


def commit_sync(redis_url: str, types: Sequence[str], log: CommitLog | None = None) -> CommitLog:
    """commit_types from synchronous test code."""
    return asyncio.run(commit_types(redis_url, types, log))


def kv_state(r: redis.Redis, types: frozenset[str] | None = None) -> dict[str, dict[str, Any]]:
    """What the KV holds now, as commit documents keyed by type (index members only)."""
    state: dict[str, dict[str, Any]] = {}
    pairs: list[Any] = r.zrange(LAYOUT.index, 0, -1, withscores=True)
    for name, score in pairs:
        type_ = name.decode()
        if types is not None and type_ not in types:
            continue
        stored: Any = r.get(LAYOUT.data_key(type_))
        assert isinstance(stored, bytes)
        state[type_] = json.loads(render_event(json.dumps(type_).encode(), stored, int(score)))
    return state


# ---------------------------------------------------------------- SSE client ----
@dataclass
class SseEvent:
    event: str
    id: int | None
    data: str


class SseStream:
    """A raw HTTP/1.1 SSE client: chunked decoding and SSE parsing, nothing hidden."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.comments = 0
        self.retry: int | None = None
        self.ended = False
        self._buffer = b""
        self._chunked = False

    @classmethod
    async def open(
        cls, port: int, path: str = "/events", headers: dict[str, str] | None = None,
        rcvbuf: int | None = None, method: str = "GET", limit: int = 2**22,
    ) -> SseStream:
        """Connect and read the response head.  ``rcvbuf`` and ``limit`` (the reader's
        buffer: asyncio stops reading the socket at twice this) make a slow reader."""
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        stream = cls(reader, writer)
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                 "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        stream.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                stream.headers[k.strip().lower()] = v.strip()
        stream._chunked = stream.headers.get("transfer-encoding") == "chunked"
        if not stream._chunked and "content-length" in stream.headers:
            stream.body = await reader.readexactly(int(stream.headers["content-length"]))
            stream.ended = True
        return stream

    async def _read_more(self) -> bool:
        if self.ended:
            return False
        try:
            if self._chunked:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    self.ended = True
                    return False
                data = await self.reader.readexactly(size + 2)
                self._buffer += data[:-2]
            else:
                data = await self.reader.read(65536)
                if not data:
                    self.ended = True
                    return False
                self._buffer += data
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended = True
            return False
        return True

    async def next_event(self) -> SseEvent | None:
        """The next update event (comments and retry fields are counted), None at EOF."""
        while True:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
            while b"\n\n" in self._buffer:
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                event = self._parse(block.decode())
                if event is not None:
                    return event
            if not await self._read_more():
                return None

    def _parse(self, block: str) -> SseEvent | None:
        name, ident, data = "message", None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments += 1
                continue
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "id":
                ident = int(value)
            elif key == "data":
                data.append(value)
            elif key == "retry":
                self.retry = int(value)
        if not data:
            return None
        return SseEvent(name, ident, "\n".join(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        """Close and let the loop actually send the FIN (before any blocking wait)."""
        self.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@dataclass
class Follower:
    """Reads a stream into a state, checking the wire rules on every event."""

    stream: SseStream
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)
    raw: dict[int, str] = field(default_factory=dict)

    def apply(self, event: SseEvent) -> None:
        assert event.event == "update", event
        assert event.id is not None, "an update without id"
        assert not self.ids or event.id > self.ids[-1], (
            f"id {event.id} after {self.ids[-1]}: ids must strictly increase"
        )
        doc = json.loads(event.data)
        assert doc["seq"] == event.id, (doc, event.id)
        self.ids.append(event.id)
        self.raw[event.id] = event.data
        self.state[doc["type"]] = doc

    @property
    def last_id(self) -> int:
        return self.ids[-1] if self.ids else 0

    async def read_until(self, done: Any, within: float = 20.0) -> None:
        """Apply events until ``done(self)`` holds; fail after ``within`` s."""
        deadline = time.monotonic() + within
        while not done(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"stream did not reach the expected state in {within} s")
            try:
                event = await asyncio.wait_for(self.stream.next_event(), left)
            except TimeoutError:
                continue
            if event is None:
                raise AssertionError("stream ended early")
            self.apply(event)


async def until(predicate: Any, within: float = 10.0, message: str = "condition") -> Any:
    """wait_until for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {message}")
        await asyncio.sleep(0.02)


def check_against_log(follower: Follower, log: CommitLog) -> None:
    """Every event a client got is exactly the commit of that seq."""
    for seq, data in follower.raw.items():
        assert seq in log.by_seq, f"event {seq} is no commit of this test"
        assert data.encode() == log.by_seq[seq][1], f"event {seq} differs from its commit"


@contextlib.contextmanager
def persistent_redis() -> Iterator[Any]:
    """A Redis of the test's own that keeps its data across a restart (AOF on)."""
    from harness import chosen_backend, dispose, make_redis

    backend = chosen_backend()
    if backend == "external":
        import pytest

        pytest.skip("an external TEST_REDIS_URL cannot be restarted")
    server = make_redis(backend, ["--appendonly", "yes", "--appendfsync", "always"])
    try:
        yield server
    finally:
        dispose(server)
