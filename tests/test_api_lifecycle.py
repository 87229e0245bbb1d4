"""Redis outages and restarts, start-up without Redis, and SIGTERM with open streams."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import redis
from api_fixtures import (
    Api,
    Follower,
    SseStream,
    Writer,
    check_against_log,
    commit_sync,
    commit_types,
    kv_state,
    persistent_redis,
    running_api,
    until,
)
from harness import RedisServer, wait_until


def _ready(api: Api) -> int:
    try:
        return api.get("/ready").status_code
    except httpx.HTTPError:
        return 0


def _acl(r: redis.Redis, *args: str) -> None:
    r.execute_command("ACL", *args)  # type: ignore[no-untyped-call]


def test_streams_catch_up_on_commits_the_hub_missed(redis_url: str, r: redis.Redis) -> None:
    """The API's Redis user loses its channel rights, commits go on, rights come back:
    the hub never saw those commits, yet every stream ends holding the KV."""
    _acl(r, "SETUSER", "apitest", "on", ">pw", "~*", "&*", "+@all")
    where = r.connection_pool.connection_kwargs
    host, port = where["host"], where["port"]
    api_url = f"redis://apitest:pw@{host}:{port}/0"
    types = [f"m{i}" for i in range(8)]
    log = commit_sync(redis_url, types)

    async def scenario(api: Api) -> None:
        everything = Follower(await SseStream.open(api.port))
        some = Follower(await SseStream.open(api.port, "/events?keys=m1,m2"))
        await everything.read_until(lambda f: len(f.state) == 8)
        await some.read_until(lambda f: len(f.state) == 2)
        _acl(r, "SETUSER", "apitest", "resetchannels")
        await until(lambda: _ready(api) == 503, 10, "readiness to drop with the subscription")
        writer = Writer(redis_url, log)
        for t in ("m1", "m5", "m2", "m1"):
            await writer.put(t)
        assert api.stats()["subscribed"] is False
        _acl(r, "SETUSER", "apitest", "allchannels")
        await until(lambda: _ready(api) == 200, 15, "readiness to come back")
        await everything.read_until(lambda f: f.state == kv_state(r))
        await some.read_until(lambda f: f.state == kv_state(r, frozenset({"m1", "m2"})))
        for follower in (everything, some):
            check_against_log(follower, log)
            await follower.stream.aclose()
        await writer.close()

    try:
        with running_api(api_url) as api:
            asyncio.run(scenario(api))
            assert api.metric("api_redis_reconnects_total") >= 1
            errors = [line for line in api.service.log.splitlines()
                      if "ERROR" in line and "api subscription" in line]
            assert len(errors) == 1, errors  # one ERROR per outage, not per retry
            assert "Redis is back" in api.service.log
            assert "Traceback" not in api.service.log
    finally:
        _acl(r, "DELUSER", "apitest")


def test_readiness_and_streams_through_a_redis_restart() -> None:
    with persistent_redis() as server:
        url = server.url
        client = server.client()
        log = commit_sync(url, ["p0", "p1", "p2"])

        async def scenario(api: Api) -> None:
            follower = Follower(await SseStream.open(api.port))
            await follower.read_until(lambda f: len(f.state) == 3)
            server.stop()
            await until(lambda: _ready(api) == 503, 15, "not ready while Redis is down")
            server.start()
            writer = Writer(url, log)
            await writer.put("p1")  # maybe before the hub is back: caught up either way
            await until(lambda: _ready(api) == 200, 20, "readiness after the restart")
            await writer.put("p2")
            await writer.put("p3")
            expected = kv_state(client)
            assert expected["p3"]["seq"] == 6, "the restart kept the data"
            # The restarted Redis lost its script cache: reads load it again.
            assert api.get("/keys/p3").json() == expected["p3"]
            await follower.read_until(lambda f: f.state == expected, within=20)
            check_against_log(follower, log)
            await follower.stream.aclose()
            await writer.close()

        with running_api(url) as api:
            asyncio.run(scenario(api))
            assert api.metric("api_redis_reconnects_total") >= 1
        client.close()


def test_a_restart_that_lost_the_data_ends_streams_and_resume_gets_it_all(
    own_redis: RedisServer,
) -> None:
    url = own_redis.url
    commit_sync(url, ["q0", "q1", "q2", "q3"])

    async def scenario(api: Api) -> None:
        follower = Follower(await SseStream.open(api.port))
        await follower.read_until(lambda f: len(f.state) == 4)
        last = follower.last_id
        own_redis.restart()  # no persistence: the store and its seq start again at 0
        log = await commit_types(url, ["q1", "q9"])
        # The stream ends (its ids could not go on increasing) ...
        assert await asyncio.wait_for(_drain(follower.stream), 20) is None
        # ... and an EventSource comes back with its Last-Event-ID, ahead of the store.
        again = Follower(await SseStream.open(api.port, headers={"Last-Event-ID": str(last)}))
        client = own_redis.client()
        await again.read_until(lambda f: f.state == kv_state(client))
        check_against_log(again, log)
        await again.stream.aclose()
        client.close()

    with running_api(url) as api:
        asyncio.run(scenario(api))
        assert api.metric("api_sse_closed_on_reset_total") == 1


async def _drain(stream: SseStream) -> Any:
    while True:
        event = await stream.next_event()
        if event is None:
            return None


def test_starts_without_redis_and_serves_once_it_is_up(own_redis: RedisServer) -> None:
    own_redis.stop()
    with running_api(own_redis.url, wait_ready=False) as api:
        assert api.get("/live").status_code == 200
        assert _ready(api) == 503

        async def scenario() -> None:
            early = await SseStream.open(api.port)  # accepted, served once Redis is up
            assert early.status == 200
            own_redis.start()
            log = await commit_types(own_redis.url, ["late"])
            follower = Follower(early)
            await follower.read_until(lambda f: "late" in f.state, within=20)
            check_against_log(follower, log)
            await early.aclose()

        asyncio.run(scenario())
        wait_until(lambda: _ready(api) == 200, 10, message="ready")


def test_sigterm_with_1000_open_streams_exits_0_within_5_s(redis_url: str) -> None:
    commit_sync(redis_url, ["z"])
    with running_api(redis_url) as api:

        async def scenario() -> float:
            streams: list[SseStream] = []
            for _ in range(10):
                streams += await asyncio.gather(*(SseStream.open(api.port) for _ in range(100)))
            assert all(s.status == 200 for s in streams)
            followers = [Follower(s) for s in streams]
            await asyncio.gather(*(f.read_until(lambda f: "z" in f.state) for f in followers))
            assert api.stats()["clients"] == 1000
            api.service.signal(signal.SIGTERM)
            start = time.monotonic()
            ends = await asyncio.wait_for(asyncio.gather(*(_drain(s) for s in streams)), 5)
            assert ends == [None] * 1000
            assert all(s.ended for s in streams)
            for s in streams:
                s.close()
            return start

        start = asyncio.run(scenario())
        code = api.service.wait(max(0.1, 5 - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
        assert code == 0, api.service.log
        assert elapsed < 5, f"exit took {elapsed:.1f} s"
        assert "api-server stopped" in api.service.log
