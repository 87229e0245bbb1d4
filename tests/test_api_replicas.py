"""Several api_server processes on one Redis: each holds its own subscription and
serves the whole stream, which is what lets replicas scale behind a load balancer."""

from __future__ import annotations

import asyncio
import contextlib

import redis
from api_fixtures import (
    Api,
    CommitLog,
    Follower,
    SseStream,
    Writer,
    check_against_log,
    kv_state,
    message,
    running_api,
)


def test_three_api_servers_each_deliver_every_commit(redis_url: str, r: redis.Redis) -> None:
    # Distinct types: no commit can be conflated with another, so every client
    # must see every seq exactly once, whichever replica it is connected to.
    types = [f"replica-{i:03d}" for i in range(240)]

    async def scenario(apis: list[Api]) -> None:
        followers = [Follower(await SseStream.open(api.port, "/events")) for api in apis]
        writer = Writer(redis_url, CommitLog())
        try:
            for start in range(0, len(types), 8):
                chunk = types[start : start + 8]
                await writer.commit([message(t, writer.log.next_n()) for t in chunk])
                await asyncio.sleep(0.005)  # spread the commits over time, as a feed would
        finally:
            await writer.close()
        every = sorted(writer.log.by_seq)
        assert len(every) == len(types)
        expected = kv_state(r)
        for follower in followers:
            await follower.read_until(lambda f: len(f.ids) >= len(every), within=30)
            assert follower.ids == every, "a replica skipped, repeated or reordered commits"
            assert follower.state == expected
            check_against_log(follower, writer.log)
            follower.stream.close()

    with contextlib.ExitStack() as stack:
        apis = [stack.enter_context(running_api(redis_url)) for _ in range(3)]
        assert len({api.port for api in apis}) == 3
        asyncio.run(scenario(apis))
