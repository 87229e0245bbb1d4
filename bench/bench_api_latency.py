"""Publish-to-client latency through the whole chain, at a fixed publish rate.

Project: publisher -> Redis ``update`` -> ``python -m kv_updater`` (atomic commit)
-> Redis ``update:stored`` -> ``python -m api_server`` -> SSE clients.
Baseline: publisher -> Redis ``update`` -> the same clients subscribed to Redis
directly (one hop: the floor any chain on this machine starts from).

Each message carries its publish instant (CLOCK_MONOTONIC, shared by every
process of the machine) as ``values.t``; every client computes now - t for every
event it receives.  The first second is warm-up and not counted.  Clients run in
a process of their own; the publisher paces itself from a thread of its own.

Usage: flock /tmp/bench.lock python bench/bench_api_latency.py [--rate 1000]
       [--clients 100] [--seconds 10] [--keys 100] [--eager-drain] [--api-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

import hiredis
import orjson
import redis.asyncio as aioredis
from api_common import ApiProcess, percentile, raise_nofile
from common import (
    BenchRedis,
    cpu_seconds,
    free_port,
    machine,
    start_service,
    stolen_seconds,
)

from kv_updater.commit import Committer
from kv_updater.keys import KeyLayout
from kv_updater.message import Accepted, MessageRules

_T = re.compile(rb'"t":(\d+)')
MEASURED = 10
"""Clients that time every event they get; the others only drain."""
SUBSCRIBE_UPDATE = b"*2\r\n$9\r\nSUBSCRIBE\r\n$6\r\nupdate\r\n"


class Timing(asyncio.Protocol):
    """Parses only the ``"t":N`` of each event; keeps the latency of each, in ns.

    With ``samples`` None it only drains what it gets: the measuring clients are a
    subset, so that parsing in Python does not make the client process the
    bottleneck of a 2-core machine (every client still receives every event).

    A ``lazy`` drainer stops reading after each read and is resumed every 10 ms
    (``_clients``): its events wait in its socket buffer (a few KB, far below the
    point where the server would see backpressure) and are read in one go.  The
    server writes exactly as much; what changes is the client process's CPU - one
    read per 10 ms instead of one per event - which on this 2-core machine would
    otherwise be taken from the server and Redis (real clients run elsewhere)."""

    def __init__(self, samples: list[int] | None, since_ns: list[int],
                 lazy: bool = False) -> None:
        self.samples = samples
        self.since_ns = since_ns
        self.lazy = lazy
        self.rest = b""
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if not self.ready.done():
            self.ready.set_result(None)
        if self.samples is None:
            if self.lazy and self.transport is not None:
                self.transport.pause_reading()
            return
        buf = self.rest + data
        cut = buf.rfind(b"}") + 1  # numbers before the last "}" are complete
        self.rest = buf[cut:]
        since = self.since_ns[0]
        for match in _T.finditer(buf, 0, cut):
            sent = int(match.group(1))
            if sent >= since:
                self.samples.append(now - sent)


def _clients_main(port: int, n: int, path: str | None, since_ns: Any, out: Any,
                  ready: Any, stop: Any, lazy: bool) -> None:
    import uvloop

    raise_nofile()
    uvloop.run(_clients(port, n, path, since_ns, out, ready, stop, lazy))


async def _clients(port: int, n: int, path: str | None, since_ns: Any, out: Any,
                   ready: Any, stop: Any, lazy: bool) -> None:
    loop = asyncio.get_running_loop()
    samples: list[int] = []
    since = [1 << 62]
    protos = []
    for i in range(n):
        measured = samples if i < MEASURED else None
        transport, proto = await loop.create_connection(
            lambda m=measured: Timing(m, since, lazy), "127.0.0.1", port  # type: ignore[misc]
        )
        transport.write(SUBSCRIBE_UPDATE if path is None else
                        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        protos.append((transport, proto))
    await asyncio.gather(*(p.ready for _, p in protos))
    ready.set()
    while not stop.is_set():
        since[0] = since_ns.value
        if lazy:
            for transport, proto in protos:
                if proto.samples is None:
                    transport.resume_reading()
        await asyncio.sleep(0.01)
    for transport, _ in protos:
        transport.close()
    samples.sort()
    out.send([percentile(samples, q) for q in (50, 90, 99, 99.9, 100)] + [len(samples)])


def publish(port: int, rate: float, seconds: float, keys: int, stop_at: list[float]) -> int:
    """PUBLISH ``rate`` messages per second for ``seconds`` from this thread."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = hiredis.Reader()
    sent = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(rate * elapsed) + 1
        while sent < due:
            t = time.monotonic_ns()
            msg = orjson.dumps({
                "type": f"sensor-{sent % keys:04d}",
                "updated": f"2026-12-03T12:00:00.{sent:06d}Z"
                if sent < 1_000_000 else "2026-12-03T13:00:00Z",
                "values": {"temperature": 20.5, "status": "ok", "t": t},
            })
            command: Any = ("PUBLISH", "update", msg)  # hiredis's stub types 1-tuples only
            sock.sendall(hiredis.pack_command(command))
            sent += 1
        # replies are drained as they come, never awaited one by one
        with contextlib.suppress(BlockingIOError):
            reader.feed(sock.recv(1 << 16, socket.MSG_DONTWAIT))
        time.sleep(0.0005)
    stop_at.append(time.perf_counter())
    sock.close()
    return sent


def commit_directly(url: str, rate: float, seconds: float, keys: int,
                    stop_at: list[float]) -> int:
    """What kv_updater does per message, from this thread: parse with the message
    rules and commit with kv_updater's Committer, one message per commit."""
    rules = MessageRules(KeyLayout())

    async def run() -> int:
        client = aioredis.Redis.from_url(url)
        committer = Committer(client, KeyLayout(), "update:stored", validate=False)
        sent = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            due = int(rate * elapsed) + 1
            while sent < due:
                msg = rules.parse(orjson.dumps({
                    "type": f"sensor-{sent % keys:04d}",
                    "updated": f"2026-12-03T12:00:00.{sent:06d}Z",
                    "values": {"temperature": 20.5, "status": "ok", "t": time.monotonic_ns()},
                }))
                assert isinstance(msg, Accepted)
                await committer.commit([msg])
                sent += 1
            await asyncio.sleep(0.0005)
        stop_at.append(time.perf_counter())
        committer.close()
        await client.aclose()
        return sent

    return asyncio.run(run())


@dataclass
class Figures:
    p50: float
    p90: float
    p99: float
    p999: float
    worst: float
    samples: int
    published: int
    cpu: str = ""

    def line(self) -> str:
        ms = 1e6
        return (f"p50 {self.p50 / ms:.2f} ms, p90 {self.p90 / ms:.2f} ms, "
                f"p99 {self.p99 / ms:.2f} ms, p99.9 {self.p999 / ms:.2f} ms, "
                f"max {self.worst / ms:.1f} ms ({self.samples} samples, "
                f"{self.published} published)"
                + (f"\n    CPU busy: {self.cpu}" if self.cpu else ""))


def measure(redis: BenchRedis, port: int, path: str | None, args: argparse.Namespace,
            pids: dict[str, int], direct: bool = False) -> Figures:
    ctx = mp.get_context("spawn")
    since = ctx.Value("q", 1 << 62, lock=False)
    parent, child = ctx.Pipe()
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_clients_main,
                       args=(port, args.clients, path, since, child, ready, stop,
                             not args.eager_drain), daemon=True)
    proc.start()
    if path is not None:
        # SSE clients only start reading once something is published: prime them.
        primer = redis.client
        primer.publish("update", orjson.dumps({
            "type": "sensor-0000", "updated": "2026-12-03T11:00:00Z", "values": {"t": 0}}))
    if not ready.wait(60):
        raise RuntimeError("clients did not connect")
    since.value = time.monotonic_ns() + 1_000_000_000  # the first second is warm-up
    stop_at: list[float] = []
    pids = {**pids, "redis": redis.proc.pid, "clients": proc.pid or 0}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    steal0 = stolen_seconds()
    wall0 = time.perf_counter()
    if direct:
        published = commit_directly(redis.url, args.rate, args.seconds, args.keys, stop_at)
    else:
        published = publish(redis.port, args.rate, args.seconds, args.keys, stop_at)
    wall = time.perf_counter() - wall0
    busy = ", ".join(
        f"{name} {100 * (cpu_seconds(pid) - cpu0[name]) / wall:.0f}%"
        for name, pid in pids.items()
    )
    cores = os.cpu_count() or 1
    busy += f"; stolen by the hypervisor {100 * (stolen_seconds() - steal0) / wall / cores:.0f}%"
    time.sleep(0.5)  # the last events in flight
    stop.set()
    figures = parent.recv()
    proc.join(30)
    p50, p90, p99, p999, worst, count = figures
    return Figures(p50, p90, p99, p999, worst, int(count), published, busy)


def run_updater(redis_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = start_service(
        "kv_updater",
        ["--redis-url", redis_url, "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
         "--log-level", "WARNING"],
        f"http://127.0.0.1:{port}/ready",
    )
    return proc, port


def measure_api_alone(args: argparse.Namespace) -> Figures:
    """The api_server's share: commits made in this process, no kv_updater."""
    redis = BenchRedis()
    api = ApiProcess(redis.url)
    try:
        return measure(redis, api.port, "/events", args, {"api_server": api.proc.pid},
                       direct=True)
    finally:
        api.stop()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="publish-to-SSE-client latency")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--eager-drain", action="store_true",
                        help="the non-timing clients read every event at once too "
                             "(default: every 10 ms, see Timing)")
    parser.add_argument("--api-only", action="store_true",
                        help="only the api_server's share (commits made in-process)")
    args = parser.parse_args()
    raise_nofile()

    if args.api_only:
        alone = measure_api_alone(args)
        print(f"share of api_server (Committer in-process -> api_server -> SSE): {alone.line()}")
        return

    redis = BenchRedis()
    try:
        base = measure(redis, redis.port, None, args, {})
    finally:
        redis.stop()

    alone = measure_api_alone(args)

    redis = BenchRedis()
    updater, _ = run_updater(redis.url)
    api = ApiProcess(redis.url)
    try:
        proj = measure(redis, api.port, "/events", args,
                       {"kv_updater": updater.pid, "api_server": api.proc.pid})
    finally:
        api.stop()
        updater.terminate()
        updater.wait(15)
        redis.stop()
    print(f"machine: {machine()}")
    print(f"{args.rate:.0f} msg/s over {args.keys} keys for {args.seconds:.0f} s, "
          f"{args.clients} clients, {MEASURED} of them timing every event, the others "
          f"{'reading every event at once' if args.eager_drain else 'reading every 10 ms'} "
          "(first second not counted)")
    print(f"baseline (publisher -> Redis -> subscriber):                      {base.line()}")
    print(f"project  (publisher -> kv_updater -> api_server -> SSE client): {proj.line()}")
    print(f"share of api_server (Committer in-process -> api_server -> SSE): {alone.line()}")
    print(f"ratio project/baseline p99: {proj.p99 / base.p99:.1f}; "
          f"project p99 <= 10 ms: {'yes' if proj.p99 <= 10e6 else 'NO'}")


if __name__ == "__main__":
    threading.stack_size(0)
    main()
