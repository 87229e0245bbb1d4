"""Post-write validation: on by default, summarised at INFO, a mismatch is an ERROR + metric.

A mismatch needs a foreign write landing between the commit and its read-back, which
travel in one pipelined write.  A small TCP proxy between the updater and Redis holds
back the read-back of one batch until a test-controlled write has landed (RedisProxy in
updater_fixtures): the real updater, the real Redis and a real race, made deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import redis
from harness import RedisServer, wait_until
from updater_fixtures import (
    InProcessUpdater,
    Persister,
    RedisProxy,
    message,
    publish_all,
    settings_for,
    stored_of,
)


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[RedisProxy]:
    with RedisProxy(redis_server.host, redis_server.port) as p:
        yield p


def _once_committed(r: redis.Redis, key: str, value: bytes, then: Callable[[], object]) -> None:
    """Wait for the commit of ``value`` to be in Redis, then do ``then``."""
    wait_until(lambda: r.get(key) == value, 10, message=f"the commit of {key}")
    then()


def test_a_foreign_write_between_commit_and_read_back_is_an_error_and_a_metric(
    proxy: RedisProxy, redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kv_updater")
    with InProcessUpdater(settings_for(proxy.url)) as up:
        publish_all(r, "update", [message("fine")])
        wait_until(lambda: up.metric("kvupdater_validations_total") == 1, 10, message="1 check")
        written = stored_of("2023-10-01T12:00:00Z", {"v": 1})
        proxy.arm(partial(_once_committed, r, "victim", written,
                          partial(r.set, "victim", b"overwritten by someone else")))
        publish_all(r, "update", [message("victim")])
        assert proxy.fired.wait(10)
        wait_until(lambda: up.metric("kvupdater_validations_total") == 2, 10,
                   message="the second batch checked")  # counted after the failures
        assert up.metric("kvupdater_validation_failures_total") == 1
        publish_all(r, "update", [message("later")])  # and the updater carries on
        wait_until(partial(r.exists, "later"), 10, message="a later message")
    errors = [rec for rec in caplog.records
              if rec.name == "kv_updater" and rec.levelno == logging.ERROR]
    assert [rec.getMessage() for rec in errors] == [
        "validation failed: key 'victim' does not hold what was written"]


def test_a_newer_commit_by_another_updater_is_not_a_mismatch(
    proxy: RedisProxy, redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kv_updater")
    newer = message("contested", updated="2023-10-01T12:00:01Z", values={"by": "other"})
    with InProcessUpdater(settings_for(proxy.url)) as up, \
            Persister(settings_for(redis_url)) as other:
        proxy.arm(partial(_once_committed, r, "contested",
                          stored_of("2023-10-01T12:00:00Z", {"v": 1}),
                          partial(other.ok, newer)))
        publish_all(r, "update", [message("contested")])
        assert proxy.fired.wait(10)
        wait_until(lambda: up.metric("kvupdater_validations_total") == 1, 10, message="checked")
        assert up.metric("kvupdater_validation_failures_total") == 0
    assert r.get("contested") == stored_of("2023-10-01T12:00:01Z", {"by": "other"})
    assert not [rec for rec in caplog.records
                if rec.name == "kv_updater" and rec.levelno >= logging.ERROR]


def test_validation_is_on_by_default_and_summarised_at_info(
    redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kv_updater")
    with InProcessUpdater(settings_for(redis_url)) as up:
        assert up.updater.validate is True
        publish_all(r, "update", [message(f"k{i}", values={"i": i}) for i in range(1000)])
        wait_until(lambda: up.metric("kvupdater_validations_total") == 1000, 15,
                   message="1000 keys read back")
    summaries = [rec for rec in caplog.records if "validation success" in rec.getMessage()]
    assert summaries, "no validation success line"
    assert {rec.levelno for rec in summaries} == {logging.INFO}
    assert len(summaries) <= 2, "validation success must be summarised, not per message"
    assert "1000 keys read back right after 1000 commits" in summaries[-1].getMessage()


def test_without_validation_nothing_is_read_back(
    redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kv_updater")
    with InProcessUpdater(settings_for(redis_url, validate=False)) as up:
        publish_all(r, "update", [message("a"), message("b")])
        wait_until(lambda: up.metric("kvupdater_messages_committed_total") == 2, 10,
                   message="2 commits")
        assert up.metric("kvupdater_validations_total") == 0
    texts = [rec.getMessage() for rec in caplog.records]
    assert not [t for t in texts if "validation success" in t]
    assert [t for t in texts if t.startswith("committed 2 messages")]
