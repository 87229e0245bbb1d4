"""``python -m demo_publisher.stack``: the whole chain on this machine, one command.

Starts, in order and each only once the previous one is ready:

1. Redis: a ``redis-server`` of its own on a free loopback port (no persistence,
   a pub/sub output buffer that fits bursts), unless ``--redis-url`` /
   ``REDIS_URL`` names one;
2. kv_updater (ready once it subscribes to the channel);
3. api_server (ready once ``/ready`` answers 200);
4. demo_publisher;

then prints the dashboard URL and waits.  Ctrl-C or SIGTERM stops the services
(SIGTERM, wait, SIGKILL only after a grace period), then Redis, and exits 0.
If a service dies on its own, the others are stopped and the exit code is 1.

The children run in their own sessions: a Ctrl-C in the terminal reaches only
this process, which stops the children in order (publisher and services
before Redis) instead of everyone racing each other.  On Linux each child also
gets SIGTERM if this process dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from types import FrameType
from typing import IO

import redis

from kv_updater.settings import CommonSettings, SettingsError, load_settings, mask_url

PROG = "demo"
DEFAULT_PORT = 8000
STOP_GRACE_S = 10.0
START_TIMEOUT_S = 60.0
# Redis's default for pub/sub clients is 32 MB hard / 8 MB for 60 s; a demo run
# at a high --rate can burst past that while a subscriber is busy, and Redis
# would then drop the subscriber.  These limits fit seconds of bursts.
PUBSUB_BUFFER = "pubsub 256mb 128mb 60"


def _pdeathsig() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM the child when we die (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    # Resolved before any fork: the preexec_fn itself only makes one C call.
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return set_pdeathsig


class Child:
    """One process of the stack, its output relayed line by line with a name tag."""

    def __init__(self, name: str, argv: list[str], on_exit: Callable[[], None],
                 color: str = "") -> None:
        self.name = name
        self.argv = argv
        self.on_exit = on_exit
        self.color = color
        self.proc: subprocess.Popen[bytes] | None = None
        self._relay: threading.Thread | None = None

    def start(self, env: dict[str, str], preexec: Callable[[], None] | None) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,  # one prctl call, resolved before the fork
        )
        assert self.proc.stdout is not None
        self._relay = threading.Thread(
            target=self._pump, args=(self.proc.stdout,), name=f"relay-{self.name}", daemon=True
        )
        self._relay.start()

    def _pump(self, stream: IO[bytes]) -> None:
        tag = f"{self.color}{self.name:>14} |{_RESET if self.color else ''} "
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            _print(tag + line)
        stream.close()
        # End of output means the process is gone (or closed its stdout: then wait).
        if self.proc is not None:
            self.proc.wait()
        self.on_exit()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> int | None:
        """Wait until ``deadline`` (monotonic), then SIGKILL; the exit code."""
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _print(f"{PROG}: {self.name} did not stop within {STOP_GRACE_S:g} s; killing it")
            self.proc.kill()
            code = self.proc.wait()
        if self._relay is not None:
            self._relay.join(5)
        return code


_RESET = "\033[0m"
_COLORS = ("\033[36m", "\033[33m", "\033[32m", "\033[35m")
_print_lock = threading.Lock()


def _print(line: str) -> None:
    # A closed terminal or pipe must not kill a relay thread: it also reports exits.
    with _print_lock, contextlib.suppress(OSError, ValueError):
        print(line, flush=True)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class StartFailed(Exception):
    pass


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children: list[Child] = []
        self.wake = threading.Event()
        self.stop_requested = False
        self.redis_url: str = args.redis_url
        self.own_redis_dir: str | None = None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.preexec = _pdeathsig()

    # -- signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: Event.set() here could deadlock on the lock the interrupted
        # main thread may hold; the main loop's short waits notice the flag.
        self.stop_requested = True

    def _on_child_exit(self) -> None:
        self.wake.set()

    # -- start -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv, self._on_child_exit, self._color(len(self.children)))
        self.children.append(child)
        child.start(self.env, self.preexec)
        return child

    def _color(self, i: int) -> str:
        return _COLORS[i % len(_COLORS)] if sys.stdout.isatty() else ""

    def _wait_ready(self, child: Child, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not check():
            if self.stop_requested:
                raise StartFailed("stopped while starting")
            if not child.running:
                raise StartFailed(f"{child.name} exited while starting (see its output above)")
            if time.monotonic() > deadline:
                raise StartFailed(f"{child.name}: {what} not ready after {START_TIMEOUT_S:g} s")
            # A short wait on the wake event: a signal or a child's exit ends it at once.
            self.wake.wait(0.1)
            self.wake.clear()

    def _ping(self) -> bool:
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=1,
                                          socket_connect_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False

    def _subscribed(self, channel: str) -> bool:
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=1,
                                          socket_connect_timeout=1)
            try:
                counts = client.pubsub_numsub(channel)
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return False
        return bool(counts) and int(counts[0][1]) > 0

    def _api_ready(self, base: str) -> bool:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=2) as resp:  # noqa: S310
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start_redis(self) -> None:
        binary = shutil.which("redis-server") or next(
            (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server",
                         "/usr/local/bin/redis-server") if os.access(p, os.X_OK)),
            None,
        )
        if binary is None:
            raise StartFailed(
                "redis-server is not installed: install it (Debian/Ubuntu: "
                "sudo apt-get install redis-server) or give --redis-url / REDIS_URL"
            )
        port = _free_port()
        self.own_redis_dir = tempfile.mkdtemp(prefix="demo-redis-")
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        child = self._spawn("redis", [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.own_redis_dir, "--loglevel", "warning",
            "--client-output-buffer-limit", PUBSUB_BUFFER,
            # Its start-up banner and kernel-tuning warnings are noise in a demo:
            # they go to a file, shown only if Redis fails to start.
            "--logfile", os.path.join(self.own_redis_dir, "redis.log"),
        ])
        try:
            self._wait_ready(child, "redis", self._ping)
        except StartFailed:
            with contextlib.suppress(OSError), open(
                os.path.join(self.own_redis_dir, "redis.log"), errors="replace"
            ) as f:
                for line in f.readlines()[-20:]:
                    _print(f"{'redis':>14} | {line.rstrip()}")
            raise

    def start(self) -> str:
        a = self.args
        host_for_url = "127.0.0.1" if a.host in ("0.0.0.0", "::", "") else a.host  # noqa: S104
        if a.port is None:
            # The usual port when it is free, any free one otherwise: the URL is printed.
            port = DEFAULT_PORT if _port_free(a.host, DEFAULT_PORT) else _free_port(host_for_url)
        else:
            port = a.port or _free_port(host_for_url)
        if not _port_free(a.host, port):
            raise StartFailed(
                f"port {port} on {a.host} is in use; choose another with --port "
                "(--port 0 picks a free one)"
            )
        if self.redis_url:
            if not self._ping():
                raise StartFailed(f"Redis at {mask_url(self.redis_url)} does not answer")
        else:
            self.start_redis()
        py = sys.executable
        common = ["--redis-url", self.redis_url]
        if a.log_level:
            common += ["--log-level", a.log_level]
        updater = self._spawn("kv-updater", [py, "-m", "kv_updater", *common])
        # The channel the services will read (flags, environment, ./config.py, defaults).
        try:
            channel = load_settings(
                CommonSettings, ["--redis-url", self.redis_url], "demo-stack"
            ).channel
        except SettingsError as exc:
            raise StartFailed(str(exc)) from None
        self._wait_ready(updater, "subscription", lambda: self._subscribed(channel))
        api = self._spawn("api-server", [py, "-m", "api_server", *common, "--host", a.host,
                                         "--port", str(port)])
        base = f"http://{host_for_url}:{port}"
        self._wait_ready(api, "/ready", lambda: self._api_ready(base))
        self._spawn("demo-publisher", [py, "-m", "demo_publisher", *common, "--rate",
                                       str(a.rate), "--keys", str(a.keys)])
        return base

    # -- run and stop ------------------------------------------------------------------

    def stop_all(self) -> dict[str, int | None]:
        """Services first (together), Redis last, so nothing logs a Redis outage on the way."""
        codes: dict[str, int | None] = {}
        services = [c for c in self.children if c.name != "redis"]
        for group in (services, [c for c in self.children if c.name == "redis"]):
            for child in group:
                child.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for child in group:
                codes[child.name] = child.wait_stopped(deadline)
        if self.own_redis_dir:
            shutil.rmtree(self.own_redis_dir, ignore_errors=True)
        return codes

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        failed: str | None = None
        try:
            base = self.start()
        except StartFailed as exc:
            failed = str(exc)
        else:
            token = os.environ.get("API_TOKEN", "")
            query = f"?token={urllib.parse.quote(token)}" if token else ""
            redis_note = "its own redis-server" if self.own_redis_dir else "the given Redis"
            _print("")
            _print(f"  Dashboard  {base}/{query}")
            _print(f"  REST       {base}/keys    SSE  {base}/events    API docs  {base}/docs")
            _print(f"  Redis      {mask_url(self.redis_url)} ({redis_note})")
            _print("  Press Ctrl-C to stop.")
            _print("")
            while not self.stop_requested:
                # Relay threads set `wake` when a child exits; signals only set the flag.
                self.wake.wait(0.2)
                self.wake.clear()
                dead = [c for c in self.children if not c.running]
                if dead and not self.stop_requested:
                    code = dead[0].proc.returncode if dead[0].proc else None
                    failed = f"{dead[0].name} exited unexpectedly (code {code})"
                    break
        if failed and not self.stop_requested:
            _print(f"{PROG}: {failed}")
        elif failed:
            failed = None  # a Ctrl-C during start-up is a normal stop
        if not self.children:
            return 1 if failed else 0
        _print(f"{PROG}: stopping {', '.join(c.name for c in reversed(self.children))}")
        codes = self.stop_all()
        # Killed by our own SIGTERM (a service still starting has no handler yet) is a
        # clean stop too; only errors and the SIGKILL after the grace period are not.
        bad = {n: c for n, c in codes.items() if c not in (0, None, -signal.SIGTERM)}
        if bad:
            _print(f"{PROG}: unclean exits: {bad}")
        _print(f"{PROG}: stopped")
        return 1 if failed or bad else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the whole chain locally: Redis, kv_updater, api_server and "
        "demo_publisher, with the live dashboard.",
    )
    parser.add_argument("--port", type=int, default=None,
                        help=f"port of the api_server and dashboard (default {DEFAULT_PORT}, "
                             "or a free one when that is taken; 0 = a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the api_server binds (default 127.0.0.1; "
                             "0.0.0.0 to show the dashboard to other machines)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="demo messages per second (default 20)")
    parser.add_argument("--keys", type=int, default=16,
                        help="distinct demo keys (default 16)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""),
                        help="use this Redis instead of starting one (env REDIS_URL)")
    parser.add_argument("--log-level", default="",
                        help="log level of the services (default: theirs, INFO)")
    args = parser.parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.rate < 0 or args.keys < 1:
        parser.error("--rate must be >= 0 and --keys >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sys.exit(Stack(args).run())


if __name__ == "__main__":
    main()
