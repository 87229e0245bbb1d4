"""Publishing the feeds at a steady rate.

Pacing works on an absolute schedule: message ``k`` is due at ``start + k / rate``.
Each tick sends every message that is due in one pipelined round trip, then
sleeps until the next one is due, but at least ``MIN_TICK`` so that high rates
become batches (10 000 msg/s is 100 messages every 10 ms, not 10 000 wake-ups).
Sleeping late only makes the next batch bigger, so the long-run rate is exact at
any speed.  When the publisher falls more than ``MAX_LAG`` behind (Redis was
down, the machine is saturated), the schedule restarts from now instead of
bursting the backlog: the rate stays the rate the user asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from redis.exceptions import RedisError

from demo_publisher.feeds import Feed, catalog
from demo_publisher.settings import PublisherSettings
from kv_updater.backoff import Backoff, Outage
from kv_updater.resp import RespLink

log = logging.getLogger("demo_publisher")

MIN_TICK = 0.01
MAX_LAG = 1.0
BATCH_TIMEOUT = 10.0


def _resp_head(channel: str) -> bytes:
    """The RESP encoding of ``PUBLISH <channel>``, to which each payload is appended."""
    ch = channel.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(ch), ch)


def rfc3339(t: datetime) -> str:
    """UTC with milliseconds and Z: ``2023-10-01T12:00:00.123Z``."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass
class Stats:
    sent: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    subscribers: int | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Publisher:
    def __init__(self, settings: PublisherSettings, feeds: list[Feed] | None = None) -> None:
        self.settings = settings
        self.feeds = feeds if feeds is not None else catalog(settings.keys, settings.seed)
        self.stats = Stats()
        self._stop = asyncio.Event()
        self._publish_head = _resp_head(settings.channel)
        self._next_feed = 0
        rate = settings.rate
        # A value stays valid for its feed's horizon, and at least three update
        # intervals of its key: at a slow rate the cards would otherwise expire
        # between two updates, while they should expire only when the data stops.
        interval = len(self.feeds) / rate if rate > 0 else 0.0
        self._horizons = {f.type: max(f.horizon_s, 3 * interval) for f in self.feeds}

    def stop(self) -> None:
        self._stop.set()

    def build(self, n: int, now: datetime | None = None) -> list[bytes]:
        """The next ``n`` messages, round-robin over the feeds, all stamped ``now``."""
        now = now or datetime.now(UTC)
        updated = rfc3339(now)
        valid_at: dict[float, str] = {}
        out: list[bytes] = []
        feeds = self.feeds
        for _ in range(n):
            feed = feeds[self._next_feed]
            self._next_feed = (self._next_feed + 1) % len(feeds)
            horizon = self._horizons[feed.type]
            valid = valid_at.get(horizon)
            if valid is None:
                valid = valid_at[horizon] = rfc3339(now + timedelta(seconds=horizon))
            out.append(
                orjson.dumps(
                    {"type": feed.type, "updated": updated, "valid": valid,
                     "values": feed.values(now)}
                )
            )
        return out

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on stop."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def run(self) -> Stats:
        s = self.settings
        # One timeout per batch (the link's), not one per reply.
        link = RespLink(
            s.redis_url, client_name="demo-publisher", timeout=BATCH_TIMEOUT, connect_timeout=5
        )
        outage = Outage(log, "demo-publisher")
        backoff = Backoff(base=0.1, cap=5.0)
        loop = asyncio.get_running_loop()
        stats = self.stats = Stats()
        rate = s.rate
        start = loop.time()
        base = 0  # messages sent before `start`, for the schedule after a reset
        last_report = start
        sent_at_report = 0
        log.info(
            "publishing %d keys at %s on channel %r",
            len(self.feeds), f"{rate:g} msg/s" if rate > 0 else "full speed", s.channel,
        )
        try:
            while not self._stop.is_set():
                now = loop.time()
                if s.duration and stats.elapsed >= s.duration:
                    break
                if rate > 0:
                    due = int((now - start) * rate) + 1 - (stats.sent - base)
                    if due > rate * MAX_LAG + 1:
                        start, base = now, stats.sent
                        due = 1
                else:
                    due = s.batch_max
                due = min(due, s.batch_max)
                if s.count:
                    due = min(due, s.count - stats.sent)
                if due > 0:
                    batch = self.build(due)
                    try:
                        receivers = await self._publish(link, batch)
                    except (RedisError, OSError, TimeoutError) as exc:
                        stats.failed += len(batch)
                        outage.failed(exc)
                        await self._sleep(backoff.next_delay())
                        # Restart the schedule: no burst of make-up messages after an outage.
                        start, base = loop.time(), stats.sent
                        continue
                    outage.recovered()
                    backoff.reset()
                    stats.sent += len(batch)
                    self._note_subscribers(receivers)
                if s.count and stats.sent >= s.count:
                    break
                now = loop.time()
                if now - last_report >= s.progress_interval:
                    self._progress(stats, (stats.sent - sent_at_report) / (now - last_report))
                    last_report, sent_at_report = now, stats.sent
                if rate > 0:
                    next_due = start + (stats.sent - base) / rate
                    delay = max(next_due - now, MIN_TICK)
                    if s.duration:
                        delay = min(delay, max(0.0, s.duration - stats.elapsed))
                    await self._sleep(delay)
                else:
                    await asyncio.sleep(0)
        finally:
            link.close()
        elapsed = stats.elapsed
        log.info(
            "stopped: sent %d messages in %.1f s (%.1f msg/s)%s",
            stats.sent, elapsed, stats.sent / elapsed if elapsed > 0 else 0.0,
            f", {stats.failed} failed" if stats.failed else "",
        )
        return stats

    async def _publish(self, link: RespLink, batch: list[bytes]) -> int:
        """PUBLISH every payload in one write, pipelined; the last reply's receiver count.

        Packed by hand and sent on a ``RespLink``: redis-py's pipeline spends more
        time encoding commands and arming reply timers than the feeds spend
        computing the values (the same reason kv_updater's commit goes below it).
        The first error reply is raised, failing the batch.
        """
        head = self._publish_head
        data = b"".join([b"%s$%d\r\n%s\r\n" % (head, len(p), p) for p in batch])
        replies = await link.request(data, len(batch))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return int(replies[-1])

    def _note_subscribers(self, receivers: int) -> None:
        before = self.stats.subscribers
        self.stats.subscribers = receivers
        if receivers == 0 and before != 0:
            log.warning(
                "nobody subscribes to channel %r: messages are dropped until kv_updater runs",
                self.settings.channel,
            )
        elif receivers > 0 and before == 0:
            log.info("channel %r has %d subscriber(s) again", self.settings.channel, receivers)

    def _progress(self, stats: Stats, recent_rate: float) -> None:
        target = f"{self.settings.rate:g}" if self.settings.rate > 0 else "max"
        log.info(
            "sent %d messages, %.1f msg/s (target %s), %s subscriber(s)%s",
            stats.sent, recent_rate, target,
            "?" if stats.subscribers is None else stats.subscribers,
            f", {stats.failed} failed" if stats.failed else "",
        )
