"""The chain against a Redis that demands a client certificate (mutual TLS), as
managed Redis services and in-cluster Redis behind cert-manager can: kv_updater
and api_server take the certificate, key and CA from the URL's query string, on
every connection they open (subscription, commit link, redis-py pool)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from api_fixtures import running_api
from harness import LocalRedis, free_port, wait_until
from updater_fixtures import message, publish_all, updater_process, wait_subscribed

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("openssl") is None,
    reason="needs redis-server and openssl",
)


@dataclass
class MutualTlsRedis:
    plain: LocalRedis
    """The server; its plain port is for the test's own set-up only."""
    url: str
    """rediss:// with CA, client certificate and key."""
    url_without_cert: str


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture
def mtls_redis(tmp_path: Path) -> Iterator[MutualTlsRedis]:
    server_cert, server_key = _self_signed(tmp_path, "server")
    client_cert, client_key = _self_signed(tmp_path, "client")
    cas = tmp_path / "cas.pem"  # each side trusts the other's self-signed certificate
    cas.write_bytes(server_cert.read_bytes() + client_cert.read_bytes())
    tls_port = free_port()
    server = LocalRedis(["--tls-port", str(tls_port), "--tls-auth-clients", "yes",
                         "--tls-cert-file", str(server_cert), "--tls-key-file", str(server_key),
                         "--tls-ca-cert-file", str(cas)])
    server.start()
    base = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={server_cert}"
    try:
        yield MutualTlsRedis(
            server, f"{base}&ssl_certfile={client_cert}&ssl_keyfile={client_key}", base
        )
    finally:
        server.stop()


def test_the_chain_works_over_mutual_tls(mtls_redis: MutualTlsRedis) -> None:
    # The server really refuses a client without a certificate: what passes below
    # passes because the services presented theirs.
    refused = redis.Redis.from_url(mtls_redis.url_without_cert, socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        refused.ping()
    refused.close()

    admin = mtls_redis.plain.client()
    with updater_process(mtls_redis.url, "--metrics-port", str(free_port())) as updater, \
            running_api(mtls_redis.url) as api:  # waits for /ready: Redis + subscription
        wait_subscribed(admin, "update")
        with httpx.stream("GET", api.base + "/events", timeout=20) as events:
            lines = events.iter_lines()
            publish_all(admin, "update", [message("over-mtls", values={"v": 1})])
            for line in lines:
                if line.startswith("data: "):
                    event = orjson.loads(line.removeprefix("data: "))
                    break
        assert event["type"] == "over-mtls"
        assert event["values"] == {"v": 1}
        wait_until(partial(admin.exists, "over-mtls"), 10, message="the stored key")
        reply = api.get("/key/over-mtls")
        assert reply.status_code == 200, reply.text
        assert reply.json()["values"] == {"v": 1}
        assert "ERROR" not in updater.log, updater.log
    admin.close()
