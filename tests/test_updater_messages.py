"""The message rules of DESIGN.md: every rejection, its reason, count, log level, dead letter."""

from __future__ import annotations

import logging
import re
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson
import pytest
import redis
from harness import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from updater_fixtures import (
    InProcessUpdater,
    Persister,
    data_keys,
    is_rfc3339,
    publish_all,
    settings_for,
    stream_entries,
)

from kv_updater import Accepted, Rejected
from kv_updater.commit import BatchOutcome
from kv_updater.keys import KeyLayout
from kv_updater.message import MessageRules

T = TypeVar("T")
GOOD_TIME = "2023-10-01T12:00:00Z"
TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


def doc(**fields: Any) -> bytes:
    """A message from raw fields (a field set to ... is left out)."""
    base: dict[str, Any] = {"type": "t", "updated": GOOD_TIME, "values": {"a": 1}}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def with_depth(total: int, kinds: str = "d") -> bytes:
    """A message nested ``total`` levels deep, the message object itself being level 1.

    Built as text: JSON encoders have recursion limits of their own.
    """
    opens, closes = [], []
    for level in range(total - 2):
        is_dict = kinds[level % len(kinds)] == "d"
        opens.append('{"x":' if is_dict else "[")
        closes.append("}" if is_dict else "]")
    inner = "".join(opens) + "1" + "".join(reversed(closes))
    return doc(values={"deep": 0}).replace(b"0}}", inner.encode() + b"}}")


BAD_TIMES = [
    "2023-10-01T12:00:00",  # no offset
    "2023-10-01 12:00:00Z",  # space separator
    "20231001T120000Z",  # basic format
    "2023-10-01T1200:00Z",
    "2023-10-01",  # date only
    "12:00:00Z",
    "2023-10-01T12:00Z",  # no seconds
    "2023-10-01T12:00:00+0200",
    "2023-10-01T12:00:00+02",
    "2023-10-01T12:00:00.Z",  # a fraction without digits
    "2023-10-01T12:00:00,5Z",
    "2023-10-01T12:00:00.5.5Z",
    "2023-13-01T12:00:00Z",
    "2023-02-29T12:00:00Z",
    "2023-10-32T12:00:00Z",
    "2023-10-01T24:00:00Z",
    "2023-10-01T12:60:00Z",
    "2023-10-01T12:00:61Z",
    "2023-10-01T12:00:00+24:00",
    "2023-10-01T12:00:00+02:60",
    "2023-10-01T12:00:00ZZ",
    " 2023-10-01T12:00:00Z",
    "2023-10-01T12:00:00Z ",
    "2023-10-01T12:00:00Z\n",
    "2023-10-01X12:00:00Z",
    "+2023-10-01T12:00:00Z",
    "\u0662\u0660\u0662\u0663-10-01T12:00:00Z",  # Arabic-Indic digits are not RFC 3339's
    "2023-10-01T12:00:00+\u0660\u0662:00",
    "2023-10-01T12:00:\u0660\u0660Z",
    "2023-10-01T12:00:00.\u0665Z",
    "",
    "now",
]

REJECTIONS: list[tuple[str, bytes, str]] = [
    ("invalid_utf8", b'{"type":"t","updated":"' + GOOD_TIME.encode() + b'","values":{"a":"\xff"}}',
     "undecodable"),
    ("invalid_utf8", b"\xc3\x28", "undecodable"),
    ("invalid_utf8", b'{"type":"\xed\xa0\x80"}', "undecodable"),  # a UTF-8-encoded surrogate
    ("invalid_json", b"", "undecodable"),
    ("invalid_json", b"{", "undecodable"),
    ("invalid_json", b"{'type': 't'}", "undecodable"),
    ("invalid_json", b'{"type":"t","values":{"a":NaN}}', "undecodable"),
    ("invalid_json", b'{"type":"t",}', "undecodable"),
    ("invalid_json", doc()[:-1], "undecodable"),
    ("invalid_json", doc() + b"x", "undecodable"),
    ("not_object", b"[]", "malformed"),
    ("not_object", b'"key"', "malformed"),
    ("not_object", b"42", "malformed"),
    ("not_object", b"null", "malformed"),
    ("not_object", orjson.dumps([orjson.loads(doc())]), "malformed"),
    ("too_deep", with_depth(65), "malformed"),
    ("too_deep", with_depth(65, "l"), "malformed"),
    ("too_deep", with_depth(300, "dl"), "malformed"),
    ("too_deep", b"[" * 65 + b"]" * 65, "malformed"),
    ("too_deep", with_depth(1100), "malformed"),  # deeper than orjson's own limit
    ("too_deep", b"[" * 5000 + b"]" * 5000, "malformed"),
    ("bad_type", doc(type=...), "malformed"),
    ("bad_type", doc(type=None), "malformed"),
    ("bad_type", doc(type=7), "malformed"),
    ("bad_type", doc(type=["t"]), "malformed"),
    ("bad_type", doc(type=""), "malformed"),
    ("bad_type", doc(type="a" * 201), "malformed"),
    ("bad_type", doc(type="a b"), "malformed"),
    ("bad_type", doc(type="a/b"), "malformed"),
    ("bad_type", doc(type="caf\u00e9"), "malformed"),
    ("bad_type", doc(type="key\n"), "malformed"),  # "$" must not let a newline through
    ("reserved_type", doc(type="kvupdater:seq"), "malformed"),
    ("reserved_type", doc(type="kvupdater:index"), "malformed"),
    ("reserved_type", doc(type="kvupdater:instants"), "malformed"),
    ("reserved_type", doc(type="kvupdater:"), "malformed"),
    ("reserved_type", doc(type="kvupdater:anything.else"), "malformed"),
    ("bad_updated", doc(updated=...), "malformed"),
    ("bad_updated", doc(updated=None), "malformed"),
    ("bad_updated", doc(updated=1696161600), "malformed"),
    *(("bad_updated", doc(updated=t), "malformed") for t in BAD_TIMES),
    ("bad_valid", doc(valid=1696161600), "malformed"),
    ("bad_valid", doc(valid=[GOOD_TIME]), "malformed"),
    ("bad_valid", doc(valid={"at": GOOD_TIME}), "malformed"),
    ("bad_valid", doc(valid=True), "malformed"),
    *(("bad_valid", doc(valid=t), "malformed") for t in BAD_TIMES),
    ("bad_values", doc(values=...), "malformed"),
    ("bad_values", doc(values=None), "malformed"),
    ("bad_values", doc(values=[1, 2]), "malformed"),
    ("bad_values", doc(values="a=1"), "malformed"),
    ("bad_values", doc(values=1), "malformed"),
]


@pytest.fixture
def persist(redis_url: str) -> Iterator[Persister]:
    with Persister(settings_for(redis_url, dead_letter="dead")) as p:
        yield p


@pytest.mark.parametrize(
    ("reason", "raw", "severity"), REJECTIONS, ids=[f"{i}-{x[0]}" for i, x in enumerate(REJECTIONS)]
)
def test_each_rule_rejects_counts_logs_and_dead_letters(
    persist: Persister, r: redis.Redis, caplog: pytest.LogCaptureFixture,
    reason: str, raw: bytes, severity: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kv_updater")
    result = persist(raw)
    assert isinstance(result, Rejected), result
    assert result.reason == reason
    assert persist.metric("kvupdater_messages_rejected_total", {"reason": reason}) == 1
    assert persist.metric("kvupdater_messages_received_total") == 1
    assert persist.metric("kvupdater_dead_letters_total") == 1
    assert data_keys(r) == {b"dead"}
    assert not r.exists("kvupdater:seq")
    (fields,) = stream_entries(r, "dead")
    assert fields[b"reason"] == reason.encode()
    assert fields[b"payload"] == raw[:65536]
    assert fields[b"size"] == str(len(raw)).encode()
    assert fields[b"channel"] == b"update"
    assert fields[b"detail"]
    (record,) = [rec for rec in caplog.records if rec.name == "kv_updater"]
    expected_level = logging.ERROR if severity == "undecodable" else logging.WARNING
    assert record.levelno == expected_level
    assert record.getMessage().startswith(f"{severity} message ({reason}")


@pytest.mark.parametrize(
    "raw",
    [
        with_depth(64),
        with_depth(64, "l"),
        with_depth(64, "dl"),
        doc(type="a" * 200),
        doc(type="A-Z_a.z:0-9"),
        doc(type="kvupdater"),  # the namespace is "kvupdater:", with the colon
        doc(type="x:kvupdater:seq"),
        doc(valid=None),
        doc(updated="2023-10-01t12:00:00z"),
        doc(updated="2023-10-01T12:00:00.123456789012-23:59"),
        doc(updated="2016-12-31T23:59:60Z"),  # a leap second
        doc(values={}),
        doc(extra=[1, 2], another={"x": None}),
    ],
)
def test_boundary_cases_are_accepted(persist: Persister, raw: bytes) -> None:
    assert persist.ok(raw) == 1


def test_max_message_bytes_is_a_limit_not_an_off_by_one(persist: Persister, r: redis.Redis) -> None:
    limit = 1_048_576
    skeleton = len(doc(values={"pad": ""}))
    exact = doc(values={"pad": "x" * (limit - skeleton)})
    assert len(exact) == limit
    assert persist.ok(exact) == 1
    over = doc(values={"pad": "y" * (limit - skeleton + 1)})
    result = persist(over)
    assert isinstance(result, Rejected)
    assert result.reason == "too_large"
    assert r.get("t") is not None
    assert b"y" not in (r.get("t") or b"")
    (fields,) = stream_entries(r, "dead")
    assert len(fields[b"payload"]) == 65536  # the dead letter keeps a bounded prefix
    assert fields[b"size"] == str(limit + 1).encode()


def test_the_dead_letter_stream_cannot_be_overwritten_by_a_message(redis_url: str,
                                                                   r: redis.Redis) -> None:
    with Persister(settings_for(redis_url, dead_letter="app:dead", key_prefix="app:")) as p:
        result = p(doc(type="dead"))
        assert isinstance(result, Rejected)
        assert result.reason == "reserved_type"
        assert p.ok(doc(type="live")) == 1
    assert r.type("app:dead") == b"stream"
    assert r.exists("app:live")


def test_the_dead_letter_stream_is_capped(redis_url: str, r: redis.Redis) -> None:
    with InProcessUpdater(settings_for(redis_url, dead_letter="dead", dead_letter_maxlen=10)) as up:
        publish_all(r, "update", [b"junk"] * 2000 + [doc(type="end")])
        wait_until(lambda: r.exists("end"), 20, message="the end marker")
        wait_until(lambda: up.metric("kvupdater_dead_letters_total") == 2000, 10,
                   message="2000 dead letters counted")
    # MAXLEN ~ trims whole stream nodes (100 entries by default): bounded, not exact.
    assert 10 <= r.xlen("dead") <= 10 + 200


def test_without_dead_letter_nothing_is_kept(redis_url: str, r: redis.Redis) -> None:
    with Persister(settings_for(redis_url)) as p:
        assert isinstance(p(b"junk"), Rejected)
        assert p.metric("kvupdater_dead_letters_total") == 0
    assert r.keys("*") == []


# -- hypothesis junk through the real subscription -----------------------------------
LIMIT = 4096


def _undecodable_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _orjson_rejects(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return True
    return False


ints = st.integers(-(2**63), 2**63 - 1)  # orjson's range
json_scalars = st.none() | st.booleans() | ints | st.text(max_size=10) | st.floats(
    allow_nan=False, allow_infinity=False)
json_docs = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
good_types = st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True).filter(
    lambda t: not t.startswith("kvupdater:"))


def _mutations(text: str) -> st.SearchStrategy[str]:
    """A valid timestamp with one character replaced, inserted or deleted."""
    chars = st.sampled_from("0123456789:+-.TtZz \u0660x")
    index = st.integers(0, len(text) - 1)
    return st.one_of(
        st.tuples(index, chars).map(lambda p: text[: p[0]] + p[1] + text[p[0] + 1 :]),
        st.tuples(index, chars).map(lambda p: text[: p[0]] + p[1] + text[p[0] :]),
        index.map(lambda i: text[:i] + text[i + 1 :]),
    )


timestamp_junk = st.one_of(
    _mutations("2023-10-01T12:00:00Z"),
    _mutations("2023-10-01T12:00:00.25+05:30"),
    st.text(max_size=30),
    st.sampled_from(BAD_TIMES),
)

# (payload, expected reason, or None when the payload is acceptable)
Case = tuple[bytes, str | None]
junk_cases: st.SearchStrategy[Case] = st.one_of(
    st.binary(max_size=200).filter(_undecodable_utf8).map(lambda b: (b, "invalid_utf8")),
    st.binary(max_size=60).map(
        lambda b: (doc(values={"s": "x"})[:-3] + b + b"\xff\"}}", "invalid_utf8")),
    st.text(max_size=100).map(str.encode).filter(_orjson_rejects).map(
        lambda b: (b, "invalid_json")),
    st.integers(1, 40).map(lambda n: (doc()[:-n], "invalid_json")),
    st.integers(LIMIT + 1, LIMIT * 3).map(lambda n: (b"x" * n, "too_large")),
    st.integers(LIMIT + 1, LIMIT * 3).map(
        lambda n: (doc(values={"p": "y" * n}), "too_large")),
    st.tuples(st.integers(60, 70), st.sampled_from(["d", "l", "dl", "ldd"])).map(
        lambda p: (with_depth(*p), "too_deep" if p[0] > 64 else None)),
    st.integers(1000, 2000).map(lambda n: (b"[" * n + b"]" * n, "too_deep")),
    json_docs.filter(lambda d: not isinstance(d, dict)).map(
        lambda d: (orjson.dumps(d), "not_object")),
    st.one_of(st.text(max_size=210).filter(lambda t: TYPE_PATTERN.fullmatch(t) is None),
              ints, st.none(), st.lists(ints, max_size=2),
              st.just(...)).map(lambda t: (doc(type=t), "bad_type")),
    st.from_regex(r"[A-Za-z0-9_.:-]{0,150}", fullmatch=True).map(
        lambda t: (doc(type="kvupdater:" + t), "reserved_type")),
    timestamp_junk.map(lambda t: (doc(updated=t), None if is_rfc3339(t) else "bad_updated")),
    st.one_of(ints, st.just(...), st.lists(st.text(), max_size=1)).map(
        lambda t: (doc(updated=t), "bad_updated")),
    timestamp_junk.map(lambda t: (doc(valid=t), None if is_rfc3339(t) else "bad_valid")),
    st.one_of(ints, st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
              json_docs.filter(lambda v: isinstance(v, list | dict))).map(
        lambda v: (doc(valid=v), "bad_valid")),
    st.one_of(json_docs.filter(lambda v: not isinstance(v, dict)), st.just(...)).map(
        lambda v: (doc(values=v), "bad_values")),
    good_types.flatmap(lambda t: json_docs.map(
        lambda v: (doc(type=t, values={"v": v}, extra=v), None))),
)


def _retyped(raw: bytes, type_: str) -> bytes:
    return orjson.dumps({**orjson.loads(raw), "type": type_})


def test_junk_is_rejected_counted_dead_lettered_and_never_stops_the_stream(
    redis_url: str, r: redis.Redis
) -> None:
    settings_ = settings_for(redis_url, dead_letter="dead", max_message_bytes=LIMIT)
    with InProcessUpdater(settings_) as up:
        rounds = [0]

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(cases=st.lists(junk_cases, min_size=1, max_size=8))
        def check(cases: list[Case]) -> None:
            rounds[0] += 1
            marker = f"marker.{rounds[0]}"
            before_received = up.metric("kvupdater_messages_received_total")
            before = {reason: up.metric("kvupdater_messages_rejected_total", {"reason": reason})
                      for reason in {reason for _, reason in cases if reason}}
            dead_before = r.xlen("dead")
            # Acceptable cases get a type of their own, so each must land as a new key.
            cases = [(raw, reason) if reason else (_retyped(raw, f"ok.{rounds[0]}.{i}"), None)
                     for i, (raw, reason) in enumerate(cases)]
            payloads = [raw for raw, _ in cases] + [doc(type=marker)]
            assert publish_all(r, "update", payloads) == [1] * len(payloads)
            wait_until(lambda: r.exists(marker), 10, message=marker)
            expected = Counter(reason for _, reason in cases if reason)
            for why, count in expected.items():
                got = up.metric("kvupdater_messages_rejected_total", {"reason": why})
                assert got - before[why] == count, (why, cases)
            assert up.metric("kvupdater_messages_received_total") - before_received == len(
                payloads)
            wait_until(lambda: r.xlen("dead") >= dead_before + sum(expected.values()), 10,
                       message="the dead letters")
            dead = stream_entries(r, "dead")[dead_before:]
            assert [f[b"reason"].decode() for f in dead] == [
                reason for _, reason in cases if reason]
            assert [f[b"payload"] for f in dead] == [raw for raw, reason in cases if reason]
            for raw, reason in cases:
                if reason is None:
                    parsed = orjson.loads(raw)
                    assert r.exists(parsed["type"]), raw
            if expected:  # the stream exists once something was rejected
                assert r.type("dead") == b"stream"

        check()
        assert up.updater.ready
    assert b"kvupdater:dead" not in data_keys(r)


def test_persist_data_reports_the_rejection_and_the_outcome(persist: Persister) -> None:
    rejected = persist(b"{}")
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "bad_type"
    accepted = persist(doc())
    assert isinstance(accepted, BatchOutcome)
    assert (accepted.committed, accepted.statuses) == (1, [1])


def test_an_unhashable_valid_does_not_kill_the_service(redis_url: str, r: redis.Redis) -> None:
    """Regression: a list or object in `valid` raised TypeError out of parse and ended run()."""
    with InProcessUpdater(settings_for(redis_url)) as up:
        publish_all(r, "update", [doc(valid=[GOOD_TIME]), doc(valid={}), doc(type="after")])
        wait_until(lambda: r.exists("after"), 10, message="the message after the junk")
        assert up.metric("kvupdater_messages_rejected_total", {"reason": "bad_valid"}) == 2
        assert up.thread.is_alive()


def test_a_flood_of_junk_is_logged_in_bounded_lines_and_counted_in_full(
    redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kv_updater")
    with InProcessUpdater(settings_for(redis_url)) as up:
        publish_all(r, "update", [b'{"type": 1}'] * 500 + [doc(type="end")])
        wait_until(lambda: r.exists("end"), 10, message="the end marker")
        assert up.metric("kvupdater_messages_rejected_total", {"reason": "bad_type"}) == 500
    texts = [rec.getMessage() for rec in caplog.records]
    assert len([t for t in texts if t.startswith("malformed message")]) == 20
    assert "480 more rejected messages not logged in the last 5 s (see the metrics)" in texts


def test_type_json_spells_only_allowed_types_and_matches_what_parse_stores() -> None:
    """MessageRules.type_json: the API's spelling of a type is the one the updater uses."""
    rules = MessageRules(KeyLayout(namespace="ns:"), reserved_keys=frozenset({"dead"}))
    assert rules.type_json('a"b') is None  # fails the pattern
    assert rules.type_json("ns:seq") is None  # the internal namespace
    assert rules.type_json("dead") is None  # a reserved key
    spelled = rules.type_json("sensor:1")
    assert spelled == b'"sensor:1"'
    parsed = rules.parse(b'{"type":"sensor:1","updated":"2023-10-01T12:00:00Z","values":{}}')
    assert isinstance(parsed, Accepted)
    assert parsed.type_json is spelled  # one cache, shared with parse


def bytes_kept_per_call(make: Callable[[], T], calls: int) -> tuple[float, list[T]]:
    """Memory still allocated per call after ``calls`` calls of ``make``, and the
    results (kept meanwhile)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(calls)]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return grown / calls, kept


def test_remembered_type_names_cost_their_size_not_orjsons_buffer() -> None:
    """Regression: orjson (3.12+) returns a 4 KiB buffer for any short output, and the
    type cache kept it: 100,000 distinct types held 400 MB (the updater reached
    690 MB in a 1,000,000-key burst; every api_server process caches them too)."""
    rules = MessageRules()
    raws = iter([doc(type=f"sensor-{i:05d}") for i in range(2000)])
    per_message, parsed = bytes_kept_per_call(lambda: rules.parse(next(raws)), 2000)
    assert all(isinstance(m, Accepted) for m in parsed)
    # Each message's own objects and its cache entry: a few hundred bytes, not 4 KiB.
    assert per_message < 1500, f"{per_message:.0f} B per message"


def test_stored_values_are_allocated_at_their_size() -> None:
    """Regression: the same 4 KiB buffer for each stored value of a batch (40 MB for a
    batch of 10,000, held until its commit is checked)."""
    parsed = MessageRules().parse(doc(values={"t": 21.5}))
    assert isinstance(parsed, Accepted)
    assert parsed.stored == b'{"updated":"2023-10-01T12:00:00Z","valid":null,"values":{"t":21.5}}'
    per_value, _ = bytes_kept_per_call(lambda: parsed.stored, 1000)
    assert per_value < 200, f"{per_value:.0f} B per stored value"
