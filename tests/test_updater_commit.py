"""The atomic commit: stored value, seq, index, notifications, stale protection, replays."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import orjson
import pytest
import redis
from harness import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from updater_fixtures import (
    NAMESPACE_KEYS,
    SEED_MESSAGE,
    SEED_STORED,
    InProcessUpdater,
    Listener,
    Persister,
    all_keys,
    check_commit_bookkeeping,
    data_keys,
    expected_final,
    instant,
    message,
    publish_all,
    settings_for,
    stored_of,
)

from kv_updater import Accepted, Rejected, render_event
from kv_updater.commit import STALE, UNCHANGED, _winners

T = TypeVar("T")
FEW = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
def persist(redis_url: str) -> Iterator[Persister]:
    with Persister(settings_for(redis_url)) as p:
        yield p


def test_seed_message_becomes_the_seed_stored_value(r: redis.Redis, redis_url: str) -> None:
    """The real path: published on `update`, stored byte-exact, seq/index/notification agree."""
    with Listener(r, "update:stored") as stored, InProcessUpdater(settings_for(redis_url)):
        assert publish_all(r, "update", [SEED_MESSAGE]) == [1]
        (note,) = stored.wait_count(1)
    assert r.get("key") == SEED_STORED
    assert r.get("kvupdater:seq") == b"1"
    assert r.zrange("kvupdater:index", 0, -1, withscores=True) == [(b"key", 1.0)]
    assert note == (
        b'{"type":"key","updated":"2023-10-01T12:00:00Z","valid":"2023-10-01T12:05:32Z",'
        b'"values":{"field1":"value1","field2":"value2"},"seq":1}'
    )
    assert note == render_event(b'"key"', SEED_STORED, 1)
    assert set(r.keys("*")) == {b"key"} | NAMESPACE_KEYS


def test_persist_data_keeps_the_seed_shape(persist: Persister, r: redis.Redis) -> None:
    assert persist.ok(SEED_MESSAGE.decode()) == 1
    assert r.get("key") == SEED_STORED
    assert persist.ok(SEED_MESSAGE) == UNCHANGED


def test_absent_valid_is_stored_as_null_and_unknown_fields_are_not_stored(
    persist: Persister, r: redis.Redis
) -> None:
    raw = message("t", values={"a": [1, {"b": None}]}, source="x", seq=99, type_extra=True)
    assert persist.ok(raw) == 1
    assert r.get("t") == (
        b'{"updated":"2023-10-01T12:00:00Z","valid":null,"values":{"a":[1,{"b":null}]}}'
    )


def test_strings_are_stored_as_received_not_normalised(persist: Persister, r: redis.Redis) -> None:
    raw = message("t", updated="2023-10-01t14:00:00.500+02:00", valid="2023-10-01T12:05:32.0z",
                  values={"text": "caf\u00e9 \u2603 \U0001f600 \"q\" \\ /", "n": 1.5})
    assert persist.ok(raw) == 1
    assert orjson.loads(r.get("t") or b"") == {
        "updated": "2023-10-01t14:00:00.500+02:00", "valid": "2023-10-01T12:05:32.0z",
        "values": {"text": "caf\u00e9 \u2603 \U0001f600 \"q\" \\ /", "n": 1.5},
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FEW
@given(values=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
       type_=st.from_regex(r"[A-Za-z0-9_.:-]{1,30}", fullmatch=True).filter(
           lambda t: not t.startswith("kvupdater:")))
def test_render_event_is_byte_equal_to_the_lua_notification(
    redis_url: str, values: dict[str, Any], type_: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    with Listener(client, "update:stored") as stored, Persister(settings_for(redis_url)) as p:
        seq = p.ok(message(type_, values=values))
        (note,) = stored.wait_count(1)
    parsed = p.updater.rules.parse(message(type_, values=values))
    assert isinstance(parsed, Accepted)
    assert note == render_event(parsed.type_json, parsed.stored, seq)
    assert client.get(type_) == parsed.stored
    assert orjson.loads(note) == {"type": type_, **orjson.loads(parsed.stored), "seq": seq}
    client.close()


# (first, second, whether the second is written): instants, not strings, decide.
INSTANT_CASES = [
    ("2023-10-01T11:00:00Z", "2023-10-01T12:00:00+02:00", False),  # 10:00Z: older
    ("2023-10-01T12:00:00+02:00", "2023-10-01T11:00:00Z", True),
    ("2023-10-01T12:00:00Z", "2023-10-01T07:00:00-04:00", False),  # 11:00Z
    ("2023-10-01T12:00:00Z", "2023-10-01T07:30:00-05:00", True),   # 12:30Z
    ("2023-10-01T12:00:00.5Z", "2023-10-01T12:00:00.50Z", True),   # equal: newer arrival wins
    ("2023-10-01T12:00:00.50Z", "2023-10-01T12:00:00.5Z", True),
    ("2023-10-01T12:00:00.5Z", "2023-10-01T12:00:00.4999999999Z", False),
    ("2023-10-01T12:00:00.1Z", "2023-10-01T12:00:00.1000000001Z", True),
    ("2023-10-01T12:00:00.9Z", "2023-10-01T12:00:01Z", True),
    ("2023-10-01T12:00:01Z", "2023-10-01T12:00:00.999999999999Z", False),
    ("2023-10-01T12:00:00.05Z", "2023-10-01T12:00:00.5Z", True),
    ("2023-10-01T12:00:00.5Z", "2023-10-01T12:00:00.05Z", False),
    ("2023-10-01T00:30:00+01:00", "2023-09-30T23:30:00Z", True),   # equal, across a day
    ("2023-12-31T23:59:59Z", "2024-01-01T00:59:58+01:00", False),  # across a year
    ("2023-10-01T12:00:00Z", "2023-10-01t12:00:00.000z", True),    # equal
    ("2023-10-01T12:00:00Z", "2023-10-01T12:00:00-00:00", True),   # equal
    ("2016-12-31T23:59:60Z", "2017-01-01T00:00:00Z", True),        # leap second: equal
    ("2017-01-01T00:00:00Z", "2016-12-31T23:59:59.999Z", False),
    ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00+23:59", False),
    ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", True),
]


@pytest.mark.parametrize(("first", "second", "written"), INSTANT_CASES)
def test_stale_protection_compares_instants_not_strings(
    persist: Persister, r: redis.Redis, first: str, second: str, written: bool
) -> None:
    assert (instant(second) >= instant(first)) is written  # the oracle agrees with the table
    assert persist.ok(message("k", updated=first, values={"n": 1})) == 1
    status = persist.ok(message("k", updated=second, values={"n": 2}))
    if written:
        assert status == 2
        assert r.get("k") == stored_of(second, {"n": 2})
    else:
        assert status == STALE
        assert r.get("k") == stored_of(first, {"n": 1})
        assert persist.metric("kvupdater_messages_stale_total") == 1
    assert int(r.get("kvupdater:seq") or 0) == (2 if written else 1)


def test_equal_instant_identical_value_is_a_no_op(persist: Persister, r: redis.Redis) -> None:
    with Listener(r, "update:stored") as stored:
        assert persist.ok(message("k", values={"n": 1})) == 1
        assert persist.ok(message("k", values={"n": 1})) == UNCHANGED
        assert persist.ok(message("k", values={"n": 1}, ignored="extra field")) == UNCHANGED
        assert persist.ok(message("k", values={"n": 2})) == 2  # equal instant, newer arrival
        stored.wait_count(2)
        assert persist.ok(message("j")) == 3  # a marker: nothing else was published before it
        notes = stored.wait_count(3)
    assert [orjson.loads(n)["seq"] for n in notes] == [1, 2, 3]
    assert persist.metric("kvupdater_messages_unchanged_total") == 2
    assert r.zscore("kvupdater:index", "k") == 2


def test_a_stale_message_touches_nothing(persist: Persister, r: redis.Redis) -> None:
    assert persist.ok(message("k", updated="2023-10-01T12:00:00Z")) == 1
    before = {k: r.dump(k) for k in r.keys("*")}
    assert persist.ok(message("k", updated="2023-10-01T11:59:59Z", values={"x": 0})) == STALE
    assert {k: r.dump(k) for k in r.keys("*")} == before


# -- shuffled, out-of-order, duplicated and replayed streams --------------------------
BASE = datetime(2023, 10, 1, 12, 0, tzinfo=UTC)
OFFSETS = [0, 0, 60, 120, -300, 330, 345, -570, 1439, -1439]
FRACTIONS = ["", "", "0", "5", "50", "500000", "25", "999999999", "000000001"]


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """RFC 3339 texts of a few seconds around BASE: many equal instants spelled differently."""
    moment = BASE + timedelta(seconds=draw(st.integers(0, 3)))
    minutes = draw(st.sampled_from(OFFSETS))
    local = moment.astimezone(timezone(timedelta(minutes=minutes)))
    fraction = draw(st.sampled_from(FRACTIONS))
    text = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "")
    if minutes == 0 and draw(st.booleans()):
        return text + "Z"
    sign = "+" if minutes >= 0 else "-"
    return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    updates = draw(st.lists(st.tuples(st.sampled_from("abc"), timestamps()), min_size=1,
                            max_size=25))
    stream = [message(t, updated=u, values={"n": i}) for i, (t, u) in enumerate(updates)]
    stream += draw(st.lists(st.sampled_from(stream), max_size=8))  # duplicates
    return list(draw(st.permutations(stream)))


@FEW
@given(stream=streams(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_shuffled_streams_in_any_batching_end_at_the_latest_instant(
    redis_url: str, stream: list[bytes], cuts: list[int]
) -> None:
    """Whatever the order, duplicates and batch boundaries: the latest instant wins,
    on equal instants the later arrival; seq, index and notifications agree."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    with Listener(client, "update:stored") as stored, Persister(settings_for(redis_url)) as p:
        committed = 0
        for start, end in itertools.pairwise(bounds):
            committed += p.commit(stream[start:end]).committed
        assert p.commit([stream[-1]]).committed == 0  # the last arrival is in
        notes = stored.wait_count(committed)
    final = expected_final(stream)
    assert {k.decode(): client.get(k) for k in data_keys(client)} == final
    last = check_commit_bookkeeping(client, notes)
    assert set(last) == set(final)
    client.close()


def test_replaying_a_stream_changes_nothing(persist: Persister, r: redis.Redis) -> None:
    rng = random.Random(7)
    stream = [
        message(f"k{i % 20}", updated=(BASE + timedelta(milliseconds=rng.randrange(10**6)))
                .isoformat(), values={"i": i})
        for i in range(400)
    ]
    with Listener(r, "update:stored") as stored:
        statuses = [persist.ok(m) for m in stream]
        notes = stored.wait_count(sum(1 for s in statuses if s > 0))
        before = {k: r.dump(k) for k in all_keys(r)}
        replay = stream * 2
        rng.shuffle(replay)
        assert all(persist.ok(m) <= 0 for m in replay)  # one by one
        assert persist.commit(replay).committed == 0  # and as one batch
        assert {k: r.dump(k) for k in all_keys(r)} == before  # data, seq, index, instants
        # The next commit is the next seq and the next notification: nothing in between.
        assert persist.ok(message("marker")) == len(notes) + 1
        after = stored.wait_count(len(notes) + 1)
        assert orjson.loads(after[-1])["type"] == "marker"
        assert len(after) == len(notes) + 1
    assert {k.decode(): r.get(k) for k in data_keys(r) - {b"marker"}} == expected_final(stream)


def test_a_shuffled_stream_through_pubsub_ends_at_the_latest_instant(
    r: redis.Redis, redis_url: str
) -> None:
    """The real path, where batches form by themselves: 6000 updates of 60 keys, shuffled."""
    rng = random.Random(2023)
    stream = []
    for i in range(6000):
        at = BASE + timedelta(seconds=rng.randrange(600), microseconds=rng.randrange(3) * 500000)
        zone = timezone(timedelta(minutes=rng.choice(OFFSETS)))
        stream.append(message(f"k{rng.randrange(60)}", updated=at.astimezone(zone).isoformat(),
                              values={"i": i}))
    stream += rng.sample(stream, 500)
    final = expected_final(stream)
    with Listener(r, "update:stored") as stored, \
            InProcessUpdater(settings_for(redis_url)) as up:
        assert set(publish_all(r, "update", stream)) == {1}
        publish_all(r, "update", [message("marker")])
        wait_until(lambda: r.exists("marker"), 20, message="the marker")

        def accounted() -> float:  # counted once the commit returned, a moment after Redis
            return sum(up.metric(f"kvupdater_messages_{what}_total")
                       for what in ("committed", "superseded", "stale", "unchanged"))

        wait_until(lambda: accounted() == len(stream) + 1, 10, message="every message counted")
        assert up.metric("kvupdater_messages_received_total") == len(stream) + 1
        batches = up.metric("kvupdater_batch_size_count")
        committed = int(up.metric("kvupdater_messages_committed_total"))
        notes = stored.wait_count(committed)
    assert batches < len(stream), "no batch ever held more than one message"
    assert {k.decode(): r.get(k) for k in data_keys(r) - {b"marker"}} == final
    check_commit_bookkeeping(r, notes)


def test_a_batch_wider_than_luas_unpack_limit_commits_every_key(
    persist: Persister, r: redis.Redis
) -> None:
    """9000 distinct keys in one atomic step: the script's MSET/HSET/ZADD go in chunks."""
    batch = [message(f"wide{i}", values={"i": i}) for i in range(9000)]
    with Listener(r, "update:stored") as stored:
        outcome = persist.commit(batch)
        notes = stored.wait_count(9000, timeout=30)
    assert outcome.committed == outcome.validated == 9000
    assert outcome.mismatches == []
    assert len(data_keys(r)) == 9000
    assert r.get("wide8999") == stored_of("2023-10-01T12:00:00Z", {"i": 8999})
    check_commit_bookkeeping(r, notes)
    # The stored instants are read in chunks too: each message of a replay must be
    # matched with its own key's instant, on both sides of a chunk's edge.
    older = [message(f"wide{i}", updated="2023-10-01T11:00:00Z") for i in range(3990, 4010)]
    replay = persist.commit(batch[:3990] + older + batch[4010:])
    assert (replay.unchanged, replay.stale, replay.committed) == (8980, 20, 0)


async def _turns_during(work: Awaitable[T]) -> tuple[T, int]:
    """``work``'s result, and how many turns the event loop took while it ran."""
    turns = 0
    done = False

    async def count() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count())
    await asyncio.sleep(0)
    start = turns
    try:
        result = await work
    finally:
        done = True
        await counter
    return result, turns - start


def test_building_a_wide_commit_lets_the_subscription_be_read(persist: Persister) -> None:
    """Regression: a 10,000-key commit was built without one turn of the event loop
    (10-20 ms); a burst published meanwhile piled up in Redis's output buffer for the
    subscriber until Redis dropped it, and the rest was lost.  (That the command is
    whole: test_a_batch_wider_than_luas_unpack_limit_commits_every_key.)"""
    raws = [message(f"wide{i}", values={"i": i}) for i in range(4500)]
    batch = [m for m in map(persist.updater.rules.parse, raws) if isinstance(m, Accepted)]
    encoded: dict[int, bytes] = {}
    winners = _winners(batch, encoded)
    persist.runner.run(persist.updater.committer.load_script())
    (_, _, written), turns = persist.runner.run(
        _turns_during(persist.updater.committer._commit_command(batch, winners, encoded))
    )
    assert turns >= 4  # at least one every ~1,000 messages (DRAIN_EVERY)
    assert written == [m.stored for m in batch]


def test_parsing_a_wide_batch_lets_the_subscription_be_read(persist: Persister) -> None:
    """Regression: 10,000 messages were parsed without a turn of the event loop (up to
    ~120 ms), with the same outcome as above: the subscriber dropped mid-burst."""
    payloads = [message(f"k{i}") for i in range(4500)] + [b"junk"]
    (accepted, rejected), turns = persist.runner.run(
        _turns_during(persist.updater._parse(payloads))
    )
    assert turns >= 4  # at least one every ~1,000 messages (DRAIN_EVERY)
    assert [m.type for m in accepted] == [f"k{i}" for i in range(4500)]
    assert [raw for _, raw in rejected] == [b"junk"]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(type_=st.text(min_size=1, max_size=30).filter(lambda t: not t.startswith("kvupdater:")))
def test_any_type_a_custom_pattern_allows_is_announced_as_valid_json(
    redis_url: str, type_: str
) -> None:
    """With TYPE_PATTERN opened up, quotes, backslashes, control characters and any
    script in a type still give a notification that is JSON and equals render_event."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    with Listener(client, "update:stored") as stored, \
            Persister(settings_for(redis_url, type_pattern=r"(?s).{1,30}")) as p:
        seq = p.ok(message(type_))
        (note,) = stored.wait_count(1)
    assert orjson.loads(note)["type"] == type_
    parsed = p.updater.rules.parse(message(type_))
    assert isinstance(parsed, Accepted)
    assert note == render_event(parsed.type_json, parsed.stored, seq)
    assert client.get(type_) == parsed.stored
    client.close()


def test_a_flushed_script_cache_is_reloaded_without_repeating_dead_letters(
    redis_url: str, r: redis.Redis
) -> None:
    with Persister(settings_for(redis_url, dead_letter="dead")) as p:
        assert p.ok(message("before")) == 1
        r.script_flush()
        accepted = p.updater.rules.parse(message("after"))
        rejected = p.updater.rules.parse(b"junk")
        assert isinstance(accepted, Accepted)
        assert isinstance(rejected, Rejected)
        outcome = p.runner.run(p.updater.committer.commit([accepted], [(rejected, b"junk")]))
    assert outcome.committed == 1
    assert r.exists("after")
    assert r.xlen("dead") == 1


WIDE = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))


@st.composite
def any_timestamp(draw: st.DrawFn) -> str:
    moment = draw(WIDE)
    minutes = draw(st.integers(-1439, 1439))
    local = moment.replace(tzinfo=UTC).astimezone(timezone(timedelta(minutes=minutes)))
    fraction = draw(st.text("0123456789", max_size=14))
    sign = "+" if minutes >= 0 else "-"
    zone = "Z" if minutes == 0 and draw(st.booleans()) else (
        f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}")
    wall = (f"{local.year:04d}-{local.month:02d}-{local.day:02d}T"  # strftime: no padded years
            f"{local.hour:02d}:{local.minute:02d}:{local.second:02d}")
    return wall + (f".{fraction}" if fraction else "") + zone


def test_any_two_timestamps_order_like_their_instants(redis_url: str) -> None:
    """Stale protection (instant keys compared in Lua) against an exact oracle, over the
    whole RFC 3339 range: years 1-9999, offsets to +-23:59, fractions to 14 digits."""
    with Persister(settings_for(redis_url)) as p:
        count = [0]

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(first=any_timestamp(), second=any_timestamp())
        def check(first: str, second: str) -> None:
            count[0] += 1
            key = f"pair{count[0]}"
            assert p.ok(message(key, updated=first, values={"n": 1})) > 0
            status = p.ok(message(key, updated=second, values={"n": 2}))
            if instant(second) >= instant(first):
                assert status > 0, (first, second)
            else:
                assert status == STALE, (first, second)

        check()
