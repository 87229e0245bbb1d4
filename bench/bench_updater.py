"""kv_updater throughput, end to end, beside the seed's naive design.

Same Redis (a private redis-server with default limits), same messages (1,000
distinct keys by default, validation on), published as fast as Redis accepts:

- ceiling: redis-benchmark's pipelined PUBLISH rate (no subscriber);
- baseline: the seed's literal design - a sync redis-py client that, per message,
  parses it, SETs the key and GETs it back to validate;
- project: ``python -m kv_updater`` as a real process.

Rate = messages / (first PUBLISH -> the last message's key is stored).  The
project run must leave every key holding its last value and must never have been
dropped by Redis.  Usage: python bench/bench_updater.py [--messages N] [--keys K]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import redis
from common import (
    BenchRedis,
    blast_publish,
    cpu_seconds,
    free_port,
    last_values,
    machine,
    make_messages,
    pack_publishes,
    rss_of,
    start_service,
    wait_for,
)

CHANNEL = "update"


def naive_updater(port: int, channel: str) -> None:
    """The seed, literally: subscribe; per message parse, SET, GET back and compare."""
    client = redis.Redis(port=port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
    pubsub.subscribe(channel)
    for message in pubsub.listen():  # type: ignore[no-untyped-call, unused-ignore]
        data = json.loads(message["data"])
        value = json.dumps(
            {"updated": data["updated"], "valid": data.get("valid"), "values": data["values"]},
            separators=(",", ":"),
        )
        client.set(data["type"], value)
        if client.get(data["type"]) != value.encode():
            print("validation failed", file=sys.stderr)


def ceiling(port: int) -> float:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return 0.0
    out = subprocess.run(
        [
            exe,
            "-p",
            str(port),
            "-n",
            "300000",
            "-P",
            "100",
            "-q",
            "PUBLISH",
            "bench-ceiling",
            '{"type":"sensor-00001","updated":"2026-12-03T12:00:00.000010Z","values":{"t":21.5}}',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.findall(r"([\d.]+) requests per second", out)
    return float(found[-1]) if found else 0.0


def wait_subscribed(client: redis.Redis, channel: str, timeout: float = 20) -> None:
    wait_for(lambda: client.pubsub_numsub(channel)[0][1] >= 1, timeout, "the subscriber", 0.01)


def run_naive(bench: BenchRedis, messages: list[bytes]) -> float:
    bench.client.flushall()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--naive-worker", str(bench.port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        packed = pack_publishes(CHANNEL, messages)
        wait_subscribed(bench.client, CHANNEL)
        started = time.perf_counter()
        blast_publish(bench.port, packed)
        wait_for(lambda: bench.client.exists("bench-end") == 1, 600, "the naive updater")
        return time.perf_counter() - started
    finally:
        proc.kill()
        proc.wait()


class PeakOutputBuffer:
    """The largest output buffer Redis held for a pub/sub client while running:
    how close a burst came to ``client-output-buffer-limit pubsub`` (32 MB hard by
    default), past which Redis drops the subscriber.  Sampled every 20 ms."""

    def __init__(self, port: int) -> None:
        self.client = redis.Redis(port=port)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for entry in self.client.client_list(_type="pubsub"):
                self.peak = max(self.peak, int(entry["omem"]))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakOutputBuffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def dropped(port: int) -> bool:
    return scrape(port, "kvupdater_reconnects_total") > 0


def scrape(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_project(
    bench: BenchRedis, messages: list[bytes], validate: bool
) -> tuple[float, dict[str, float]]:
    bench.client.flushall()
    metrics_port = free_port()
    log_path = Path(os.environ.get("BENCH_LOG_DIR", "/tmp")) / "bench-kv-updater.log"
    with log_path.open("w") as log:
        proc = start_service(
            "kv_updater",
            [
                "--redis-url",
                bench.url,
                "--metrics-port",
                str(metrics_port),
                "--metrics-host",
                "127.0.0.1",
                "--validate" if validate else "--no-validate",
            ],
            f"http://127.0.0.1:{metrics_port}/ready",
            log,
        )
    try:
        packed = pack_publishes(CHANNEL, messages)
        wait_subscribed(bench.client, CHANNEL)
        cpu_before = cpu_seconds(proc.pid)
        redis_before = cpu_seconds(bench.proc.pid)
        with PeakOutputBuffer(bench.port) as buffer:
            started = time.perf_counter()
            publish_seconds = blast_publish(bench.port, packed)
            polls = itertools.count()

            def ended() -> bool:
                # A dropped subscriber lost the rest of the burst (bench-end too):
                # the run ends there, failed, instead of waiting for the timeout.
                if bench.client.exists("bench-end"):
                    return True
                return next(polls) % 100 == 99 and dropped(metrics_port)

            wait_for(ended, 600, "kv_updater")
            elapsed = time.perf_counter() - started

        def settled() -> bool:
            # The last batch's counters move just after Redis has its commit.
            done = sum(
                scrape(metrics_port, f"kvupdater_messages_{what}_total")
                for what in ("committed", "superseded", "stale", "unchanged", "rejected")
            )
            return done >= len(messages)

        if not dropped(metrics_port):
            wait_for(settled, 10, "the updater's counters", 0.01)
        stats = {
            "publish_seconds": publish_seconds,
            "updater_cpu": cpu_seconds(proc.pid) - cpu_before,
            "redis_cpu": cpu_seconds(bench.proc.pid) - redis_before,
            "committed": scrape(metrics_port, "kvupdater_messages_committed_total"),
            "superseded": scrape(metrics_port, "kvupdater_messages_superseded_total"),
            "validated": scrape(metrics_port, "kvupdater_validations_total"),
            "validation_failures": scrape(metrics_port, "kvupdater_validation_failures_total"),
            "reconnects": scrape(metrics_port, "kvupdater_reconnects_total"),
            "batches": scrape(metrics_port, "kvupdater_batch_size_count"),
            "peak_buffer_mb": buffer.peak / 2**20,
            "peak_rss_mb": rss_of(proc.pid, "VmHWM") / 2**20,
        }
        return elapsed, stats
    finally:
        proc.terminate()
        proc.wait(15)


def check_final_state(bench: BenchRedis, messages: list[bytes]) -> int:
    expected = last_values(messages)
    types = list(expected)
    got = bench.client.mget(types)
    return sum(1 for t, v in zip(types, got, strict=True) if v != expected[t])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument(
        "--baseline-messages",
        type=int,
        default=30_000,
        help="the naive updater gets fewer messages (its rate is flat)",
    )
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=5, help="project runs; the median is compared"
    )
    parser.add_argument("--naive-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_worker:
        naive_updater(args.naive_worker, CHANNEL)
        return

    messages = make_messages(args.messages, args.keys)
    baseline_messages = make_messages(args.baseline_messages, args.keys)
    bench = BenchRedis()
    try:
        print(
            f"machine: {machine()}; redis {bench.version()} (default limits); "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        print(
            f"messages: {args.messages:,} over {args.keys:,} keys, "
            f"{sum(map(len, messages)) // len(messages)} bytes each on average, "
            f"validation {'off' if args.no_validate else 'on'}"
        )
        top = ceiling(bench.port)
        print(f"ceiling   redis-benchmark pipelined PUBLISH: {top:>12,.0f} msg/s")
        naive_s = run_naive(bench, baseline_messages)
        naive_rate = len(baseline_messages) / naive_s
        naive_bad = check_final_state(bench, baseline_messages)
        print(
            f"baseline  naive SET+GET per message:      {naive_rate:>12,.0f} msg/s "
            f"({len(baseline_messages):,} in {naive_s:.2f} s, wrong keys {naive_bad})"
        )
        rates = []
        failed = False
        for run in range(1, args.repeat + 1):
            project_s, stats = run_project(bench, messages, not args.no_validate)
            rate = len(messages) / project_s
            rates.append(rate)
            bad = check_final_state(bench, messages)
            print(
                f"project   kv_updater run {run}:              {rate:>12,.0f} msg/s "
                f"({len(messages):,} in {project_s:.2f} s; publishing took "
                f"{stats['publish_seconds']:.2f} s; CPU: updater {stats['updater_cpu']:.2f} s, "
                f"redis {stats['redis_cpu']:.2f} s)"
            )
            print(
                f"          batches {stats['batches']:,.0f}, committed "
                f"{stats['committed']:,.0f}, superseded in batch {stats['superseded']:,.0f}, "
                f"validated keys {stats['validated']:,.0f}, validation failures "
                f"{stats['validation_failures']:,.0f}, reconnects {stats['reconnects']:,.0f}, "
                f"keys not at their last value {bad}, peak Redis output buffer for the "
                f"subscriber {stats['peak_buffer_mb']:.1f} MB (limit 32 MB), peak RSS of "
                f"the updater {stats['peak_rss_mb']:.0f} MB"
            )
            failed |= bool(bad or stats["reconnects"] or stats["validation_failures"])
        median = statistics.median(rates)
        print(
            f"project   median of {len(rates)}: {median:,.0f} msg/s "
            f"(min {min(rates):,.0f}, max {max(rates):,.0f})"
        )
        print(f"ratio     project (median) / baseline: {median / naive_rate:.1f}x")
        if failed:
            raise SystemExit("FAILED: the final state is wrong or the updater was dropped")
    finally:
        bench.stop()


if __name__ == "__main__":
    main()
