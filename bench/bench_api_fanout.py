"""api_server fan-out: many concurrent SSE clients on ONE api_server process.

Baseline: Redis itself fanning the same commits out to the same number of raw
pub/sub subscribers (what clients subscribed to Redis directly would get).
Project: ``python -m api_server`` with N SSE clients.  The clients are lean
raw-asyncio sockets that only count ``id:`` lines (or Redis ``message`` replies),
in a process of their own; commits are made by kv_updater's Committer (the real
commit script publishes them) from this process, at a fixed rate over 1,000 keys.

- memory per idle client: resident memory of the server process with N idle
  clients minus before them, divided by N;
- deliveries/s: events counted by all clients / (first commit -> last delivery),
  for each commit rate of ``--rates`` held ``--seconds``; "lag" is how long the
  last delivery came after the last commit.

Usage: flock /tmp/bench.lock python bench/bench_api_fanout.py [--clients 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import uvloop
from api_common import ApiProcess, ClientFleet, Writer, raise_nofile, until
from common import BenchRedis, machine, rss_of

KEYS = 1_000
TYPES = [f"sensor-{i:05d}" for i in range(KEYS)]


@dataclass
class Run:
    rate: float
    commits: int
    delivered: int
    seconds: float
    lag: float

    @property
    def expected_per_commit(self) -> float:
        return self.delivered / self.commits if self.commits else 0.0

    @property
    def deliveries_per_s(self) -> float:
        return self.delivered / self.seconds


@dataclass
class Result:
    per_idle_client: float
    rss_before: int
    rss_idle: int
    connect_s: float
    runs: list[Run]
    conflated: int = 0


async def drive(writer: Writer, fleet: ClientFleet, rate: float, seconds: float) -> Run:
    """Commit ``rate`` per second for ``seconds``, then wait for every delivery."""
    start_count = fleet.count
    tick = 0.01
    made = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        n = int(rate * elapsed) + 1 - made  # on schedule, whatever the timer precision
        if n > 0:
            statuses = await writer.commit([TYPES[(made + i) % KEYS] for i in range(n)])
            made += sum(1 for s in statuses if s > 0)
        await asyncio.sleep(tick)
    committed = time.perf_counter()
    expected = made * fleet.n
    await until(lambda: fleet.count - start_count >= expected, 120, "every delivery")
    finished = time.perf_counter()
    return Run(rate, made, fleet.count - start_count, finished - started, finished - committed)


async def project(args: argparse.Namespace) -> Result:
    redis = BenchRedis(["--maxclients", "1000"])
    writer = Writer(redis.url)
    await writer.commit(TYPES)
    api = ApiProcess(redis.url, ["--max-sse-clients", str(args.clients + 1000)])
    try:
        path = f"/events?last_event_id={writer.n}"  # idle: nothing to send at first
        warm = ClientFleet(api.port, 500, path)
        warm.wait_connected()
        warm.stop()
        await until(lambda: api.stats()["clients"] == 0, 30, "warm-up clients to go")
        rss0 = api.rss
        t0 = time.perf_counter()
        fleet = ClientFleet(api.port, args.clients, path)
        fleet.wait_connected()
        connect_s = time.perf_counter() - t0
        await until(lambda: api.stats()["clients"] == args.clients, 60, "every client")
        await asyncio.sleep(1.0)  # let allocations settle before reading RSS
        rss1 = api.rss
        runs = [await drive(writer, fleet, rate, args.seconds) for rate in args.rates]
        conflated = int(api.stats()["values_conflated"])
        fleet.stop()
        return Result((rss1 - rss0) / args.clients, rss0, rss1, connect_s, runs, conflated)
    finally:
        api.stop()
        await writer.close()
        redis.stop()


async def baseline(args: argparse.Namespace) -> Result:
    """Redis's own pub/sub fan-out to N raw subscribers of the stored channel."""
    redis = BenchRedis(["--maxclients", str(args.clients + 1000)])
    writer = Writer(redis.url)
    try:
        await writer.commit(TYPES)
        rss0 = rss_of(redis.proc.pid)
        t0 = time.perf_counter()
        fleet = ClientFleet(redis.port, args.clients, None)
        fleet.wait_connected()
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        rss1 = rss_of(redis.proc.pid)
        runs = [await drive(writer, fleet, rate, args.seconds) for rate in args.rates]
        fleet.stop()
        return Result((rss1 - rss0) / args.clients, rss0, rss1, connect_s, runs)
    finally:
        await writer.close()
        redis.stop()


def show(name: str, result: Result) -> None:
    print(f"{name}: {result.per_idle_client / 1024:.1f} KB per idle client "
          f"(RSS {result.rss_before / 2**20:.0f} -> {result.rss_idle / 2**20:.0f} MB), "
          f"{result.connect_s:.1f} s to connect")
    for run in result.runs:
        print(f"  {run.rate:5.0f} commits/s x {run.seconds - run.lag:.0f} s: "
              f"{run.deliveries_per_s:9.0f} deliveries/s, {run.delivered} delivered "
              f"({run.expected_per_commit:.0f} per commit), lag {run.lag * 1000:.0f} ms")


async def main_async(args: argparse.Namespace) -> None:
    raise_nofile()
    base = await baseline(args)
    proj = await project(args)
    print(f"machine: {machine()}")
    print(f"clients: {args.clients}, keys: {KEYS}")
    show("baseline (Redis pub/sub -> raw subscribers)", base)
    show("project  (api_server SSE -> SSE clients)   ", proj)
    print(f"project: values conflated {proj.conflated}")
    for b, p in zip(base.runs, proj.runs, strict=True):
        print(f"ratio project/baseline deliveries/s at {p.rate:.0f} commits/s: "
              f"{p.deliveries_per_s / b.deliveries_per_s:.2f}")
    print(f"ratio project/baseline memory per idle client: "
          f"{proj.per_idle_client / max(1.0, base.per_idle_client):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="api_server SSE fan-out benchmark")
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 30.0])
    args = parser.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
