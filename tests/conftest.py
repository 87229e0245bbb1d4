"""Fixtures: a real Redis for every test (see harness.py for the backends)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from harness import RedisServer, chosen_backend, dispose, make_redis

BACKEND = chosen_backend()


def pytest_report_header(config: pytest.Config) -> str:
    import os

    image = os.environ.get("REDIS_IMAGE", "redis:7-alpine")
    detail = f" (image {image})" if BACKEND == "testcontainers" else ""
    return f"redis backend: {BACKEND}{detail}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session; tests get it flushed through ``redis_url``."""
    server = make_redis(BACKEND)
    yield server
    dispose(server)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, for tests that stop or restart it."""
    if BACKEND == "external":
        pytest.skip("an external TEST_REDIS_URL cannot be restarted")
    server = make_redis(BACKEND)
    yield server
    dispose(server)
