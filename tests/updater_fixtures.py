"""Helpers for the kv_updater tests: an in-process updater, listeners, publishers, oracles.

Everything here talks to the real Redis of the harness; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import orjson
import redis
from harness import ROOT, Service, free_port, wait_until

from kv_updater import Accepted, KVUpdater, Rejected
from kv_updater.commit import BatchOutcome
from kv_updater.settings import UpdaterSettings

SEED_MESSAGE = b"""{
"type": "key",
"updated": "2023-10-01T12:00:00Z",
"valid": "2023-10-01T12:05:32Z",
"values": {
"field1": "value1",
"field2": "value2"
}
}"""
SEED_STORED = (
    b'{"updated":"2023-10-01T12:00:00Z","valid":"2023-10-01T12:05:32Z",'
    b'"values":{"field1":"value1","field2":"value2"}}'
)
NAMESPACE_KEYS = {b"kvupdater:seq", b"kvupdater:index", b"kvupdater:instants"}


def settings_for(redis_url: str, **overrides: Any) -> UpdaterSettings:
    """Updater settings for a test; keyword names are the settings' keys (``validate``...)."""
    return UpdaterSettings.model_validate({"redis_url": redis_url, **overrides})


def message(
    type_: str,
    updated: str = "2023-10-01T12:00:00Z",
    values: dict[str, Any] | None = None,
    valid: str | None = None,
    **extra: Any,
) -> bytes:
    doc: dict[str, Any] = {"type": type_, "updated": updated}
    if valid is not None:
        doc["valid"] = valid
    doc["values"] = {"v": 1} if values is None else values
    doc.update(extra)
    return orjson.dumps(doc)


def stored_of(updated: str, values: dict[str, Any], valid: str | None = None) -> bytes:
    return orjson.dumps({"updated": updated, "valid": valid, "values": values})


# -- an instant oracle, independent of kv_updater.instant -----------------------------
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def instant(text: str) -> Decimal:
    """Seconds since the epoch, exactly, of an RFC 3339 date-time (the tests' oracle)."""
    m = _RFC3339.fullmatch(text)
    assert m is not None, text
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    whole = calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0))
    whole += second - min(second, 59)  # a leap second is one second after :59
    offset = m.group(8)
    if offset not in ("Z", "z"):
        sign = 1 if offset[0] == "+" else -1
        whole -= sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    return whole + Decimal("0" + (m.group(7) or ".0"))


def is_rfc3339(text: str) -> bool:
    """Whether ``text`` is an RFC 3339 date-time with offset (the tests' oracle)."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    offset = m.group(8)
    if len(offset) == 6 and (int(offset[1:3]) > 23 or int(offset[4:6]) > 59):
        return False
    if not (year >= 1 and 1 <= month <= 12 and hour <= 23 and minute <= 59 and second <= 60):
        return False
    return 1 <= day <= calendar.monthrange(year, month)[1]


def expected_final(stream: Iterable[bytes]) -> dict[str, bytes]:
    """Per type, the stored value the DESIGN's rules must leave after ``stream`` (in order):
    the latest instant wins, and on equal instants the later arrival."""
    best: dict[str, tuple[Decimal, bytes]] = {}
    for raw in stream:
        doc = orjson.loads(raw)
        at = instant(doc["updated"])
        held = best.get(doc["type"])
        if held is None or at >= held[0]:
            best[doc["type"]] = (at, stored_of(doc["updated"], doc["values"], doc.get("valid")))
    return {type_: value for type_, (_, value) in best.items()}


# -- running things -------------------------------------------------------------------
class Persister:
    """One updater and one event loop for many persist_data / commit calls."""

    def __init__(self, settings: UpdaterSettings) -> None:
        self.runner = asyncio.Runner()
        self.updater = KVUpdater(settings=settings)

    def __call__(self, raw: bytes | str) -> BatchOutcome | Rejected:
        return self.runner.run(self.updater.persist_data(raw))

    def ok(self, raw: bytes | str) -> int:
        """persist_data of a message that must be accepted; its status (seq, 0 or -1)."""
        result = self(raw)
        assert isinstance(result, BatchOutcome), result
        (status,) = result.statuses
        return status

    def commit(self, raws: Sequence[bytes]) -> BatchOutcome:
        """Parse ``raws`` with the updater's rules and commit them as one atomic batch."""
        batch = []
        for raw in raws:
            parsed = self.updater.rules.parse(raw)
            assert isinstance(parsed, Accepted), parsed
            batch.append(parsed)
        return self.runner.run(self.updater.committer.commit(batch))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.updater.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def close(self) -> None:
        self.updater.committer.close()
        self.runner.run(self.updater.client.aclose())
        self.runner.close()

    def __enter__(self) -> Persister:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessUpdater:
    """``KVUpdater.run()`` on an event loop of its own thread, stopped like SIGTERM does."""

    def __init__(self, settings: UpdaterSettings | KVUpdater) -> None:
        self.updater = (
            settings if isinstance(settings, KVUpdater) else KVUpdater(settings=settings)
        )
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="kv-updater-test", daemon=True)

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.updater.run())
        except BaseException as exc:
            self.error = exc
        finally:
            self.loop.close()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.updater.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def start(self) -> InProcessUpdater:
        self.thread.start()
        wait_until(lambda: self.updater.ready or not self.thread.is_alive(), 15, message="ready")
        assert self.thread.is_alive(), f"updater died: {self.error!r}"
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.updater.stop)
            self.thread.join(timeout)
        assert not self.thread.is_alive(), "updater did not stop"
        assert self.error is None, f"run() raised {self.error!r}"

    def __enter__(self) -> InProcessUpdater:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Listener:
    """Collects every payload published on a channel, from a thread of its own."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
        self.pubsub.subscribe(channel)
        wait_until(self._confirmed, 10, message=f"subscription to {channel}")
        self.payloads: list[bytes] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _confirmed(self) -> bool:
        msg = self.pubsub.get_message(timeout=0.1)
        return msg is not None and msg["type"] == "subscribe"

    def _main(self) -> None:
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.05)
            if msg is not None and msg["type"] == "message":
                self.payloads.append(msg["data"])

    def wait_count(self, count: int, timeout: float = 15.0) -> list[bytes]:
        wait_until(lambda: len(self.payloads) >= count, timeout, message=f"{count} notifications")
        return list(self.payloads)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.pubsub.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish_all(
    client: redis.Redis, channel: str, payloads: Sequence[bytes], chunk: int = 2000
) -> list[int]:
    """PUBLISH every payload, pipelined; returns each one's receiver count."""
    receivers: list[int] = []
    for start in range(0, len(payloads), chunk):
        pipe = client.pipeline(transaction=False)
        for payload in payloads[start : start + chunk]:
            pipe.publish(channel, payload)
        receivers += [int(n) for n in pipe.execute()]
    return receivers


def subscribers(client: redis.Redis, channel: str) -> int:
    """How many clients Redis counts as subscribed to ``channel``."""
    return int(cast(list[tuple[bytes, int]], client.pubsub_numsub(channel))[0][1])


def wait_subscribed(client: redis.Redis, channel: str, count: int = 1,
                    timeout: float = 15.0) -> None:
    wait_until(lambda: subscribers(client, channel) >= count, timeout,
               message=f"{count} subscriber(s) on {channel}")


def all_keys(client: redis.Redis) -> set[bytes]:
    return set(cast(list[bytes], client.keys("*")))


def data_keys(client: redis.Redis) -> set[bytes]:
    return {k for k in all_keys(client) if not k.startswith(b"kvupdater:")}


def index_of(client: redis.Redis) -> dict[str, int]:
    """``kvupdater:index`` as type -> seq."""
    pairs = cast(
        list[tuple[bytes, float]], client.zrange("kvupdater:index", 0, -1, withscores=True)
    )
    return {k.decode(): int(s) for k, s in pairs}


def stream_entries(client: redis.Redis, name: str) -> list[dict[bytes, bytes]]:
    """The fields of every entry of a stream, oldest first."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(name, "-", "+"))
    return [fields for _, fields in entries]


def command(client: redis.Redis, *args: str) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def check_commit_bookkeeping(client: redis.Redis, notes: list[bytes]) -> dict[str, dict[str, Any]]:
    """The contract between seq, index, stored values and notifications, for a finished run.

    Returns the last notification of every type.
    """
    docs = [orjson.loads(n) for n in notes]
    seqs = [d["seq"] for d in docs]
    assert sorted(seqs) == list(range(1, len(docs) + 1)), "one notification per seq, no gap"
    assert int(client.get("kvupdater:seq") or 0) == len(docs)
    last: dict[str, dict[str, Any]] = {}
    for doc in sorted(docs, key=lambda d: d["seq"]):
        before = last.get(doc["type"])
        if before is not None:
            assert instant(doc["updated"]) >= instant(before["updated"]), "a commit went back"
        last[doc["type"]] = doc
    assert index_of(client) == {t: d["seq"] for t, d in last.items()}
    for type_, doc in last.items():
        stored = {k: doc[k] for k in ("updated", "valid", "values")}
        assert client.get(type_) == orjson.dumps(stored)
    return last


READBACK = re.compile(rb"\*\d+\r\n\$4\r\nMGET\r\n")


class RedisProxy:
    """Forwards TCP to Redis.  ``arm(action)`` runs ``action`` between a commit and its
    read-back; ``silence()`` drops every byte from then on, both ways, without closing
    anything: a network gone quiet."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = free_port()
        self.action: Callable[[], object] | None = None
        self.fired = threading.Event()
        self.silent = False
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._started.set()
        self.loop.run_forever()
        self.loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, hold: bool) -> None:
            try:
                while data := await src.read(65536):
                    if self.silent:
                        continue
                    match = READBACK.search(data) if hold and self.action else None
                    if match is not None and self.action is not None:
                        action, self.action = self.action, None
                        dst.write(data[: match.start()])  # the commit goes on...
                        await dst.drain()
                        await asyncio.get_running_loop().run_in_executor(None, action)
                        self.fired.set()
                        data = data[match.start() :]  # ...the read-back after the action
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def silence(self) -> None:
        self.silent = True

    def arm(self, action: Callable[[], object]) -> None:
        self.fired.clear()
        self.action = action

    def __enter__(self) -> RedisProxy:
        self.thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self.thread.join(10)


# -- processes and HTTP ---------------------------------------------------------------
def updater_process(redis_url: str, *args: str, env: dict[str, str] | None = None,
                    cwd: Path | None = None) -> Service:
    return Service("kv_updater", ["--redis-url", redis_url, *args], env=env, cwd=cwd)


def wait_log_count(svc: Service, text: str, count: int, timeout: float = 15.0) -> None:
    """Wait until ``text`` is ``count`` times in the service's log; show the log if not."""
    try:
        wait_until(lambda: svc.log.count(text) >= count, timeout,
                   message=f"{count} x {text!r} in the log")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- log ---\n{svc.log[-6000:]}") from None


def run_cli(args: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m kv_updater ...`` to completion, stdout and stderr apart."""
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "CONFIG_FILE"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kv_updater", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout,
        check=False,
    )


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def _samples(port: int) -> list[tuple[str, dict[str, str], float]] | None:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(port, "/metrics")
    if status != 200:
        return None
    return [(s.name, s.labels, float(s.value))
            for family in text_string_to_metric_families(body) for s in family.samples]


def scrape(port: int, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample of the Prometheus text on ``/metrics`` (None when absent)."""
    for sample, sample_labels, value in _samples(port) or []:
        if sample == name and sample_labels == (labels or {}):
            return value
    return None


def scrape_sum(port: int, name: str) -> float:
    """The sum of a metric over all its labels (0 when absent)."""
    return sum(value for sample, _, value in _samples(port) or [] if sample == name)


@contextlib.contextmanager
def acl_user(client: redis.Redis, user: str, password: str) -> Iterator[None]:
    command(client, "ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    try:
        yield
    finally:
        command(client, "ACL", "DELUSER", user)
