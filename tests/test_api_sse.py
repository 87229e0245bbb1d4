"""The SSE stream: snapshot then live with no gap and no duplicate, resume, filter,
conflation, limits and clean-up - against a real api_server and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import subprocess
import threading
import time
from queue import Empty, Queue

import httpx
import pytest
import redis
import uvicorn
from api_fixtures import (
    Api,
    CommitLog,
    Follower,
    SseStream,
    Writer,
    check_against_log,
    commit_sync,
    kv_state,
    message,
    running_api,
    until,
)
from harness import free_port, wait_until

from api_server.app import create_app
from api_server.settings import ApiSettings
from kv_updater.settings import load_settings


def _events_path(keys: str | None = None, last: int | None = None) -> str:
    params = []
    if keys is not None:
        params.append(f"keys={keys}")
    if last is not None:
        params.append(f"last_event_id={last}")
    return "/events" + ("?" + "&".join(params) if params else "")


async def _writer_loop(writer: Writer, types: list[str], stop: asyncio.Event,
                       rng: random.Random) -> int:
    """Commit 1-5 random keys per atomic batch until ``stop``; returns commits made."""
    made = 0
    while not stop.is_set():
        batch = [message(rng.choice(types), writer.log.next_n()) for _ in range(rng.randint(1, 5))]
        made += sum(1 for s in await writer.commit(batch) if s > 0)
        await asyncio.sleep(0)
    return made


@pytest.mark.smoke
def test_snapshot_then_live_under_concurrent_commits(redis_url: str, r: redis.Redis) -> None:
    """Clients join while commits race their snapshot: each one ends holding the KV,
    ids strictly increase (no duplicate), and every event is the commit of its id."""
    types = [f"k{i}" for i in range(60)]
    log = commit_sync(redis_url, types)
    rng = random.Random(3)

    async def scenario(api: Api) -> None:
        writer = Writer(redis_url, log)
        stop = asyncio.Event()
        writing = asyncio.create_task(_writer_loop(writer, types, stop, rng))
        followers: list[tuple[Follower, frozenset[str] | None]] = []
        for i in range(30):
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # spread the joins over the writes
            subset = frozenset(rng.sample(types, 5)) if i % 3 == 1 else None
            path = _events_path(",".join(sorted(subset)) if subset else None)
            stream = await SseStream.open(api.port, path)
            assert stream.status == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            followers.append((Follower(stream), subset))
        # Let every client read while commits keep coming.
        await asyncio.gather(*(f.read_until(lambda f: len(f.ids) >= 5) for f, _ in followers))
        stop.set()
        made = await writing
        assert made > 200, "the writer should have raced the snapshots"
        for follower, subset in followers:
            expected = kv_state(r, subset)
            await follower.read_until(lambda f, e=expected: f.state == e)
            check_against_log(follower, log)
            follower.stream.close()
        await writer.close()

    with running_api(redis_url) as api:
        asyncio.run(scenario(api))


def test_filter_sends_only_the_listed_keys(redis_url: str, r: redis.Redis) -> None:
    log = commit_sync(redis_url, ["a", "b", "c", "d"])

    async def scenario(api: Api) -> None:
        comma = Follower(await SseStream.open(api.port, "/events?keys=a,c"))
        repeated = Follower(await SseStream.open(api.port, "/events?keys=b&keys=c"))
        await comma.read_until(lambda f: set(f.state) == {"a", "c"})
        await repeated.read_until(lambda f: set(f.state) == {"b", "c"})
        writer = Writer(redis_url, log)
        for t in ("d", "a", "b", "d", "c"):
            await writer.put(t)
        await comma.read_until(lambda f: f.state == kv_state(r, frozenset({"a", "c"})))
        await repeated.read_until(lambda f: f.state == kv_state(r, frozenset({"b", "c"})))
        assert {doc["type"] for doc in comma.state.values()} == {"a", "c"}
        assert all(log.by_seq[i][0] in {"a", "c"} for i in comma.ids)
        assert all(log.by_seq[i][0] in {"b", "c"} for i in repeated.ids)
        bad = await SseStream.open(api.port, "/events?keys=a,kvupdater:seq")
        assert bad.status == 400
        await writer.close()

    with running_api(redis_url) as api:
        asyncio.run(scenario(api))


@pytest.mark.smoke
def test_resume_after_a_dropped_connection_while_commits_continue(
    redis_url: str, r: redis.Redis
) -> None:
    types = [f"t{i}" for i in range(40)]
    log = commit_sync(redis_url, types)
    rng = random.Random(7)

    async def scenario(api: Api) -> None:
        writer = Writer(redis_url, log)
        stop = asyncio.Event()
        writing = asyncio.create_task(_writer_loop(writer, types, stop, rng))
        first = Follower(await SseStream.open(api.port))
        await first.read_until(lambda f: len(f.ids) >= 60)
        first.stream.close()  # dropped mid-stream; commits go on
        dropped_at = first.last_id
        await writer.put("t0")  # at least one commit while nobody listens
        # Resume as EventSource does (header), and as a header-less client (query).
        by_header = Follower(
            await SseStream.open(api.port, headers={"Last-Event-ID": str(dropped_at)}),
            state=dict(first.state),
        )
        by_query = Follower(
            await SseStream.open(api.port, _events_path(last=dropped_at)),
            state=dict(first.state),
        )
        await by_header.read_until(lambda f: len(f.ids) >= 20)
        stop.set()
        await writing
        expected = kv_state(r)
        for follower in (by_header, by_query):
            await follower.read_until(lambda f: f.state == expected)
            assert min(follower.ids) > dropped_at, "a resume sends only what came after"
            check_against_log(follower, log)
            follower.stream.close()
        # The header wins over the query (a browser's reconnect keeps the old URL).
        both = Follower(await SseStream.open(
            api.port, _events_path(last=0), headers={"Last-Event-ID": str(expected["t0"]["seq"])}
        ))
        await writer.put("t1")
        await both.read_until(lambda f: "t1" in f.state and f.state["t1"] == kv_state(r)["t1"])
        assert "t0" not in both.state
        await writer.close()

    with running_api(redis_url) as api:
        asyncio.run(scenario(api))


def test_a_slow_reader_gets_conflated_values_and_memory_stays_bounded(
    redis_url: str, r: redis.Redis
) -> None:
    """A client that does not read while 4 keys change 300 times (~10 MB of values)
    costs the server at most one pending value per key; it then catches up to the KV."""
    types = ["s0", "s1", "s2", "s3"]
    log = commit_sync(redis_url, types)

    async def scenario(api: Api) -> None:
        slow = Follower(await SseStream.open(api.port, rcvbuf=4096, limit=65536))
        await slow.read_until(lambda f: len(f.state) == 4)
        # A reader that keeps up, in the same flushes as the stalled one: the hub
        # writes it the shared chunk while the stalled one goes through its pending.
        fast = Follower(await SseStream.open(api.port))
        await fast.read_until(lambda f: len(f.state) == 4)
        writer = Writer(redis_url, log)
        rss_before = api.stats()["rss_bytes"]
        for i in range(300):
            seq = await writer.put(types[i % 4], pad=32_000)
            await fast.read_until(lambda f, seq=seq: f.last_id >= seq)
        # The stalled client holds at most one pending value per key at the server.
        wait_until(lambda: api.stats()["commits_received"] >= 300, 20,
                   message="the hub to receive every commit")
        stats = api.stats()
        assert stats["pending_values"] <= 4, stats
        assert stats["values_conflated"] > 0, stats
        # ~10 MB went through the hub; the server kept only what one write holds.
        assert stats["rss_bytes"] - rss_before < 6 * 2**20, (rss_before, stats)
        expected = kv_state(r)
        assert fast.state == expected
        check_against_log(fast, log)
        await slow.read_until(lambda f: f.state == expected, within=30)
        check_against_log(slow, log)
        assert len(slow.ids) < 304, "a stalled reader should have skipped superseded values"
        assert api.metric("api_sse_values_conflated_total") > 0
        slow.stream.close()
        await writer.close()

    with running_api(redis_url) as api:
        asyncio.run(scenario(api))


def test_curl_n_as_the_sse_client(redis_url: str) -> None:
    commit_sync(redis_url, ["x", "y"])
    with running_api(redis_url, ["--keepalive-seconds", "0.3"]) as api:
        proc = subprocess.Popen(
            ["curl", "-N", "-s", f"{api.base}/events?keys=x,y"],
            stdout=subprocess.PIPE, text=True,
        )
        lines: Queue[str] = Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        seen: list[str] = []

        def read_until(text: str, timeout: float = 15.0) -> None:
            deadline = time.monotonic() + timeout
            while text not in seen:
                try:
                    seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
                except Empty:
                    raise AssertionError(f"curl never printed {text!r}; got {seen}") from None

        try:
            read_until("id: 2")
            commit_sync(redis_url, ["y", "x"], CommitLog(counter=10))
            read_until("id: 4")
            read_until(": keep-alive")
        finally:
            proc.terminate()
            proc.wait(10)
        ids = [line for line in seen if line.startswith("id: ")]
        assert ids == ["id: 1", "id: 2", "id: 3", "id: 4"]
        assert seen.count("event: update") == 4
        data = [line for line in seen if line.startswith("data: ")]
        assert data[2].startswith('data: {"type":"y",')
        assert data[2].endswith(',"seq":3}')


def test_client_limit_answers_503_and_frees_the_slot_at_once(redis_url: str) -> None:
    async def scenario(api: Api) -> None:
        held = [await SseStream.open(api.port) for _ in range(3)]
        assert all(s.status == 200 for s in held)
        refused = await SseStream.open(api.port)
        assert refused.status == 503
        assert refused.headers.get("retry-after") == "5"
        assert b"too many SSE clients" in refused.body
        await held[0].aclose()
        wait_until(lambda: api.stats()["clients"] == 2, 10, message="the slot to be freed")
        again = await SseStream.open(api.port)
        assert again.status == 200
        for s in (*held[1:], again):
            await s.aclose()

    with running_api(redis_url, ["--max-sse-clients", "3"]) as api:
        asyncio.run(scenario(api))


def test_disconnect_cleanup_500_clients_back_to_baseline(redis_url: str) -> None:
    """500 clients come and go with nothing published: clients, tasks and allocated
    memory of the server return to their baseline."""
    commit_sync(redis_url, [f"c{i}" for i in range(10)])

    async def wave(api: Api, n: int) -> dict[str, int]:
        streams: list[SseStream] = []
        for start in range(0, n, 100):
            streams += await asyncio.gather(
                *(SseStream.open(api.port) for _ in range(min(100, n - start)))
            )
        followers = [Follower(s) for s in streams]
        await asyncio.gather(*(f.read_until(lambda f: len(f.state) == 10) for f in followers))
        peak = api.stats(collect=True)
        assert peak["clients"] == n
        await asyncio.gather(*(s.aclose() for s in streams))
        return peak

    with running_api(redis_url) as api:
        asyncio.run(wave(api, 100))  # warm caches and allocator pools
        wait_until(lambda: api.stats()["clients"] == 0, 10, message="warm-up clients gone")
        base = api.stats(collect=True)
        peak = asyncio.run(wave(api, 500))
        # The measure is sensitive enough: 500 live clients show clearly.
        assert peak["allocated_blocks"] - base["allocated_blocks"] > 40_000, (base, peak)
        wait_until(lambda: api.stats()["clients"] == 0, 10, message="500 clients cleaned up")
        after = wait_until(
            lambda: (s := api.stats(collect=True))["tasks"] <= base["tasks"] and s, 10,
            message="tasks back to baseline",
        )
        grown = after["allocated_blocks"] - base["allocated_blocks"]
        assert grown < 20_000, f"{grown} allocated blocks more than before 500 clients"
        assert after["rss_bytes"] - base["rss_bytes"] < 16 * 2**20, (base, after)
        assert after["pending_values"] == 0


def test_keepalive_comments_and_head_requests(redis_url: str) -> None:
    async def scenario(api: Api) -> None:
        stream = await SseStream.open(api.port)
        assert stream.headers.get("cache-control") == "no-store"
        follower = Follower(stream)
        # Nothing is committed: only comments arrive, and they carry no id.
        task = asyncio.create_task(follower.read_until(lambda f: False, within=60))
        await until(lambda: stream.comments >= 2, 10, "two keep-alive comments")
        task.cancel()
        assert follower.ids == []
        assert stream.retry == 1000
        await stream.aclose()

    with running_api(redis_url, ["--keepalive-seconds", "0.2"]) as api:
        asyncio.run(scenario(api))
        head = httpx.head(f"{api.base}/events", timeout=5)
        assert head.status_code == 405  # /events is GET only; no stream may be left behind
        wait_until(lambda: api.stats()["clients"] == 0, 10, message="no client left")


def test_live_commits_are_written_by_the_hub_without_waking_each_client(
    redis_url: str, r: redis.Redis
) -> None:
    """Guards the fan-out's hot path (api_server.sse): under ``python -m api_server``
    live commits go straight from the hub to each socket.  An uvicorn upgrade that
    changes what the direct writer relies on would silently fall back to one task
    wake-up per client per flush (half the fan-out); this fails instead."""
    types = ["p0", "p1", "p2"]
    log = commit_sync(redis_url, types)

    async def scenario(api: Api) -> None:
        followers = [Follower(await SseStream.open(api.port)) for _ in range(5)]
        for follower in followers:
            await follower.read_until(lambda f: len(f.state) == 3)
        writer = Writer(redis_url, log)
        for i in range(30):
            await writer.put(types[i % 3])
        expected = kv_state(r)
        for follower in followers:
            await follower.read_until(lambda f, e=expected: f.state == e)
            check_against_log(follower, log)
        stats = api.stats()
        live = stats["events_sent"] - stats["snapshot_events"]
        assert live > 0, stats  # fewer than 5 x 30 when commits came together (conflation)
        assert stats["events_pushed"] == live, stats
        for follower in followers:
            await follower.stream.aclose()
        await writer.close()

    with running_api(redis_url) as api:
        asyncio.run(scenario(api))


def test_streams_work_through_plain_asgi_send_where_there_is_no_direct_path(
    redis_url: str, r: redis.Redis
) -> None:
    """The app under another HTTP implementation (uvicorn's h11 protocol, in a thread
    of this process): no direct writer, every byte through ASGI ``send`` - snapshot,
    live commits and keep-alives all still arrive."""
    types = ["h0", "h1"]
    log = commit_sync(redis_url, types)
    settings = load_settings(
        ApiSettings, ["--redis-url", redis_url, "--keepalive-seconds", "0.2"], "api-server"
    )
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, http="h11", ws="none", lifespan="on",
        log_config=None, timeout_graceful_shutdown=2,
    ))
    thread = threading.Thread(target=server.run, name="uvicorn-h11", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 20, message="uvicorn (h11) to start")

        async def scenario() -> None:
            stream = await SseStream.open(port)
            assert stream.status == 200
            follower = Follower(stream)
            await follower.read_until(lambda f: len(f.state) == 2)
            writer = Writer(redis_url, log)
            for i in range(20):
                await writer.put(types[i % 2])
            expected = kv_state(r)
            await follower.read_until(lambda f: f.state == expected)
            check_against_log(follower, log)
            comments = stream.comments
            reading = asyncio.create_task(follower.read_until(lambda f: False, within=60))
            await until(lambda: stream.comments > comments, 10, "a keep-alive comment")
            reading.cancel()
            await stream.aclose()
            await writer.close()

        asyncio.run(scenario())
        stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()
        assert stats["events_pushed"] == 0, stats
        # The snapshot's 2, then live ones (fewer than 20 when commits came together).
        assert stats["events_sent"] > 2, stats
    finally:
        server.should_exit = True
        thread.join(15)
    assert not thread.is_alive()


def test_a_client_that_stops_reading_is_disconnected_after_the_stall_timeout(
    redis_url: str, r: redis.Redis
) -> None:
    """Prevents a client that takes no bytes - a frozen tab, a peer gone without a
    FIN, a stranger holding slots - from keeping its connection and its place under
    max_sse_clients for good.  A client that reads is not touched."""
    types = ["z0", "z1"]
    log = commit_sync(redis_url, types)

    async def scenario(api: Api) -> None:
        stuck = await SseStream.open(api.port, rcvbuf=4096, limit=65536)  # never read
        healthy = Follower(await SseStream.open(api.port))
        await healthy.read_until(lambda f: len(f.state) == 2)
        writer = Writer(redis_url, log)
        for i in range(300):  # ~10 MB: fills the stuck client's buffers, its transport pauses
            await writer.put(types[i % 2], pad=32_000)
        await healthy.read_until(lambda f: f.state == kv_state(r), within=30)
        wait_until(lambda: api.stats()["streams_closed_stalled"] == 1, 20,
                   message="the stalled stream to be closed")

        async def to_the_end() -> None:
            with contextlib.suppress(ConnectionError):
                while await stuck.reader.read(1 << 20):
                    pass

        await asyncio.wait_for(to_the_end(), 20)  # the server dropped the connection
        wait_until(lambda: api.stats()["clients"] == 1, 10, message="the slot freed")
        assert api.metric("api_sse_closed_stalled_total") == 1
        # The reader that kept up is still served.
        seq = await writer.put("z0")
        await healthy.read_until(lambda f: f.last_id >= seq)
        await healthy.stream.aclose()
        await writer.close()

    with running_api(redis_url, ["--keepalive-seconds", "0.2", "--sse-stall-timeout", "1"]) as api:
        asyncio.run(scenario(api))


def test_a_slow_reader_that_keeps_reading_is_not_taken_for_a_stalled_one(
    redis_url: str, r: redis.Redis
) -> None:
    """Prevents false stalls: behind a busy feed a slow reader's transport is paused
    most of the time, yet it makes progress and must keep its stream."""
    types = ["w0", "w1"]
    log = commit_sync(redis_url, types)

    async def scenario(api: Api) -> None:
        slow = await SseStream.open(api.port, rcvbuf=4096, limit=4096)
        writer = Writer(redis_url, log)
        loop = asyncio.get_running_loop()

        async def flood() -> None:
            for i in range(150):
                await writer.put(types[i % 2], pad=32_000)

        async def read_slowly(seconds: float) -> int:
            got = 0
            end = loop.time() + seconds
            while loop.time() < end:
                data = await slow.reader.read(8192)
                assert data, "the server ended the stream of a client that reads"
                got += len(data)
                await asyncio.sleep(0.02)  # pacing a slow client, not synchronisation
            return got

        _, got = await asyncio.gather(flood(), read_slowly(4.0))
        assert got > 0
        stats = api.stats()
        assert stats["values_conflated"] > 0, "the reader should have been behind"
        assert stats["streams_closed_stalled"] == 0, stats
        seq = await writer.put("w0")
        marker = b"id: %d\n" % seq
        seen = b""

        async def until_marker() -> None:
            nonlocal seen
            while marker not in seen:
                data = await slow.reader.read(1 << 20)
                assert data, "the stream ended"
                seen = seen[-64:] + data

        await asyncio.wait_for(until_marker(), 30)
        slow.close()
        await writer.close()

    with running_api(redis_url, ["--keepalive-seconds", "0.2", "--sse-stall-timeout", "1"]) as api:
        asyncio.run(scenario(api))


def test_clients_that_reset_mid_stream_do_not_disturb_the_others(
    redis_url: str, r: redis.Redis
) -> None:
    """Prevents one dead connection from breaking a flush: 100 clients vanish with a
    TCP reset while commits flow; the hub's subscription stays up (no resync, no
    error) and the clients left get every commit."""
    types = [f"x{i}" for i in range(5)]
    log = commit_sync(redis_url, types)

    async def scenario(api: Api) -> None:
        keep = [Follower(await SseStream.open(api.port)) for _ in range(3)]
        doomed = [await SseStream.open(api.port) for _ in range(100)]
        for follower in keep:
            await follower.read_until(lambda f: len(f.state) == 5)
        writer = Writer(redis_url, log)

        async def write_many() -> None:
            for i in range(400):
                await writer.put(types[i % 5], pad=2_000)

        writing = asyncio.create_task(write_many())
        for stream in doomed:
            sock = stream.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.writer.transport.abort()  # linger 0: a reset, not a FIN
            await asyncio.sleep(0)  # let commits flow between the resets
        await writing
        expected = kv_state(r)
        for follower in keep:
            await follower.read_until(lambda f, e=expected: f.state == e)
            check_against_log(follower, log)
        wait_until(lambda: api.stats()["clients"] == 3, 10, message="the reset clients gone")
        assert api.metric("api_sse_resyncs_total") == 1  # the first subscription only
        assert api.metric("api_redis_reconnects_total") == 0
        assert "Traceback" not in api.service.log, api.service.log[-3000:]
        for follower in keep:
            await follower.stream.aclose()
        await writer.close()

    with running_api(redis_url) as api:
        asyncio.run(scenario(api))
