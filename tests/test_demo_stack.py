"""The local one-command demo (python -m demo_publisher.stack), end to end, as a process.

It must bring the whole chain up, fill /keys and stream /events, print the
dashboard URL, and on Ctrl-C stop every child it started and exit 0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from harness import ROOT, Service, free_port, wait_until

pytestmark = pytest.mark.slow


def children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                if kid not in found:
                    found.add(kid)
                    todo.append(kid)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def keys(base: str, token: str = "") -> list[dict[str, Any]]:
    try:
        resp = httpx.get(f"{base}/keys", params={"token": token} if token else {}, timeout=2)
    except httpx.HTTPError:
        return []
    return list(resp.json()["keys"]) if resp.status_code == 200 else []


def read_events(base: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` update events of a new /events stream."""
    events: list[dict[str, Any]] = []
    event_type = ""
    with httpx.stream("GET", f"{base}/events", timeout=httpx.Timeout(10)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event_type = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event_type == "update":
                events.append(orjson.loads(line.split(":", 1)[1]))
                if len(events) >= n:
                    break
    return events


def start_stack(port: int, redis_url: str = "", rate: str = "50", keys_n: str = "8",
                token: str = "") -> Service:
    # REDIS_URL="" whatever the caller's environment holds: the stack starts its own Redis.
    return Service(
        "demo_publisher.stack",
        ["--port", str(port), "--rate", rate, "--keys", keys_n],
        env={"REDIS_URL": redis_url, "API_TOKEN": token},
    ).start()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_stack_runs_the_chain_and_stops_on_ctrl_c() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack = start_stack(port)
    try:
        log = stack.wait_log("Press Ctrl-C to stop", 60)
        assert f"Dashboard  {base}/" in log
        assert "its own redis-server" in log
        assert stack.proc is not None
        kids = children(stack.proc.pid)
        commands = " | ".join(cmdline(k) for k in kids)
        for part in ("redis-server", "kv_updater", "api_server", "demo_publisher"):
            assert part in commands, commands

        wait_until(lambda: len(keys(base)) >= 8, 20, message="8 demo keys in /keys")
        events = read_events(base, 10)
        assert {"type", "updated", "valid", "values", "seq"} <= set(events[0])
        assert len({e["type"] for e in events}) >= 8  # the snapshot: every key once
        page = httpx.get(f"{base}/", timeout=5)
        assert page.status_code == 200
        assert "static/app.js" in page.text

        stack.signal(signal.SIGINT)
        assert stack.wait(30) == 0, stack.log
    finally:
        stack.stop()
    assert not [k for k in kids if alive(k)], "children left behind"
    log = stack.log
    assert "demo: stopped" in log
    assert "unclean" not in log
    # The publisher reported its progress while it ran.
    assert re.search(r"demo-publisher \| .*stopped: sent \d+ messages", log), log


def test_stack_on_a_given_redis_stops_all_when_a_child_dies(redis_url: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack = start_stack(port, redis_url=redis_url, rate="30", keys_n="4", token="tok-1")
    try:
        log = stack.wait_log("Press Ctrl-C to stop", 60)
        assert "the given Redis" in log
        # API_TOKEN reaches the api_server, and the printed URL carries it.
        assert f"Dashboard  {base}/?token=tok-1" in log
        assert httpx.get(f"{base}/keys", timeout=5).status_code == 401
        assert stack.proc is not None
        kids = children(stack.proc.pid)
        assert not any("redis-server" in cmdline(k) for k in kids)
        wait_until(lambda: len(keys(base, "tok-1")) >= 4, 20, message="4 demo keys in /keys")

        updater = next(k for k in kids if "kv_updater" in cmdline(k))
        os.kill(updater, signal.SIGKILL)
        assert stack.wait(30) == 1, stack.log
    finally:
        stack.stop()
    assert not [k for k in kids if alive(k)], "children left behind"
    assert "kv-updater exited unexpectedly" in stack.log


def test_ctrl_c_while_starting_stops_what_was_started(redis_url: str) -> None:
    stack = start_stack(free_port(), redis_url=redis_url)
    try:
        stack.wait_log("kv-updater |", 30)
        assert stack.proc is not None
        kids = children(stack.proc.pid)
        stack.signal(signal.SIGINT)
        assert stack.wait(30) == 0, stack.log
    finally:
        stack.stop()
    assert not [k for k in kids | children_seen(stack.log) if alive(k)], "children left behind"
    assert "Dashboard" not in stack.log


def children_seen(log: str) -> set[int]:
    """PIDs the services printed (uvicorn's "Started server process [N]")."""
    return {int(n) for n in re.findall(r"server process \[(\d+)\]", log)}


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = start_stack(port)
        assert stack.wait(30) == 1
    assert f"port {port}" in stack.log
    assert "in use" in stack.log


def test_demo_script_runs_the_stack(redis_url: str, tmp_path: Path) -> None:
    """./demo itself: with the project importable it installs nothing and runs the stack."""
    port = free_port()
    log_path = tmp_path / "demo.log"
    env = {**os.environ, "DEMO_VENV": sys.prefix, "REDIS_URL": redis_url, "API_TOKEN": "",
           "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(ROOT / "demo"), "--port", str(port), "--rate", "20",
                                 "--keys", "3"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path)
    try:
        def started() -> bool:
            text = log_path.read_text(errors="replace")
            assert proc.poll() is None, text
            return "Press Ctrl-C to stop" in text

        wait_until(started, 60, message="the stack's banner")
        wait_until(lambda: len(keys(f"http://127.0.0.1:{port}")) >= 3, 20,
                   message="3 demo keys in /keys")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log_path.read_text()
    assert "installing" not in text
    assert "demo: stopped" in text
