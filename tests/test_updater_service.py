"""``python -m kv_updater`` as a real process: signals, two updaters, logs, health endpoint."""

from __future__ import annotations

import random
import signal
import threading
from datetime import UTC, datetime, timedelta
from functools import partial

import orjson
import pytest
import redis
from harness import free_port, wait_until
from updater_fixtures import (
    InProcessUpdater,
    Listener,
    acl_user,
    check_commit_bookkeeping,
    data_keys,
    expected_final,
    http_get,
    message,
    publish_all,
    scrape,
    scrape_sum,
    settings_for,
    updater_process,
    wait_subscribed,
)

BASE = datetime(2023, 10, 1, 12, 0, tzinfo=UTC)


def log_lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def level_of(line: str) -> str:
    """The level of a text log line: '<date> <time> LEVEL logger: message'."""
    return line.split()[2]


def accounted(port: int) -> tuple[float, float]:
    """(received, committed + superseded + stale + unchanged + rejected) from /metrics."""
    received = scrape(port, "kvupdater_messages_received_total") or 0.0
    done = sum(scrape_sum(port, f"kvupdater_messages_{what}_total")
               for what in ("committed", "superseded", "stale", "unchanged", "rejected"))
    return received, done


def all_accounted(port: int, count: int) -> bool:
    return accounted(port) == (count, count)


@pytest.mark.parametrize(
    ("sig", "backlog"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["SIGTERM", "SIGINT", "SIGTERM-with-a-backlog"],
)
def test_a_signal_mid_stream_commits_every_delivered_message(
    redis_url: str, r: redis.Redis, sig: signal.Signals, backlog: bool
) -> None:
    """Every message Redis delivered before the unsubscribe is committed, then exit 0.

    PUBLISH answers how many subscribers got the message: the ones answered 1 went
    into the updater's connection; each key must end at the last of those.  With a
    backlog, the updater is paused while 20k messages queue up, then signalled: the
    unsubscribe confirmation arrives with batches still to commit.
    """
    sent: list[tuple[bytes, int]] = []
    stop = threading.Event()

    def publish() -> None:
        client = redis.Redis.from_url(redis_url)
        i, zeros = 0, 0
        while zeros < 3 and i < 2_000_000:
            chunk = [message(f"k{n % 200}", updated=(BASE + timedelta(milliseconds=n)).isoformat(),
                             values={"n": n}) for n in range(i, i + 250)]
            i += len(chunk)
            counts = publish_all(client, "update", chunk)
            sent.extend(zip(chunk, counts, strict=True))
            if stop.is_set() and counts[-1] == 0:
                zeros += 1
        client.close()

    with updater_process(redis_url) as svc:
        wait_subscribed(r, "update")
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        wait_until(lambda: int(r.get("kvupdater:seq") or 0) > 3000, 30, message="a flowing stream")
        if backlog:
            svc.signal(signal.SIGSTOP)
            queued = len(sent) + 20_000
            wait_until(lambda: len(sent) >= queued, 30, message="a backlog")
            svc.signal(sig)
            svc.signal(signal.SIGCONT)
        else:
            svc.signal(sig)
        stop.set()
        assert svc.wait(10) == 0, svc.log  # "within a few seconds"
        publisher.join(30)
        assert not publisher.is_alive()
    counts = [n for _, n in sent]
    first_miss = counts.index(0)
    assert set(counts[:first_miss]) == {1}
    assert set(counts[first_miss:]) == {0}, "a message was delivered after the unsubscribe"
    delivered = [raw for raw, _ in sent[:first_miss]]
    assert {k.decode(): r.get(k) for k in data_keys(r)} == expected_final(delivered)
    assert "stopping: committing what is in hand" in svc.log
    assert "kv-updater: stopped" in svc.log
    assert "could not be committed" not in svc.log


def test_two_updaters_at_once_agree(redis_url: str, r: redis.Redis) -> None:
    """Two processes on one channel: same final state, one seq per commit, index and
    notifications in step, whatever the interleaving of their commits."""
    rng = random.Random(42)
    stream = []
    for i in range(8000):
        at = BASE + timedelta(seconds=rng.randrange(300), milliseconds=rng.choice([0, 500]))
        stream.append(message(f"k{rng.randrange(100)}", updated=at.isoformat(), values={"i": i}))
    stream += rng.sample(stream, 1000)  # duplicates, late
    ports = [free_port(), free_port()]
    with Listener(r, "update:stored") as stored, \
            updater_process(redis_url, "--metrics-port", str(ports[0])) as one, \
            updater_process(redis_url, "--metrics-port", str(ports[1])) as two:
        wait_subscribed(r, "update", 2)
        for chunk in range(0, len(stream), 500):  # interleave with the other's commits
            assert set(publish_all(r, "update", stream[chunk : chunk + 500])) == {2}
        for port in ports:
            wait_until(partial(all_accounted, port, len(stream)), 30,
                       message=f"updater on {port} done")
        seq = int(r.get("kvupdater:seq") or 0)
        notes = stored.wait_count(seq)
        committed = sum(scrape(p, "kvupdater_messages_committed_total") or 0 for p in ports)
        assert committed == seq
        assert one.proc is not None
        assert two.proc is not None
    assert {k.decode(): r.get(k) for k in data_keys(r)} == expected_final(stream)
    check_commit_bookkeeping(r, notes)


def _publish_samples(r: redis.Redis) -> None:
    publish_all(r, "update", [message("good"), orjson.dumps({"type": "bad type"}),
                              b"\xff\xfe", b"{", message("last")])


def test_log_levels_are_the_seeds(redis_url: str, r: redis.Redis) -> None:
    """INFO start (settings, password masked), DEBUG per persist, WARNING malformed,
    ERROR undecodable, INFO validation success and stop."""
    host_port = redis_url.removeprefix("redis://")
    with acl_user(r, "tester", "s3cret-pw"), \
            updater_process(f"redis://tester:s3cret-pw@{host_port}", "--log-level", "DEBUG") as svc:
        wait_subscribed(r, "update")
        _publish_samples(r)
        wait_until(partial(r.exists, "last"), 10, message="the last message")
        svc.signal(signal.SIGTERM)
        assert svc.wait() == 0
        log = svc.log
    assert "s3cret-pw" not in log
    (start,) = log_lines(log, "starting with")
    assert level_of(start) == "INFO"
    assert "'redis_url': 'redis://tester:***@" in start
    assert "'channel': 'update'" in start
    assert "'validate': True" in start
    persisted = log_lines(log, "persisted ")
    assert [level_of(line) for line in persisted] == ["DEBUG", "DEBUG"]
    assert "persisted good (seq 1)" in persisted[0]
    (malformed,) = log_lines(log, "malformed message")
    assert level_of(malformed) == "WARNING"
    assert "bad_type" in malformed
    undecodable = log_lines(log, "undecodable message")
    assert [level_of(line) for line in undecodable] == ["ERROR", "ERROR"]
    assert "invalid_utf8" in undecodable[0]
    assert "invalid_json" in undecodable[1]
    (summary,) = log_lines(log, "validation success")
    assert level_of(summary) == "INFO"
    assert level_of(log_lines(log, "kv-updater: stopped")[0]) == "INFO"


def test_persists_are_not_logged_at_info(redis_url: str, r: redis.Redis) -> None:
    with updater_process(redis_url) as svc:
        wait_subscribed(r, "update")
        _publish_samples(r)
        wait_until(partial(r.exists, "last"), 10, message="the last message")
        svc.signal(signal.SIGTERM)
        assert svc.wait() == 0
    levels = {level_of(line) for line in svc.log.splitlines()}
    assert "DEBUG" not in levels
    assert levels == {"INFO", "WARNING", "ERROR"}
    assert not log_lines(svc.log, "persisted ")


def test_json_log_format_gives_one_object_per_line(redis_url: str, r: redis.Redis) -> None:
    with updater_process(redis_url, "--log-format", "json", "--log-level", "debug") as svc:
        wait_subscribed(r, "update")
        _publish_samples(r)
        wait_until(partial(r.exists, "last"), 10, message="the last message")
        svc.signal(signal.SIGTERM)
        assert svc.wait() == 0
    records = [orjson.loads(line) for line in svc.log.splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(rec) for rec in records)
    by_text = {rec["message"].split(":")[0]: rec["level"] for rec in records}
    assert by_text["persisted good (seq 1)"] == "DEBUG"
    assert {rec["level"] for rec in records if "undecodable" in rec["message"]} == {"ERROR"}
    assert {rec["level"] for rec in records if "malformed" in rec["message"]} == {"WARNING"}
    assert any(rec["message"].startswith("kv-updater: starting with") for rec in records)


def test_metrics_live_and_ready_endpoint(redis_url: str, r: redis.Redis) -> None:
    port = free_port()
    with InProcessUpdater(settings_for(redis_url, metrics_port=port)) as up:
        assert http_get(port, "/live") == (200, "ok\n")
        assert http_get(port, "/ready") == (200, "ready\n")
        assert http_get(port, "/nowhere")[0] == 404
        publish_all(r, "update", [message("a"), message("b"), message("a"), b"[]"])
        wait_until(lambda: scrape(port, "kvupdater_messages_received_total") == 4, 10,
                   message="4 received")
        # One at a time, so neither is superseded inside a batch.
        publish_all(r, "update", [message("c", updated="2023-10-01T11:00:00Z")])
        wait_until(lambda: scrape(port, "kvupdater_messages_received_total") == 5, 10,
                   message="5 received")
        publish_all(r, "update", [message("c")])
        # validations are the last of a batch's counts to move
        wait_until(lambda: scrape(port, "kvupdater_validations_total") == 4, 10,
                   message="4 validated")
        assert scrape(port, "kvupdater_messages_committed_total") == 4
        assert scrape(port, "kvupdater_messages_unchanged_total") == 1
        assert scrape(port, "kvupdater_messages_rejected_total", {"reason": "not_object"}) == 1
        assert scrape(port, "kvupdater_validation_failures_total") == 0
        assert scrape(port, "kvupdater_reconnects_total") == 0
        assert scrape(port, "kvupdater_ready") == 1
        assert (scrape(port, "kvupdater_batch_size_count") or 0) >= 1
        assert up.updater.ready
    assert http_get(port, "/live")[0] == 0  # the endpoint closes with the service
