"""The test harness: a real Redis, service processes, and waiting with deadlines.

Backends for Redis (never a server the user already runs):
- ``testcontainers``: a ``RedisContainer`` from ``REDIS_IMAGE`` (default
  ``redis:7-alpine``), when a Docker engine answers;
- ``local``: a ``redis-server`` process on a free loopback port;
- ``external``: only when ``TEST_REDIS_URL`` is set (the user opts in).
``KV_TEST_BACKEND=testcontainers|local`` forces one; the default picks
testcontainers when Docker answers, else local.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import redis

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | bool | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return cast(T, last)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {message} (last: {last!r})"
            )
        time.sleep(interval)


class RedisServer(Protocol):
    backend: str
    url: str
    host: str
    port: int

    def client(self) -> redis.Redis: ...
    def stop(self) -> None: ...
    def start(self) -> None: ...
    def restart(self) -> None: ...


def _ping(host: str, port: int) -> bool:
    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


class LocalRedis:
    """A redis-server process of our own on a free loopback port."""

    backend = "local"

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port()
        self.url = f"redis://{self.host}:{self.port}/0"
        self.extra_args = list(extra_args)
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _ping(self.host, self.port), 10, message=f"redis on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port)


class ContainerRedis:
    """A testcontainers RedisContainer bound to a fixed host port, so it can restart."""

    backend = "testcontainers"

    def __init__(self, image: str, extra_args: Sequence[str] = ()) -> None:
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:  # testcontainers before 4.10
            from testcontainers.redis import RedisContainer
        self.image = image
        self.host = "127.0.0.1"
        self.port = free_port()
        self.url = f"redis://{self.host}:{self.port}/0"
        self.container = RedisContainer(image).with_bind_ports(6379, self.port)
        self.container.with_command(
            [
                "redis-server",
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                *extra_args,
            ]
        )
        self._started = False

    def start(self) -> None:
        if not self._started:
            self.container.start()
            self._started = True
        else:
            self.container.get_wrapped_container().start()
        wait_until(
            lambda: _ping(self.host, self.port), 30, message=f"redis container on {self.port}"
        )

    def stop(self) -> None:
        self.container.get_wrapped_container().stop(timeout=5)

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.container.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port)


class ExternalRedis:
    backend = "external"

    def __init__(self, url: str) -> None:
        self.url = url
        client = redis.Redis.from_url(url)
        kwargs = client.connection_pool.connection_kwargs
        self.host = str(kwargs.get("host", "127.0.0.1"))
        self.port = int(kwargs.get("port", 6379))

    def start(self) -> None: ...

    def stop(self) -> None:
        raise RuntimeError("cannot stop a Redis the tests do not own")

    def restart(self) -> None:
        raise RuntimeError("cannot restart a Redis the tests do not own")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def chosen_backend() -> str:
    if os.environ.get("TEST_REDIS_URL"):
        return "external"
    forced = os.environ.get("KV_TEST_BACKEND", "auto")
    if forced in ("local", "testcontainers"):
        return forced
    return "testcontainers" if docker_answers() else "local"


def make_redis(backend: str, extra_args: Sequence[str] = ()) -> RedisServer:
    """A new, started Redis of the given backend."""
    server: RedisServer
    if backend == "external":
        server = ExternalRedis(os.environ["TEST_REDIS_URL"])
    elif backend == "testcontainers":
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
        server = ContainerRedis(os.environ.get("REDIS_IMAGE", "redis:7-alpine"), extra_args)
    else:
        server = LocalRedis(extra_args)
    server.start()
    return server


def dispose(server: RedisServer) -> None:
    if isinstance(server, ContainerRedis):
        server.remove()
    elif isinstance(server, LocalRedis):
        server.stop()


class Service:
    """One of the project's services as a real process, logs kept in a file."""

    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.module = module
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd or Path(tempfile.mkdtemp(prefix=f"{module}-"))
        self.log_path = self.cwd / f"{module}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
        )
        log.close()
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None and text not in self.log:
                raise AssertionError(f"{self.module} exited {self.proc.returncode}:\n{self.log}")
            return text in self.log

        wait_until(seen, timeout, message=f"{text!r} in the {self.module} log")
        return self.log

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.stop()
