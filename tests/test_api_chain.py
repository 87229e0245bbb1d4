"""The whole chain: PUBLISH update -> python -m kv_updater -> python -m api_server -> SSE."""

from __future__ import annotations

import asyncio
import json

import redis
from api_fixtures import Api, Follower, SseStream, kv_state, running_api
from harness import Service, wait_until
from updater_fixtures import wait_subscribed


def _message(type_: str, n: int) -> bytes:
    return json.dumps({
        "type": type_, "updated": f"2026-12-03T12:00:{n:02d}Z", "valid": None,
        "values": {"n": n},
    }).encode()


def test_published_updates_reach_sse_clients_through_the_updater(
    redis_url: str, r: redis.Redis
) -> None:
    with Service("kv_updater", ["--redis-url", redis_url]):
        wait_subscribed(r, "update", timeout=20)
        r.publish("update", _message("chain:a", 1))
        wait_until(lambda: r.zscore("kvupdater:index", "chain:a") is not None, 10,
                   message="the first commit")

        async def scenario(api: Api) -> None:
            follower = Follower(await SseStream.open(api.port))
            await follower.read_until(lambda f: "chain:a" in f.state)
            for n in range(2, 30):
                r.publish("update", _message(f"chain:{'abc'[n % 3]}", n))
            r.publish("update", b"{not json")  # rejected by the updater, never streamed
            r.publish("update", _message("chain:a", 0))  # stale: older than what is stored
            await follower.read_until(
                lambda f: f.state.get("chain:c", {}).get("values") == {"n": 29}
            )
            await follower.read_until(lambda f: f.state == kv_state(r))
            assert follower.state["chain:a"]["values"] == {"n": 27}
            assert follower.ids == sorted(set(follower.ids))
            await follower.stream.aclose()

        with running_api(redis_url) as api:
            asyncio.run(scenario(api))
            assert api.get("/keys/chain:b").json()["values"] == {"n": 28}
