"""REST reads: only the updater's index is served, type names are checked first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis
from api_fixtures import LAYOUT, commit_sync, running_api
from harness import wait_until

from api_server.app import STATIC_DIR as STATIC
from kv_updater.settings import EXIT_BAD_SETTING


def _evalsha_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0)) if isinstance(entry, dict) else 0


@pytest.mark.smoke
def test_reads_return_the_stored_value_with_type_and_seq(redis_url: str, r: redis.Redis) -> None:
    commit_sync(redis_url, ["alpha", "beta", "sensor:1.temp"])
    with running_api(redis_url) as api:
        body = api.get("/keys").json()
        assert body == {"keys": [{"type": "alpha", "seq": 1}, {"type": "beta", "seq": 2},
                                 {"type": "sensor:1.temp", "seq": 3}]}
        for route in ("/keys/", "/key/"):
            resp = api.get(route + "sensor:1.temp")
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/json"
            doc = resp.json()
            stored = json.loads(r.get("sensor:1.temp") or b"")
            assert doc == {"type": "sensor:1.temp", "seq": 3, **stored}
            assert list(doc) == ["type", "updated", "valid", "values", "seq"]
        # ETag is the seq: a client holding it gets 304.
        etag = api.get("/keys/alpha").headers["etag"]
        assert etag == '"1"'
        assert api.get("/keys/alpha", headers={"If-None-Match": etag}).status_code == 304


def test_planted_and_invalid_keys_are_404_and_invalid_ones_never_reach_redis(
    redis_url: str, r: redis.Redis
) -> None:
    commit_sync(redis_url, ["real"])
    r.set("planted", b'{"updated":"2026-01-01T00:00:00Z","valid":null,"values":{}}')
    with running_api(redis_url) as api:
        assert api.get("/keys/real").status_code == 200
        resp = api.get("/keys/planted")
        assert resp.status_code == 404
        assert resp.json() == {"detail": "unknown key"}
        assert "planted" not in {k["type"] for k in api.get("/keys").json()["keys"]}
        # Names failing the pattern, or in the namespace, are refused before Redis.
        before = _evalsha_calls(r)
        for bad in ("a%20b", "x" * 201, "kvupdater:seq", "kvupdater:index", "%C3%A9t%C3%A9"):
            assert api.get(f"/keys/{bad}").status_code == 404, bad
            assert api.get(f"/key/{bad}").status_code == 404, bad
        assert _evalsha_calls(r) == before
        api.get("/keys/nothing-here")
        assert _evalsha_calls(r) == before + 1  # the counter does move for a valid name


def test_indexed_key_overwritten_by_a_non_value_is_not_served(
    redis_url: str, r: redis.Redis
) -> None:
    commit_sync(redis_url, ["victim"])
    r.set("victim", b"not json")
    with running_api(redis_url) as api:
        assert api.get("/keys/victim").status_code == 404


def test_health_metrics_and_docs(redis_url: str) -> None:
    commit_sync(redis_url, ["a"])
    with running_api(redis_url) as api:
        assert api.get("/live").json() == {"status": "ok"}
        assert api.get("/ready").json() == {"status": "ok", "redis": True, "subscription": True}
        api.get("/keys/a")
        api.get("/keys/missing")
        text = api.get("/metrics").text
        assert 'api_http_requests_total{method="GET",route="/keys/{type}",status="200"} 1.0' in text
        assert 'api_http_requests_total{method="GET",route="/keys/{type}",status="404"} 1.0' in text
        assert "api_http_request_duration_seconds_bucket" in text
        for name in ("api_sse_clients", "api_sse_events_sent_total",
                     "api_sse_values_conflated_total", "api_redis_reconnects_total",
                     "process_resident_memory_bytes"):
            assert name in text, name
        schema = api.get("/openapi.json").json()
        assert {"/keys", "/keys/{type}", "/key/{type}", "/events", "/live", "/ready",
                "/metrics"} <= set(schema["paths"])
        docs = api.get("/docs")
        assert docs.status_code == 200
        assert "swagger" in docs.text.lower()
        # The dashboard (its files belong to api_server/static/) is served at /.
        if (STATIC / "index.html").is_file():
            page = api.get("/")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            for name in (p.name for p in STATIC.iterdir() if p.is_file()):
                assert api.get(f"/static/{name}").status_code == 200, name


def test_redis_errors_answer_json_without_a_trace(own_redis: object) -> None:
    server = own_redis
    url = server.url  # type: ignore[attr-defined]
    commit_sync(url, ["a"])
    with running_api(url, ["--shutdown-timeout", "1"]) as api:
        server.stop()  # type: ignore[attr-defined]
        resp = api.get("/keys/a")
        assert resp.status_code == 503
        assert resp.json() == {"detail": "Redis unavailable"}
        assert "Traceback" not in resp.text
        assert api.get("/ready").status_code == 503
        # Back again (empty: no persistence): reads reconnect on their own.
        server.start()  # type: ignore[attr-defined]
        commit_sync(url, ["a"])
        wait_until(lambda: api.get("/keys/a").status_code == 200, 10,
                   message="reads to work again after the restart")


def test_reads_survive_redis_losing_its_script_cache(redis_url: str, r: redis.Redis) -> None:
    """The read script is loaded again after SCRIPT FLUSH (what a failover to a
    replica, or a restart, does to the script cache): no 500, no 503."""
    commit_sync(redis_url, ["a"])
    with running_api(redis_url) as api:
        assert api.get("/keys/a").status_code == 200
        r.script_flush()
        resp = api.get("/keys/a")
        assert resp.status_code == 200, resp.text
        assert resp.json()["type"] == "a"


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--port", "70000", "port"),
        ("--log-level", "LOUD", "log_level"),
        ("--redis-url", "http://x", "redis_url"),
        ("--cors-origins", "example.com", "cors_origins"),
        ("--max-sse-clients", "-1", "max_sse_clients"),
    ],
)
def test_bad_settings_exit_2_with_one_line(flag: str, value: str, words: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "api_server", flag, value],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == EXIT_BAD_SETTING
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert words in lines[0]


def test_layout_settings_are_honoured(redis_url: str, r: redis.Redis) -> None:
    # Another namespace: the default index is not this server's.
    commit_sync(redis_url, ["a"])
    with running_api(redis_url, ["--namespace", "other:"]) as api:
        assert api.get("/keys").json() == {"keys": []}
        assert api.get("/keys/a").status_code == 404
    assert LAYOUT.index == "kvupdater:index"
