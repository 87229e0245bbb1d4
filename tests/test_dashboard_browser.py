"""The dashboard in a real Chromium, against the real chain (Redis, kv_updater, api_server).

Debian's chromium is driven through Playwright's ``executable_path``: nothing is
ever downloaded.  Each test publishes on the update channel like an upstream
would, so what the page shows went through kv_updater's commit and
api_server's SSE stream.  A screenshot of the running dashboard is kept in
``test-artifacts/dashboard.png`` (with ``-dark`` and ``-phone`` variants).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from harness import ROOT, Service, free_port, wait_until
from updater_fixtures import wait_subscribed

from demo_publisher.publisher import rfc3339

playwright_sync = pytest.importorskip("playwright.sync_api")
Browser = playwright_sync.Browser
Page = playwright_sync.Page

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with playwright_sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900}, locale="en-US")
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    # No CDN, no web font, nothing from elsewhere: the page must work offline.
    foreign: list[str] = []
    pg.on("request", lambda req: None if req.url.startswith(("http://127.0.0.1:", "data:"))
          else foreign.append(req.url))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not foreign, f"requests that leave the machine: {foreign}"


class Chain:
    """kv_updater and api_server as real processes on one Redis; the API can restart."""

    def __init__(self, redis_url: str, token: str = "") -> None:
        self.redis_url = redis_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.updater = Service("kv_updater", ["--redis-url", redis_url]).start()
        self.api: Service | None = None
        self.start_api()
        # The updater is ready once it listens on the channel.
        client = redis.Redis.from_url(redis_url)
        wait_subscribed(client, "update", timeout=20)
        client.close()

    def start_api(self) -> None:
        args = ["--redis-url", self.redis_url, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.token:
            args += ["--api-token", self.token]
        self.api = Service("api_server", args).start()
        wait_until(self._ready, 20, message="api_server /ready")

    def _ready(self) -> bool:
        if self.api is not None and self.api.proc is not None and self.api.proc.poll() is not None:
            raise AssertionError(f"api_server exited:\n{self.api.log}")
        try:
            return httpx.get(f"{self.base}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill_api(self) -> None:
        """A crash, not a shutdown: the page sees its stream cut."""
        assert self.api is not None
        self.api.signal(signal.SIGKILL)
        self.api.wait(10)

    def stored(self, type_: str, contains: str = "") -> bool:
        params = {"token": self.token} if self.token else {}
        resp = httpx.get(f"{self.base}/keys/{type_}", params=params, timeout=2)
        return resp.status_code == 200 and contains in resp.text

    def url(self, query: str = "") -> str:
        return f"{self.base}/{query}"

    def close(self) -> None:
        for svc in (self.api, self.updater):
            if svc is not None:
                svc.stop()


@pytest.fixture
def chain(redis_url: str) -> Iterator[Chain]:
    c = Chain(redis_url)
    yield c
    c.close()


def publish(r: redis.Redis, type_: str, values: dict[str, Any],
            valid_in: float | None = 60.0) -> None:
    now = datetime.now(UTC)
    msg: dict[str, Any] = {"type": type_, "updated": rfc3339(now), "values": values}
    if valid_in is not None:
        msg["valid"] = rfc3339(now + timedelta(seconds=valid_in))
    r.publish("update", orjson.dumps(msg))


def card(page: Any, type_: str) -> Any:
    return page.locator(f'article.card[data-type="{type_}"]')


def wait_conn(page: Any, state: str, timeout_ms: float = 10_000) -> None:
    page.wait_for_selector(f'#conn[data-state="{state}"]', timeout=timeout_ms)


def wait_text(page: Any, type_: str, text: str, timeout_ms: float) -> None:
    page.wait_for_function(
        """([t, text]) => {
            const el = document.querySelector(`article.card[data-type="${t}"] .values`);
            return el !== null && el.textContent.includes(text);
        }""",
        arg=[type_, text],
        timeout=timeout_ms,
    )


def test_snapshot_then_a_new_publish_within_a_second(
    chain: Chain, r: redis.Redis, page: Any
) -> None:
    publish(r, "weather:lisbon", {"city": "Lisbon", "temperature_c": 18.5, "conditions": "clear"})
    publish(r, "sensor:boiler-9", {"temperature_c": 71.2, "burner": True, "status": "ok"})
    publish(r, "plain", {"note": "no colon in this type"}, valid_in=None)
    wait_until(lambda: chain.stored("plain") and chain.stored("sensor:boiler-9"), 10,
               message="the snapshot keys stored")

    page.goto(chain.url())
    wait_conn(page, "live")
    for type_ in ("weather:lisbon", "sensor:boiler-9", "plain"):
        card(page, type_).wait_for(timeout=5000)
    lisbon = card(page, "weather:lisbon")
    assert "Lisbon" in lisbon.inner_text()
    assert "18.5" in lisbon.inner_text()
    assert card(page, "plain").get_attribute("data-expired") == "false"
    assert page.locator("#stat-keys").inner_text() == "3"

    # A new value of a known key, then a new key: each on screen within a second.
    started = time.monotonic()
    publish(r, "weather:lisbon",
            {"city": "Lisbon", "temperature_c": 19.25, "conditions": "marker-1"})
    wait_text(page, "weather:lisbon", "marker-1", 3000)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    publish(r, "air:lisbon", {"aqi": 21, "category": "marker-2"})
    wait_text(page, "air:lisbon", "marker-2", 3000)
    assert time.monotonic() - started < 1.0
    assert page.locator("#stat-keys").inner_text() == "4"
    # Sorted in place: air:lisbon comes first.
    assert page.locator("article.card").first.get_attribute("data-type") == "air:lisbon"

    # The filter box narrows the cards; ?keys= narrows the stream itself.
    page.fill("#filter", "lisbon")
    assert page.locator("article.card:not([hidden])").count() == 2
    page.fill("#filter", "nothing-like-this")
    assert "No key matches" in page.locator("#empty").inner_text()
    page.goto(chain.url("?keys=plain,sensor:boiler-9"))
    card(page, "sensor:boiler-9").wait_for(timeout=5000)
    card(page, "plain").wait_for(timeout=5000)
    publish(r, "weather:lisbon", {"city": "Lisbon", "conditions": "filtered out"})
    publish(r, "plain", {"note": "marker-3"}, valid_in=None)
    wait_text(page, "plain", "marker-3", 3000)
    assert page.locator("article.card").count() == 2


def events_seen(page: Any) -> int:
    return int(page.evaluate("Number(document.body.dataset.events || 0)"))


def test_page_recovers_after_api_server_restart(chain: Chain, r: redis.Redis, page: Any) -> None:
    publish(r, "sensor:pump-1", {"speed_rpm": 1450, "phase": "before"})
    publish(r, "sensor:quiet", {"value": 1})  # never changes again
    wait_until(lambda: chain.stored("sensor:quiet"), 10, message="first values stored")
    page.goto(chain.url())
    wait_conn(page, "live")
    wait_text(page, "sensor:pump-1", "before", 5000)
    card(page, "sensor:quiet").wait_for(timeout=5000)
    before = events_seen(page)
    assert before == 2

    chain.kill_api()
    wait_conn(page, "reconnecting")
    # Committed while the API is down: the page gets it on resume (Last-Event-ID).
    publish(r, "sensor:pump-1", {"speed_rpm": 1460, "phase": "during"})
    wait_until(lambda: b"during" in bytes(r.get("sensor:pump-1") or b""), 10,  # type: ignore[arg-type]
               message="value committed during the outage")
    chain.start_api()
    wait_conn(page, "live", 15_000)
    wait_text(page, "sensor:pump-1", "during", 5000)

    publish(r, "sensor:pump-1", {"speed_rpm": 1470, "phase": "after"})
    wait_text(page, "sensor:pump-1", "after", 3000)
    # Resumed, not restarted: the unchanged key was not sent again, only the two
    # commits of sensor:pump-1 arrived.
    assert events_seen(page) == before + 2


def test_expired_value_is_marked_by_the_clock(chain: Chain, r: redis.Redis, page: Any) -> None:
    publish(r, "moon", {"phase": "full moon"}, valid_in=-5)  # expired on arrival
    publish(r, "soon", {"value": 1}, valid_in=2.5)
    publish(r, "later", {"value": 2}, valid_in=3600)
    publish(r, "forever", {"value": 3}, valid_in=None)
    wait_until(lambda: chain.stored("forever") and chain.stored("soon"), 10,
               message="values stored")
    published = time.monotonic()
    page.goto(chain.url())
    wait_conn(page, "live")
    card(page, "forever").wait_for(timeout=5000)

    assert card(page, "moon").get_attribute("data-expired") == "true"
    assert "expired" in card(page, "moon").locator(".state").inner_text()
    if time.monotonic() - published < 2.0:
        assert card(page, "soon").get_attribute("data-expired") == "false"
    # No event arrives for "soon": the page's own clock must flip it.
    page.wait_for_selector('article.card.expired[data-type="soon"]', timeout=6000)
    assert "expired" in card(page, "soon").locator(".valid").inner_text()
    assert card(page, "later").get_attribute("data-expired") == "false"
    assert card(page, "forever").get_attribute("data-expired") == "false"
    assert "no expiry" in card(page, "forever").inner_text()
    assert page.locator("#stat-expired").inner_text() == "2"

    # A fresh value brings the card back.
    publish(r, "soon", {"value": 4}, valid_in=60)
    page.wait_for_selector('article.card[data-type="soon"][data-expired="false"]', timeout=3000)


def test_api_token_is_passed_on(redis_url: str, r: redis.Redis, page: Any) -> None:
    chain = Chain(redis_url, token="s3cret-token")
    try:
        publish(r, "secured", {"value": 42})
        wait_until(lambda: chain.stored("secured"), 10, message="value stored")
        page.goto(chain.url("?token=s3cret-token"))
        wait_conn(page, "live")
        card(page, "secured").wait_for(timeout=5000)
        # The page's own assets loaded with the token: the stylesheet applies.
        display = page.eval_on_selector(".cards", "el => getComputedStyle(el).display")
        assert display == "grid"
        href = card(page, "secured").locator("a.name").get_attribute("href")
        assert href is not None
        assert "token=s3cret-token" in href

        # The server comes back with another token: the page says so instead of spinning.
        chain.kill_api()
        chain.token = "another-token"
        chain.start_api()
        wait_conn(page, "unauthorized", 15_000)
        assert "token refused" in page.locator("#conn").inner_text()
    finally:
        chain.close()


def test_screenshot_of_the_running_demo(chain: Chain, page: Any) -> None:
    """The real demo feeds through the chain, captured for humans to look at."""
    with Service("demo_publisher", ["--redis-url", chain.redis_url, "--rate", "40",
                                    "--keys", "16", "--seed", "7"]) as publisher:

        def all_keys() -> bool:
            resp = httpx.get(f"{chain.base}/keys", timeout=2)
            return resp.status_code == 200 and len(resp.json()["keys"]) >= 16

        wait_until(all_keys, 15, message="16 demo keys stored")
        page.goto(chain.url())
        wait_conn(page, "live")
        wait_until(lambda: page.locator("article.card").count() >= 16, 10,
                   message="16 cards")
        assert page.locator("article.card.expired").count() == 0
        # Live figures in the header once the page's clock has ticked.
        wait_until(lambda: page.locator("#stat-rate").inner_text() not in ("0", ""), 5,
                   message="an update rate in the header")
        assert page.locator("#stat-seq").inner_text().isdigit()
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / "dashboard.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000
        # The dark scheme and a phone, for people reviewing the look.
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=str(ARTIFACTS / "dashboard-dark.png"))
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"))
        publisher.signal(signal.SIGTERM)
        assert publisher.wait(10) == 0
