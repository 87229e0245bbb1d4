"""One commit at a time: what the updater pays per message at low rates.

Under light load every message is its own batch, so the commit's fixed cost -
not throughput - sets the updater's CPU and its share of the chain's latency.
Both sides run the same commit (kv_updater's Lua script, EVALSHA + MGET +
ZMSCORE read-back, one message per commit) on the same Redis, one after the
other, paced at ``--rate`` commits/s:

- baseline: redis-py's own asyncio pipeline (``client.pipeline(transaction=False)``);
- project: ``kv_updater.commit.Committer`` (hiredis-packed, on its ``RespLink``).

Printed: round-trip p50/p99 and the process CPU time per commit, with ratios.

Usage: flock /tmp/bench.lock python bench/bench_commit.py [--commits 5000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as aioredis
import uvloop
from api_common import percentile
from common import BenchRedis, machine

from kv_updater.commit import COMMIT_LUA, Committer
from kv_updater.keys import KeyLayout
from kv_updater.message import Accepted, MessageRules

LAYOUT = KeyLayout()
RULES = MessageRules(LAYOUT)
Commit = Callable[[Accepted], Awaitable[object]]


def message(n: int, keys: int) -> Accepted:
    minute, second, micro = n // 60_000_000, n // 1_000_000 % 60, n % 1_000_000
    parsed = RULES.parse(orjson.dumps({
        "type": f"sensor-{n % keys:04d}",
        "updated": f"2026-12-03T12:{minute:02d}:{second:02d}.{micro:06d}Z",
        "values": {"temperature": 20 + n % 97 / 10, "status": "ok", "n": n},
    }))
    assert isinstance(parsed, Accepted), parsed
    return parsed


def redis_py_commit(client: aioredis.Redis, sha: str) -> Commit:
    """The same three commands through redis-py's pipeline (what the Committer replaces)."""
    async def commit(msg: Accepted) -> object:
        pipe = client.pipeline(transaction=False)
        data_key = LAYOUT.data_key(msg.type)
        pipe.evalsha(sha, 4, LAYOUT.seq, LAYOUT.index, LAYOUT.instants, data_key,
                     "update:stored", msg.type, msg.instant, msg.stored, msg.type_json)
        pipe.mget(data_key)
        pipe.zmscore(LAYOUT.index, [msg.type])
        return await pipe.execute()
    return commit


async def timed(commit: Commit, first: int, count: int, keys: int,
                rate: float) -> tuple[list[float], float]:
    """Round trips (s) of ``count`` paced commits and the CPU seconds they took."""
    messages = [message(first + i, keys) for i in range(count)]
    latencies: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    for i, msg in enumerate(messages):
        due = start + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        t = time.perf_counter()
        await commit(msg)
        latencies.append(time.perf_counter() - t)
    return sorted(latencies), time.process_time() - cpu0


async def main_async(args: argparse.Namespace) -> None:
    redis = BenchRedis()
    client = aioredis.Redis.from_url(redis.url, socket_timeout=10)
    committer = Committer(client, LAYOUT, "update:stored", validate=True)
    try:
        await committer.load_script()
        sha = str(await client.script_load(COMMIT_LUA))
        sides: list[tuple[str, Commit]] = [
            ("baseline (redis-py asyncio pipeline)", redis_py_commit(client, sha)),
            ("project  (Committer on a RespLink)  ", lambda msg: committer.commit([msg])),
        ]
        await timed(sides[0][1], 0, 300, args.keys, args.rate)  # warm-up, both paths
        await timed(sides[1][1], 300, 300, args.keys, args.rate)
        results = []
        first = 1_000
        for name, commit in sides:
            lat, cpu = await timed(commit, first, args.commits, args.keys, args.rate)
            first += args.commits
            results.append((lat, cpu))
            print(f"{name}: p50 {percentile(lat, 50) * 1e6:6.0f} us, "
                  f"p99 {percentile(lat, 99) * 1e6:6.0f} us, "
                  f"CPU {cpu / args.commits * 1e6:5.0f} us per commit")
        (base_lat, base_cpu), (proj_lat, proj_cpu) = results
        p50 = percentile(base_lat, 50) / percentile(proj_lat, 50)
        p99 = percentile(base_lat, 99) / percentile(proj_lat, 99)
        print(f"ratio baseline/project: p50 {p50:.2f}, p99 {p99:.2f}, "
              f"CPU per commit {base_cpu / proj_cpu:.2f}")
    finally:
        committer.close()
        await client.aclose()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="one-message commits, redis-py vs Committer")
    parser.add_argument("--commits", type=int, default=5_000)
    parser.add_argument("--rate", type=float, default=1_000.0)
    parser.add_argument("--keys", type=int, default=100)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{args.commits} commits of one message each, paced at {args.rate:.0f}/s, "
          f"{args.keys} keys, validation on")
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
