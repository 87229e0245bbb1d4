"""Redis going away and coming back, bursts, and a subscriber dropped by Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import hiredis
import orjson
import pytest
import redis
import uvloop
from harness import RedisServer, free_port, wait_until
from redis.exceptions import ConnectionError as RedisConnectionError
from updater_fixtures import (
    InProcessUpdater,
    RedisProxy,
    command,
    data_keys,
    expected_final,
    http_get,
    message,
    publish_all,
    scrape,
    settings_for,
    subscribers,
    updater_process,
    wait_log_count,
    wait_subscribed,
)

from kv_updater import resp, subscriber

BASE = datetime(2023, 10, 1, 12, 0, tzinfo=UTC)


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.split()[2:3] == ["ERROR"]]


def ready_status(port: int) -> int:
    return http_get(port, "/ready")[0]


class Publisher:
    """Publishes updates of a few keys non-stop, riding out Redis outages."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=2)
        while not self.stop.is_set():
            n = self.count
            try:
                publish_all(client, "update", [message(
                    f"k{n % 5}", updated=(BASE + timedelta(milliseconds=n)).isoformat(),
                    values={"n": n})])
            except redis.RedisError:
                self.stop.wait(0.05)  # pacing while Redis is away, not synchronisation
                continue
            self.count += 1
            self.stop.wait(0.002)
        client.close()

    def __enter__(self) -> Publisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.mark.slow
def test_redis_restarts_mid_stream_are_survived(own_redis: RedisServer) -> None:
    """Each outage: one ERROR (however many retries), /ready 503, then an INFO when
    back, /ready 200, and later messages land."""
    port = free_port()
    args = ["--metrics-port", str(port), "--log-level", "DEBUG"]
    with updater_process(own_redis.url, *args) as svc, Publisher(own_redis.url) as pub:
        wait_until(lambda: ready_status(port) == 200, 15, message="ready")
        client = own_redis.client()
        wait_until(lambda: client.exists("k4"), 10, message="the stream flowing")
        client.close()

        # Outage 1: down long enough for several retries.
        own_redis.stop()
        wait_until(lambda: ready_status(port) == 503, 15, message="/ready 503 while down")
        wait_log_count(svc, "still unavailable", 2)
        assert http_get(port, "/live")[0] == 200  # alive, just not ready
        own_redis.start()
        wait_until(lambda: ready_status(port) == 200, 20, message="/ready 200 when back")
        wait_log_count(svc, "Redis is back", 1)

        # Outage 2: a quick restart.
        own_redis.restart()
        wait_log_count(svc, "Redis is back", 2, 30)
        wait_until(lambda: ready_status(port) == 200, 20, message="/ready 200 again")

        # Later messages land (the restarted Redis holds nothing of before).
        client = own_redis.client()
        wait_subscribed(client, "update")
        sent = pub.count
        wait_until(lambda: max(_stored_n(client, f"k{i}") for i in range(5)) > sent, 15,
                   message="messages published after the restart")
        assert scrape(port, "kvupdater_reconnects_total") == 2
        client.close()
        errors = error_lines(svc.log)
        assert len(errors) == 2, "\n".join(errors)  # one per outage, not one per retry
        assert all("Redis unavailable" in line for line in errors)

        # A stop request during an outage still ends the process promptly, with 0.
        own_redis.stop()
        wait_until(lambda: ready_status(port) == 503, 15, message="/ready 503 while down")
        svc.signal(signal.SIGTERM)
        assert svc.wait(10) == 0


def _stored_n(client: redis.Redis, key: str) -> int:
    raw = cast(bytes | None, client.get(key))
    return -1 if raw is None else int(orjson.loads(raw)["values"]["n"])


@pytest.fixture
def small_pubsub_buffer(r: redis.Redis) -> Iterator[None]:
    """client-output-buffer-limit for pubsub of 1 MiB, restored afterwards."""
    before = cast(dict[str, str], r.config_get("client-output-buffer-limit"))
    r.config_set("client-output-buffer-limit", "pubsub 1mb 1mb 0")
    try:
        yield
    finally:
        r.config_set("client-output-buffer-limit", before["client-output-buffer-limit"])


@pytest.mark.slow
@pytest.mark.usefixtures("small_pubsub_buffer")
def test_a_subscriber_dropped_for_its_output_buffer_says_so_and_resubscribes(
    redis_url: str, r: redis.Redis
) -> None:
    port = free_port()
    with updater_process(redis_url, "--metrics-port", str(port)) as svc:
        wait_subscribed(r, "update")
        assert svc.proc is not None
        svc.signal(signal.SIGSTOP)  # an updater that falls behind, at its worst
        try:
            pad = "x" * 1000
            publish_all(r, "update", [message(f"k{i % 100}", values={"pad": pad, "i": i})
                                      for i in range(30_000)])
            wait_until(lambda: _updater_subscribers(r) == 0, 15,
                       message="Redis dropping the subscriber")
        finally:
            svc.signal(signal.SIGCONT)
        wait_until(lambda: scrape(port, "kvupdater_reconnects_total") == 1, 15,
                   message="one reconnect")
        wait_subscribed(r, "update")
        publish_all(r, "update", [message("after")])
        wait_until(partial(r.exists, "after"), 10, message="a message after the drop")
        svc.wait_log("Redis is back")
        (error,) = error_lines(svc.log)
    assert "client-output-buffer-limit" in error


def _updater_subscribers(r: redis.Redis) -> int:
    clients = cast(list[dict[str, object]], r.client_list())
    return sum(1 for c in clients if c.get("name") == "kv-updater" and c.get("sub") == "1")


@pytest.mark.slow
def test_a_burst_does_not_get_the_updater_dropped(redis_url: str, r: redis.Redis) -> None:
    """50k messages (about 40 MB, over Redis's default 32 MB pubsub hard limit) published
    as fast as a pipeline goes: never dropped, every key ends at its last value."""
    port = free_port()
    pad = "p" * 640
    stream = [message(f"burst{i % 1000}", updated=(BASE + timedelta(milliseconds=i)).isoformat(),
                      values={"i": i, "pad": pad}) for i in range(50_000)]
    assert sum(map(len, stream)) > 32 * 1024 * 1024
    with updater_process(redis_url, "--metrics-port", str(port)) as svc:
        wait_subscribed(r, "update")
        assert set(publish_all(r, "update", stream, chunk=10_000)) == {1}
        wait_until(lambda: scrape(port, "kvupdater_messages_received_total") == len(stream), 60,
                   message="every message received")
        wait_until(lambda: sum(scrape(port, f"kvupdater_messages_{w}_total") or 0 for w in (
            "committed", "superseded", "stale", "unchanged")) == len(stream), 30,
            message="every message committed or superseded")
        # Each commit is read back; the validation counts move last.
        wait_until(lambda: scrape(port, "kvupdater_validations_total") == scrape(
            port, "kvupdater_messages_committed_total"), 10, message="every commit read back")
        assert scrape(port, "kvupdater_reconnects_total") == 0
        assert scrape(port, "kvupdater_validation_failures_total") == 0
        assert error_lines(svc.log) == []
    final = expected_final(stream)
    assert len(final) == 1000
    assert {k.decode(): r.get(k) for k in data_keys(r)} == final


class HangingUpServer:
    """Accepts, answers the first command with ``reply`` and hangs up: what a proxy in
    front of a Redis that is still starting (docker-proxy, a load balancer) can do, or
    another server on the configured port."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn, contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(self.reply)

    def __enter__(self) -> HangingUpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize(
    "reply",
    [b"+OK\r\n", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"],
    ids=["hangs-up-mid-handshake", "not-redis"],
)
def test_a_peer_that_is_not_a_working_redis_does_not_crash_the_updater(reply: bytes) -> None:
    """Regressions: writing SUBSCRIBE to a transport the peer had just closed raised
    RuntimeError under uvloop, and a non-RESP answer raised hiredis.ProtocolError; both
    ended the process with a traceback instead of one ERROR and retries."""
    with HangingUpServer(reply) as server, \
            updater_process(f"redis://127.0.0.1:{server.port}/0") as svc:
        assert svc.proc is not None
        proc = svc.proc
        wait_until(lambda: server.accepted >= 4 or proc.poll() is not None, 20,
                   message="several connection attempts")
        assert proc.poll() is None, svc.log
        svc.signal(signal.SIGTERM)
        assert svc.wait(10) == 0, svc.log
    assert "Traceback" not in svc.log
    (error,) = error_lines(svc.log)
    assert "Redis unavailable" in error


def test_a_stop_while_the_network_is_silent_still_ends_within_seconds(
    redis_server: RedisServer, redis_url: str, r: redis.Redis
) -> None:
    """Regression: a take() already waiting when SIGTERM came waited for Redis's
    unsubscribe confirmation for ever; over a silent network the process never ended."""
    with RedisProxy(redis_server.host, redis_server.port) as proxy, \
            updater_process(proxy.url) as svc:
        wait_subscribed(r, "update")
        publish_all(r, "update", [message("before")])
        wait_until(partial(r.exists, "before"), 10, message="a first message")
        proxy.silence()
        svc.signal(signal.SIGTERM)
        assert svc.wait(10) == 0, svc.log
    assert "kv-updater: stopped" in svc.log


def test_a_killed_subscription_is_named_and_replaced(
    redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """CLIENT KILL of the subscriber while Redis keeps running: one ERROR saying so,
    a resubscription, and the next message lands."""
    caplog.set_level(logging.INFO, logger="kv_updater")
    with InProcessUpdater(settings_for(redis_url)) as up:
        assert command(r, "CLIENT", "KILL", "TYPE", "pubsub") == 1
        wait_until(lambda: up.metric("kvupdater_reconnects_total") == 1, 10,
                   message="a reconnect")
        wait_subscribed(r, "update")
        publish_all(r, "update", [message("after-kill")])
        wait_until(partial(r.exists, "after-kill"), 10, message="a message after the kill")
    errors = [rec.getMessage() for rec in caplog.records
              if rec.name == "kv_updater" and rec.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "while Redis kept running" in errors[0]
    assert any("Redis is back" in rec.getMessage() for rec in caplog.records)


def test_a_silent_network_is_noticed_by_an_idle_ping_and_the_updater_recovers(
    redis_server: RedisServer, redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: a subscription over a path that went silent (no FIN, no RST) looked
    like a quiet channel for ever - /ready stayed green while publishes were lost."""
    monkeypatch.setattr(subscriber, "IDLE_PING", 0.3)
    monkeypatch.setattr(subscriber, "PING_DEADLINE", 0.5)
    caplog.set_level(logging.INFO, logger="kv_updater")
    with RedisProxy(redis_server.host, redis_server.port) as proxy, \
            InProcessUpdater(settings_for(proxy.url)) as up:
        wait_subscribed(r, "update")
        publish_all(r, "update", [message("before-silence")])
        wait_until(partial(r.exists, "before-silence"), 10, message="a first message")
        proxy.silence()
        wait_until(lambda: up.metric("kvupdater_ready") == 0, 10, message="not ready")
        proxy.silent = False
        wait_until(lambda: up.metric("kvupdater_ready") == 1, 30, message="ready again")
        wait_until(lambda: subscribers(r, "update") >= 1, 10, message="a new subscription")
        publish_all(r, "update", [message("after-silence")])
        wait_until(partial(r.exists, "after-silence"), 20, message="a message after the silence")
    errors = [rec.getMessage() for rec in caplog.records
              if rec.name == "kv_updater" and rec.levelno == logging.ERROR]
    assert errors, caplog.text
    assert "no answer to PING" in errors[0], errors


def test_a_commit_link_whose_peer_hung_up_after_connect_raises_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (seen in CI while Redis restarted): a Redis shutting down accepted
    the commit link's connection and closed it before the handshake was written.
    uvloop raises RuntimeError on a write to a closed transport, which no caller's
    retry expects: demo_publisher ended with a traceback.  The write must raise the
    ConnectionError that callers back off on.  ``connect`` is wrapped only to make
    the race certain: it returns once the hang-up has reached the protocol."""
    real_connect = resp.connect

    async def connect_then_hang_up(url: str, protocol: Any, seconds: float) -> Any:
        transport, proto, kwargs = await real_connect(url, protocol, seconds)
        deadline = asyncio.get_running_loop().time() + 5
        while proto.lost is None:
            assert asyncio.get_running_loop().time() < deadline, "the hang-up never came"
            await asyncio.sleep(0.01)
        return transport, proto, kwargs

    monkeypatch.setattr(resp, "connect", connect_then_hang_up)

    async def scenario() -> None:
        class HangUp(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transport.close()

        loop = asyncio.get_running_loop()
        server = await loop.create_server(HangUp, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = resp.RespLink(f"redis://127.0.0.1:{port}/0", client_name="t", timeout=5)
        with pytest.raises(RedisConnectionError, match="lost"):
            await link.request(hiredis.pack_command(("PING",)), 1)
        assert not link.connected
        server.close()

    uvloop.run(scenario())
