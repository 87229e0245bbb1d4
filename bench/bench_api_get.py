"""GET /keys/{type} throughput on one api_server worker, beside plain redis-py GETs.

Baseline: a plain redis-py loop, ``client.get(key)`` one after another on one
connection (the reference the issue asks for).
Project: ``python -m api_server`` (one uvicorn worker) answering ``GET
/keys/{type}`` - the index check and the value read in one Lua script, the body
spliced from the stored bytes - to a lean raw-asyncio HTTP/1.1 client holding
``--connections`` keep-alive connections, one request in flight on each.

Usage: flock /tmp/bench.lock python bench/bench_api_get.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis
import uvloop
from api_common import ApiProcess, Writer, percentile, raise_nofile
from common import BenchRedis, machine

KEYS = 1_000


def redis_py_loop(port: int, seconds: float) -> tuple[float, list[float]]:
    client = redis.Redis(port=port)
    done = 0
    lat: list[float] = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        client.get(f"sensor-{done % KEYS:05d}")
        lat.append(time.perf_counter() - now)
        done += 1
    client.close()
    return done / (time.perf_counter() - start), lat


async def http_loop(port: int, connections: int, seconds: float) -> tuple[float, list[float]]:
    lat: list[float] = []
    counts = [0] * connections
    deadline = time.perf_counter() + seconds

    async def one(slot: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = slot
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            writer.write(f"GET /keys/sensor-{i % KEYS:05d} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - sent)
            counts[slot] += 1
            i += connections
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(connections)))
    return sum(counts) / (time.perf_counter() - start), lat


async def fill(url: str) -> None:
    writer = Writer(url)
    await writer.commit([f"sensor-{i:05d}" for i in range(KEYS)])
    await writer.close()


def show(name: str, rate: float, lat: list[float]) -> None:
    lat.sort()
    print(f"{name}: {rate:8.0f} reads/s, latency p50 {percentile(lat, 50) * 1e3:.2f} ms, "
          f"p99 {percentile(lat, 99) * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description="GET /keys/{type} throughput")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    raise_nofile()
    bench_redis = BenchRedis()
    try:
        uvloop.run(fill(bench_redis.url))
        base_rate, base_lat = redis_py_loop(bench_redis.port, args.seconds)
        api = ApiProcess(bench_redis.url)
        try:
            uvloop.run(http_loop(api.port, args.connections, 1.0))  # warm-up
            proj_rate, proj_lat = uvloop.run(http_loop(api.port, args.connections, args.seconds))
        finally:
            api.stop()
    finally:
        bench_redis.stop()
    print(f"machine: {machine()}")
    print(f"{KEYS} keys, {args.seconds:.0f} s each")
    show("baseline (redis-py GET loop, 1 connection)                    ", base_rate, base_lat)
    show(f"project  (GET /keys/{{type}}, 1 worker, {args.connections} keep-alive connections)",
         proj_rate, proj_lat)
    print(f"ratio project/baseline: {proj_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
