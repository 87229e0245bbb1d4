"""Where the updater writes (prefix, namespace, channels) and the ways it reaches Redis."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from harness import LocalRedis, RedisServer, free_port, wait_until
from updater_fixtures import (
    InProcessUpdater,
    Listener,
    Persister,
    acl_user,
    all_keys,
    http_get,
    message,
    publish_all,
    scrape,
    settings_for,
    stored_of,
    updater_process,
    wait_subscribed,
)

from kv_updater import KVUpdater, Rejected


def test_key_prefix_namespace_and_stored_channel_are_honoured(
    redis_url: str, r: redis.Redis
) -> None:
    s = settings_for(redis_url, key_prefix="app:", namespace="ns:", stored_channel="commits")
    with Listener(r, "commits") as stored, Persister(s) as p:
        assert p.ok(message("t")) == 1
        assert p.ok(message("kvupdater:seq")) == 2  # not reserved under another namespace
        for reserved in ("ns:seq", "ns:anything"):
            result = p(message(reserved))
            assert isinstance(result, Rejected)
            assert result.reason == "reserved_type"
        notes = stored.wait_count(2)
    with Persister(settings_for(redis_url, key_prefix="n", namespace="ns:")) as p:
        crossing = p(message("s:index"))  # "n" + "s:index" is the index itself
        assert isinstance(crossing, Rejected)
        assert crossing.reason == "reserved_type"
    assert r.get("app:t") == stored_of("2023-10-01T12:00:00Z", {"v": 1})
    assert r.get("ns:seq") == b"2"
    assert r.zscore("ns:index", "t") == 1
    assert r.zscore("ns:index", "kvupdater:seq") == 2
    assert all_keys(r) == {b"app:t", b"app:kvupdater:seq", b"ns:seq", b"ns:index",
                           b"ns:instants"}
    assert [orjson.loads(n)["type"] for n in notes] == ["t", "kvupdater:seq"]


def test_the_seeds_constructor_takes_a_client_a_channel_and_the_validation_flag(
    redis_url: str, r: redis.Redis
) -> None:
    """KVUpdater(client, channel, validate): subscription and commits both use the
    client's connection, an ACL user's password included."""
    host_port = redis_url.removeprefix("redis://")
    with acl_user(r, "seed-user", "p@ss:w/rd"):
        client = aioredis.Redis.from_url(f"redis://seed-user:p%40ss%3Aw%2Frd@{host_port}")
        updater = KVUpdater(client, "seed-channel", False)
        assert (updater.channel, updater.validate) == ("seed-channel", False)
        with InProcessUpdater(updater) as up:
            publish_all(r, "seed-channel", [message("via-seed")])
            wait_until(partial(r.exists, "via-seed"), 10, message="the message")
            assert up.metric("kvupdater_validations_total") == 0
            users = {(c["name"], c["user"]) for c in r.client_list()}
            assert ("kv-updater", "seed-user") in users  # the subscription logged in as the user
        assert "p%40ss" not in str(updater.settings.redacted())


def test_the_seeds_constructor_does_not_freeze_the_derived_stored_channel(
    redis_url: str, r: redis.Redis
) -> None:
    """KVUpdater(client, channel) commits on "<channel>:stored", not on the default
    channel's "update:stored"; a channel named "update:stored" is allowed."""
    client = aioredis.Redis.from_url(redis_url)
    updater = KVUpdater(client, "seed-channel")
    assert updater.settings.stored_channel == "seed-channel:stored"
    with Listener(r, "seed-channel:stored") as stored, InProcessUpdater(updater):
        publish_all(r, "seed-channel", [message("derived")])
        (note,) = stored.wait_count(1)
    assert orjson.loads(note)["type"] == "derived"
    assert KVUpdater(client, "update:stored").settings.stored_channel == "update:stored:stored"
    explicit = settings_for(redis_url, stored_channel="commits")
    assert KVUpdater(client, "other", settings=explicit).settings.stored_channel == "commits"
    asyncio.run(client.aclose())


def test_commits_go_to_the_database_of_the_url(redis_url: str, r: redis.Redis) -> None:
    """The commit connection (kv_updater.resp.RespLink) selects the URL's database,
    as redis-py's connections did before it."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    db3 = redis.Redis.from_url(url)
    db3.flushdb()
    with Persister(settings_for(url)) as p:
        assert p.ok(message("in-db-3")) == 1
    assert db3.get("in-db-3") == stored_of("2023-10-01T12:00:00Z", {"v": 1})
    assert db3.get("kvupdater:seq") == b"1"
    assert not r.exists("in-db-3", "kvupdater:seq")
    db3.flushdb()
    db3.close()


def test_a_commit_connection_closed_while_idle_is_reopened_without_failing_a_commit(
    redis_url: str, r: redis.Redis
) -> None:
    """Redis closed the idle commit connection (a restart, CLIENT KILL, a proxy's idle
    timeout): the next commit opens a new one instead of failing - nothing had been
    sent on the old one, so nothing can be applied twice."""
    with Persister(settings_for(redis_url)) as p:
        assert p.ok(message("first", "2023-10-01T12:00:00Z")) == 1
        committer = p.updater.committer
        assert committer.connected
        assert r.client_kill_filter(_type="normal", skipme=True) >= 1

        async def noticed() -> None:
            deadline = asyncio.get_running_loop().time() + 10
            while committer.connected:
                assert asyncio.get_running_loop().time() < deadline, "EOF not seen"
                await asyncio.sleep(0.01)

        p.runner.run(noticed())
        assert p.ok(message("second", "2023-10-01T12:00:01Z")) == 2
        assert committer.connected
    assert r.exists("first", "second") == 2


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_unix_socket_with_a_password() -> None:
    sock = Path(tempfile.mkdtemp(prefix="kvu-")) / "redis.sock"
    server = LocalRedis(["--unixsocket", str(sock), "--unixsocketperm", "700"])
    server.start()
    try:
        admin = server.client()
        admin.config_set("requirepass", "sock-secret")
        admin.close()
        client = redis.Redis(unix_socket_path=str(sock), password="sock-secret")
        url = f"unix://:sock-secret@{sock}?db=0"
        with InProcessUpdater(settings_for(url)):
            publish_all(client, "update", [message("over-unix")])
            wait_until(partial(client.exists, "over-unix"), 10, message="the message")
        client.close()
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("openssl") is None,
                    reason="needs redis-server and openssl")
@pytest.mark.parametrize("verify", ["ca", "none"])
def test_rediss_with_a_verified_or_an_unverified_certificate(tmp_path: Path, verify: str) -> None:
    """TLS for both the subscription (its own ssl context) and the commits (redis-py)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    tls_port = free_port()
    server = LocalRedis(["--tls-port", str(tls_port), "--tls-auth-clients", "no",
                         "--tls-cert-file", str(tmp_path / "cert.pem"),
                         "--tls-key-file", str(tmp_path / "key.pem"),
                         "--tls-ca-cert-file", str(tmp_path / "cert.pem")])
    server.start()
    query = f"ssl_ca_certs={tmp_path / 'cert.pem'}" if verify == "ca" else "ssl_cert_reqs=none"
    url = f"rediss://127.0.0.1:{tls_port}/0?{query}"
    try:
        client = redis.Redis.from_url(url)
        with InProcessUpdater(settings_for(url)) as up:
            publish_all(client, "update", [message("over-tls")])
            wait_until(partial(client.exists, "over-tls"), 10, message="the message")
            wait_until(lambda: up.metric("kvupdater_validations_total") == 1, 10,
                       message="read back")
        # The seed's constructor with a TLS client: the subscription must use TLS too.
        seed = KVUpdater(aioredis.Redis.from_url(url), "update", True)
        with InProcessUpdater(seed):
            publish_all(client, "update", [message("seed-over-tls")])
            wait_until(partial(client.exists, "seed-over-tls"), 10, message="the message")
        client.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_starting_while_redis_is_down_waits_for_it(own_redis: RedisServer) -> None:
    own_redis.stop()
    port = free_port()
    with updater_process(own_redis.url, "--metrics-port", str(port)) as svc:
        svc.wait_log("Redis unavailable")
        assert http_get(port, "/live")[0] == 200
        assert http_get(port, "/ready")[0] == 503
        own_redis.start()
        wait_until(lambda: http_get(port, "/ready")[0] == 200, 20, message="ready")
        client = own_redis.client()
        wait_subscribed(client, "update")
        publish_all(client, "update", [message("first")])
        wait_until(partial(client.exists, "first"), 10, message="the first message")
        client.close()
        svc.wait_log("Redis is back")
        assert scrape(port, "kvupdater_reconnects_total") == 0  # never lost: never had it
    assert svc.log.count(" ERROR ") == 1
