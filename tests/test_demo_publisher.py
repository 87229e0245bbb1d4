"""demo_publisher: the feeds move plausibly, messages meet the contract, pacing and lifecycle."""

from __future__ import annotations

import itertools
import random
import re
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis
from harness import Service, free_port, wait_until

from demo_publisher.feeds import CITIES, AirQuality, Weather, aqi_pm25, catalog, moon_phase
from demo_publisher.publisher import Publisher, rfc3339
from demo_publisher.settings import PublisherSettings
from kv_updater.instant import instant_key
from kv_updater.message import Accepted, MessageRules

RFC3339_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def settings(**values: Any) -> PublisherSettings:
    return PublisherSettings.model_validate(values)


# ---- feeds ------------------------------------------------------------------------------


def test_catalog_mixes_kinds_and_extends_without_end() -> None:
    feeds = catalog(16, seed=1)
    types = [f.type for f in feeds]
    assert len(set(types)) == 16
    assert types[0] == "moon"
    assert {t.split(":")[0] for t in types} == {"moon", "weather", "air", "sensor"}
    many = catalog(500, seed=1)
    assert len({f.type for f in many}) == 500
    assert [f.type for f in many[:16]] == types


def test_same_seed_same_values_whatever_the_key_count() -> None:
    now = datetime(2024, 6, 1, 12, tzinfo=UTC)
    a = {f.type: f.values(now) for f in catalog(10, seed=7)}
    b = {f.type: f.values(now) for f in catalog(30, seed=7)}
    assert all(b[t] == v for t, v in a.items())


def test_every_message_is_accepted_by_the_contract() -> None:
    rules = MessageRules()
    pub = Publisher(settings(keys=40, rate=100, seed=3))
    for raw in pub.build(200):
        parsed = rules.parse(raw)
        assert isinstance(parsed, Accepted), parsed
        doc = orjson.loads(raw)
        assert RFC3339_MS_Z.match(doc["updated"])
        assert RFC3339_MS_Z.match(doc["valid"])
        assert instant_key(doc["valid"]) > instant_key(doc["updated"])
        assert doc["values"]


def test_valid_horizon_covers_slow_update_intervals() -> None:
    now = datetime(2024, 6, 1, 12, tzinfo=UTC)
    # 16 keys at 0.1 msg/s: each key updates every 160 s; a value must outlive that.
    pub = Publisher(settings(keys=16, rate=0.1, seed=1))
    for raw in pub.build(16, now):
        doc = orjson.loads(raw)
        valid = datetime.fromisoformat(doc["valid"])
        assert valid - now >= timedelta(seconds=3 * 160)


def test_weather_stays_plausible_over_days() -> None:
    start = datetime(2024, 1, 10, tzinfo=UTC)
    for city in CITIES:
        feed = Weather(city, random.Random(city.slug))
        temps: list[float] = []
        for minute in range(0, 3 * 24 * 60, 10):
            v = feed.values(start + timedelta(minutes=minute))
            temps.append(v["temperature_c"])
            assert 0 <= v["humidity_pct"] <= 100
            assert 950 <= v["pressure_hpa"] <= 1050
            assert v["wind_kph"] >= 0
            assert v["conditions"] in {"clear", "partly cloudy", "cloudy", "rain", "snow", "storm"}
        assert min(temps) > -35, city.name
        assert max(temps) < 48, city.name
        # A day-night cycle shows, and ten minutes never jump by more than a few degrees.
        assert max(temps) - min(temps) > 2, city.name
        assert max(abs(a - b) for a, b in itertools.pairwise(temps)) < 3, city.name


def test_air_quality_follows_the_epa_scale() -> None:
    assert aqi_pm25(0) == (0, "good")
    assert aqi_pm25(9.0) == (50, "good")
    assert aqi_pm25(35.4) == (100, "moderate")
    assert aqi_pm25(55.5)[1] == "unhealthy"
    assert aqi_pm25(600) == (500, "hazardous")
    feed = AirQuality(CITIES[0], random.Random(1))
    v = feed.values(datetime(2024, 6, 1, 8, tzinfo=UTC))
    assert (v["aqi"], v["category"]) == aqi_pm25(v["pm2_5_ugm3"])
    assert v["pm10_ugm3"] >= v["pm2_5_ugm3"]


@pytest.mark.parametrize(
    ("when", "phase", "low", "high"),
    [
        # Known phases: the new moon of the 2024-04-08 eclipse, the full moon of 2024-04-23.
        (datetime(2024, 4, 8, 18, 21, tzinfo=UTC), "new moon", 0, 2),
        (datetime(2024, 4, 23, 23, 49, tzinfo=UTC), "full moon", 98, 100),
        (datetime(2024, 4, 15, 19, 13, tzinfo=UTC), "first quarter", 40, 60),
    ],
)
def test_moon_phase_matches_the_almanac(
    when: datetime, phase: str, low: float, high: float
) -> None:
    m = moon_phase(when)
    assert m["phase"] == phase
    assert low <= m["illumination_pct"] <= high


def test_rfc3339_has_milliseconds_and_z() -> None:
    t = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert rfc3339(t) == "2024-01-02T03:04:05.678Z"


# ---- the process ------------------------------------------------------------------------


def collect(pubsub: redis.client.PubSub, n: int, timeout: float) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    def more() -> bool:
        msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None and msg["type"] == "message":
            got.append(orjson.loads(msg["data"]))
        return len(got) >= n

    wait_until(more, timeout, interval=0, message=f"{n} messages (got {len(got)})")
    return got


def subscribed(r: redis.Redis, channel: str = "update") -> redis.client.PubSub:
    pubsub: redis.client.PubSub = r.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
    pubsub.subscribe(channel)
    wait_until(lambda: pubsub.get_message(timeout=0.1), 5, message="subscription")
    return pubsub


def test_publishes_count_messages_at_the_rate_and_exits(redis_url: str, r: redis.Redis) -> None:
    pubsub = subscribed(r)
    with Service("demo_publisher", ["--redis-url", redis_url, "--rate", "20", "--count", "21",
                                    "--keys", "7", "--seed", "5"]) as svc:
        got = collect(pubsub, 21, 15)
        assert svc.wait(10) == 0, svc.log
    rules = MessageRules()
    assert all(isinstance(rules.parse(orjson.dumps(m)), Accepted) for m in got)
    assert len({m["type"] for m in got}) == 7
    # 21 messages at 20 msg/s: the first at once, the last one second later.
    first = datetime.fromisoformat(got[0]["updated"])
    last = datetime.fromisoformat(got[-1]["updated"])
    assert 0.85 <= (last - first).total_seconds() <= 1.6
    assert "stopped: sent 21 messages" in svc.log


def test_flat_out_publishes_in_batches(redis_url: str) -> None:
    start = time.monotonic()
    with Service("demo_publisher", ["--redis-url", redis_url, "--rate", "0", "--count", "20000",
                                    "--keys", "300"]) as svc:
        assert svc.wait(30) == 0, svc.log
    assert "stopped: sent 20000 messages" in svc.log
    assert time.monotonic() - start < 25


def test_duration_and_progress_line(redis_url: str) -> None:
    with Service("demo_publisher", ["--redis-url", redis_url, "--rate", "100", "--duration",
                                    "1.5", "--progress-interval", "0.5"]) as svc:
        assert svc.wait(15) == 0, svc.log
    assert re.search(r"sent \d+ messages, [\d.]+ msg/s \(target 100\)", svc.log), svc.log
    sent = int(re.findall(r"stopped: sent (\d+) messages", svc.log)[0])
    assert 100 <= sent <= 170


def test_json_logs_and_settings_from_env(redis_url: str) -> None:
    env = {"RATE": "50", "COUNT": "5", "KEYS": "2", "LOG_FORMAT": "json"}
    with Service("demo_publisher", ["--redis-url", redis_url], env=env) as svc:
        assert svc.wait(15) == 0, svc.log
    lines = [orjson.loads(line) for line in svc.log.splitlines() if line.strip()]
    start = next(doc for doc in lines if doc["message"].startswith("starting with"))
    assert "'rate': 50.0" in start["message"]
    assert "'keys': 2" in start["message"]
    assert any("sent 5 messages" in doc["message"] for doc in lines)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(redis_url: str, r: redis.Redis, sig: int) -> None:
    pubsub = subscribed(r)
    with Service("demo_publisher", ["--redis-url", redis_url, "--rate", "50"]) as svc:
        collect(pubsub, 3, 15)
        svc.signal(sig)
        assert svc.wait(10) == 0, svc.log
    assert "stopped: sent" in svc.log


def test_redis_down_is_one_error_and_still_stops_cleanly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with Service("demo_publisher", ["--redis-url", url, "--rate", "50"]) as svc:
        svc.wait_log("Redis unavailable")
        svc.signal(signal.SIGTERM)
        assert svc.wait(10) == 0, svc.log
    assert svc.log.count("ERROR") == 1, svc.log


def test_redis_restart_is_one_outage_then_publishing_resumes(own_redis: Any) -> None:
    client = own_redis.client()
    with Service("demo_publisher", ["--redis-url", own_redis.url, "--rate", "50"]) as svc:
        pubsub = subscribed(client)
        collect(pubsub, 3, 15)
        own_redis.stop()
        svc.wait_log("Redis unavailable")
        own_redis.start()
        svc.wait_log("Redis is back", 20)
        pubsub = subscribed(own_redis.client())
        collect(pubsub, 3, 15)
        svc.signal(signal.SIGTERM)
        assert svc.wait(10) == 0, svc.log
    assert svc.log.count("ERROR") == 1, svc.log


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (["--rate", "-1"], "rate"),
        (["--keys", "0"], "keys"),
        (["--redis-url", "http://nope"], "redis_url"),
        (["--log-level", "LOUD"], "log_level"),
    ],
)
def test_bad_settings_exit_2_with_one_line(args: list[str], where: str) -> None:
    svc = Service("demo_publisher", args).start()
    assert svc.wait(15) == 2
    lines = svc.log.strip().splitlines()
    assert len(lines) == 1, svc.log
    assert where in lines[0], svc.log
