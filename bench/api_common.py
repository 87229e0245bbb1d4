"""Pieces of the api_server benchmarks: the server as a process, commits made with
kv_updater's Committer, lean raw-asyncio clients, and process memory."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis.asyncio as aioredis
from common import free_port, rss_of, start_service, wait_for

from kv_updater.commit import Committer
from kv_updater.keys import KeyLayout
from kv_updater.message import Accepted, MessageRules

RULES = MessageRules(KeyLayout())
_BASE = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def raise_nofile() -> int:
    """Use the hard limit of open files: every client is a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def accepted(type_: str, n: int, pad: int = 0) -> Accepted:
    updated = (_BASE + timedelta(microseconds=n)).isoformat(timespec="microseconds")
    doc = {
        "type": type_,
        "updated": updated.replace("+00:00", "Z"),
        "valid": None,
        "values": {"temperature": 20 + n % 97 / 10, "humidity": 40 + n % 13, "n": n,
                   **({"pad": "x" * pad} if pad else {})},
    }
    parsed = RULES.parse(orjson.dumps(doc))
    assert isinstance(parsed, Accepted), parsed
    return parsed


class Writer:
    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.committer = Committer(self.client, KeyLayout(), "update:stored", validate=False)
        self.n = 0

    async def commit(self, types: Sequence[str], pad: int = 0) -> list[int]:
        batch = []
        for t in types:
            self.n += 1
            batch.append(accepted(t, self.n, pad))
        return (await self.committer.commit(batch)).statuses

    async def close(self) -> None:
        self.committer.close()
        await self.client.aclose()


class ApiProcess:
    """``python -m api_server`` on a free loopback port."""

    def __init__(self, redis_url: str, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "wb")  # noqa: SIM115
        try:
            self.proc = start_service(
                "api_server",
                ["--redis-url", redis_url, "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "WARNING", *extra],
                self.base + "/ready", self.log,
            )
        except BaseException:
            self.log.close()
            raise

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + "/stats", timeout=30) as resp:  # noqa: S310
            data: dict[str, Any] = orjson.loads(resp.read())
            return data

    @property
    def rss(self) -> int:
        return rss_of(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        finally:
            self.log.close()


class Counting(asyncio.Protocol):
    """A lean client: counts occurrences of a marker in what it receives, nothing else.

    The marker is short and never split unnoticed: the last bytes of each read are
    kept and prepended to the next one.
    """

    __slots__ = ("count", "first_byte", "marker", "tail", "transport")
    total = 0
    """Events counted by every client of this process (one add, no summing later)."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.tail = b""
        self.count = 0
        self.first_byte = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
        found = data.count(self.marker)
        self.count += found
        Counting.total += found
        self.tail = data[-(len(self.marker) - 1):]
        if not self.first_byte.done():
            self.first_byte.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first_byte.done():
            self.first_byte.set_result(None)


SSE_MARKER = b"\nid: "
REDIS_MARKER = b"message\r\n"
SUBSCRIBE = b"*2\r\n$9\r\nSUBSCRIBE\r\n$13\r\nupdate:stored\r\n"


class ClientFleet:
    """N lean clients in a process of their own, so that receiving never slows the
    code that makes the load; the total count is shared through a ``Value``.

    ``path`` None: raw Redis pub/sub subscribers of the stored channel on ``port``.
    """

    def __init__(self, port: int, n: int, path: str | None) -> None:
        ctx = mp.get_context("spawn")
        self.total = ctx.Value("q", 0, lock=False)
        self.connected = ctx.Value("q", 0, lock=False)
        self.stop_event = ctx.Event()
        self.proc = ctx.Process(
            target=_fleet_main,
            args=(port, n, path, self.total, self.connected, self.stop_event),
            daemon=True,
        )
        self.proc.start()
        self.n = n

    def wait_connected(self, within: float = 120.0) -> None:
        wait_for(lambda: self.connected.value >= self.n or not self.proc.is_alive(),
                 within, "every client to connect", interval=0.05)
        if self.connected.value < self.n:
            raise RuntimeError(f"client fleet died after {self.connected.value} clients")

    @property
    def count(self) -> int:
        return int(self.total.value)

    def stop(self) -> None:
        self.stop_event.set()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def _fleet_main(port: int, n: int, path: str | None, total: Any, connected: Any,
                stop_event: Any) -> None:
    import uvloop

    raise_nofile()
    uvloop.run(_fleet(port, n, path, total, connected, stop_event))


async def _fleet(port: int, n: int, path: str | None, total: Any, connected: Any,
                 stop_event: Any) -> None:
    loop = asyncio.get_running_loop()
    clients: list[Counting] = []
    marker = SSE_MARKER if path is not None else REDIS_MARKER
    for start in range(0, n, 500):
        batch: list[Counting] = []
        for _ in range(min(500, n - start)):
            _, proto = await loop.create_connection(lambda: Counting(marker), "127.0.0.1", port)
            assert proto.transport is not None
            proto.transport.write(
                SUBSCRIBE if path is None else
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            batch.append(proto)
        await asyncio.wait_for(asyncio.gather(*(c.first_byte for c in batch)), 60)
        clients += batch
        connected.value = len(clients)
    base = Counting.total
    while not stop_event.is_set():
        total.value = Counting.total - base
        await asyncio.sleep(0.005)
    for c in clients:
        assert c.transport is not None
        c.transport.close()


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``predicate`` without blocking the loop; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
