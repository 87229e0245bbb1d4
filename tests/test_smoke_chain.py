"""The chain's shortest honest run: a real updater process, a real Redis.

Marked ``smoke``: CI repeats it on the local redis-server backend after the full
suite ran on testcontainers, so both backends are known to work.
"""

from __future__ import annotations

import json

import pytest
import redis
from harness import Service, wait_until

SEED_MESSAGE = (
    '{"type": "key", "updated": "2023-10-01T12:00:00Z", "valid": "2023-10-01T12:05:32Z", '
    '"values": {"field1": "value1", "field2": "value2"}}'
)
SEED_STORED = (
    b'{"updated":"2023-10-01T12:00:00Z","valid":"2023-10-01T12:05:32Z",'
    b'"values":{"field1":"value1","field2":"value2"}}'
)

pytestmark = pytest.mark.smoke


def test_seed_message_is_stored_as_the_seed_says(redis_url: str, r: redis.Redis) -> None:
    with Service("kv_updater", ["--redis-url", redis_url]) as updater:
        updater.wait_log("subscribed to 'update'")
        notes = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
        notes.subscribe("update:stored")
        wait_until(lambda: r.publish("update", SEED_MESSAGE) == 1, message="the updater subscribed")
        wait_until(lambda: r.get("key"), message="the key to be stored")
        assert r.get("key") == SEED_STORED
        assert r.get("kvupdater:seq") == b"1"
        assert r.zrange("kvupdater:index", 0, -1, withscores=True) == [(b"key", 1.0)]
        note = wait_until(lambda: notes.get_message(timeout=0.1), message="the notification")
        assert json.loads(note["data"]) == {**json.loads(SEED_MESSAGE), "seq": 1}
        assert updater.stop() == 0
    assert "stopped" in updater.log


def test_bad_message_is_rejected_and_the_next_one_lands(redis_url: str, r: redis.Redis) -> None:
    with Service("kv_updater", ["--redis-url", redis_url]) as updater:
        updater.wait_log("subscribed to 'update'")
        wait_until(lambda: r.publish("update", b"\xff not json") == 1, message="a subscriber")
        r.publish("update", SEED_MESSAGE)
        wait_until(lambda: r.get("key"), message="the good message after the bad one")
        updater.wait_log("undecodable message (invalid_utf8")
        assert updater.stop() == 0
