"""Shared pieces of the benchmarks: a private redis-server, messages, a fast publisher."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import hiredis
import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.001
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def start_service(
    module: str,
    args: Sequence[str],
    ready_url: str,
    output: IO[Any] | int = subprocess.DEVNULL,
    timeout: float = 30,
) -> subprocess.Popen[bytes]:
    """``python -m <module> <args>`` from the project root (stdout and stderr to
    ``output``); returns once ``ready_url`` answers 200, fails if the process exits first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{module} exited {proc.returncode}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        wait_for(ready, timeout, f"{module} {ready_url}", interval=0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_of(pid: int, field: str = "VmRSS") -> int:
    """Memory of a process from /proc (Linux), bytes: ``VmRSS`` resident now,
    ``VmHWM`` the most it has been resident."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


class BenchRedis:
    """A redis-server of the benchmark's own, with Redis's default limits."""

    def __init__(self, extra: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port)
        wait_for(self._ping, 10, "redis-server")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def make_messages(count: int, keys: int, end_type: str = "bench-end") -> list[bytes]:
    """``count`` realistic updates over ``keys`` sensors, each key's instants increasing,
    then one final message of ``end_type`` whose arrival marks the end."""
    base = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    out = []
    for i in range(count):
        at = base + timedelta(microseconds=i * 10)
        updated = at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        valid = (at + timedelta(minutes=1)).isoformat(timespec="seconds").replace("+00:00", "Z")
        out.append(
            orjson.dumps(
                {
                    "type": f"sensor-{i % keys:05d}",
                    "updated": updated,
                    "valid": valid,
                    "values": {
                        "temperature": round(20 + (i % 97) / 10, 2),
                        "humidity": 40 + i % 13,
                        "status": "ok",
                        "seq": i,
                    },
                }
            )
        )
    out.append(
        orjson.dumps(
            {"type": end_type, "updated": "2026-12-03T13:00:00Z", "values": {"done": True}}
        )
    )
    return out


def last_values(messages: list[bytes]) -> dict[str, bytes]:
    """type -> the stored value the last message of each type must leave."""
    final: dict[str, bytes] = {}
    for raw in messages:
        doc = orjson.loads(raw)
        final[doc["type"]] = orjson.dumps(
            {"updated": doc["updated"], "valid": doc.get("valid"), "values": doc["values"]}
        )
    return final


def pack_publishes(channel: str, messages: list[bytes]) -> list[bytes]:
    """The PUBLISH commands, packed ahead: the publisher's preparation is not timed."""
    pack: Any = hiredis.pack_command  # its stub types the argument as a 1-tuple
    return [pack(("PUBLISH", channel, m)) for m in messages]


def blast_publish(
    port: int, packed: list[bytes], pipeline: int = 1000, started: list[float] | None = None
) -> float:
    """Send pre-packed PUBLISHes as fast as Redis accepts them, on one raw connection;
    returns the seconds until Redis had answered them all.  ``started`` receives the
    perf_counter() of the first byte sent."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done = threading.Event()
    total = len(packed)

    def drain() -> None:
        reader = hiredis.Reader()
        seen = 0
        while seen < total:
            data = sock.recv(1 << 20)
            if not data:
                break
            reader.feed(data)
            while reader.gets() is not False:
                seen += 1
        done.set()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    begin = time.perf_counter()
    if started is not None:
        started.append(begin)
    for i in range(0, total, pipeline):
        sock.sendall(b"".join(packed[i : i + pipeline]))
    done.wait(300)
    elapsed = time.perf_counter() - begin
    sock.close()
    return elapsed


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to others (``steal`` in /proc/stat), all cores.

    On a VM this is what makes two runs of the same benchmark differ: a run
    whose latency jumps while its processes were *less* busy was waiting for
    cores it did not get."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0

