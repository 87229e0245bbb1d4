"""KVUpdater: the seed's service (``__init__``, ``persist_data``, ``run``), grown up.

The loop: take every message the subscription has in hand (up to ``batch_max``),
validate them, and commit them as one atomic step while the next batch is being
parsed.  Under light load a batch is a single message and latency is one round
trip; under a burst batches grow by themselves and throughput follows.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from functools import partial
from typing import Any

import redis.asyncio as aioredis

from kv_updater.backoff import Backoff, Outage
from kv_updater.commit import DRAIN_EVERY, SUPERSEDED, UNCHANGED, BatchOutcome, Committer
from kv_updater.logs import RateLimitedLog
from kv_updater.message import Accepted, MessageRules, Rejected, Severity
from kv_updater.metrics import HealthServer, UpdaterMetrics
from kv_updater.resp import url_of
from kv_updater.settings import SettingsError, UpdaterSettings
from kv_updater.subscriber import CONNECTION_ERRORS, Subscription, SubscriptionLost

log = logging.getLogger("kv_updater")

SUMMARY_INTERVAL = 5.0
SHUTDOWN_GRACE = 5.0


class KVUpdater:
    """Subscribes to the update channel and commits every valid message to the KV."""

    def __init__(
        self,
        client: aioredis.Redis | None = None,
        channel: str | None = None,
        validate: bool | None = None,
        *,
        settings: UpdaterSettings | None = None,
    ) -> None:
        overrides: dict[str, Any] = {}
        if channel is not None:
            overrides["channel"] = channel
        if validate is not None:
            overrides["validate"] = validate
        if client is not None and settings is None:
            overrides["redis_url"] = url_of(client)
        base = settings or UpdaterSettings()
        # exclude_unset: a derived stored_channel is derived again from the new channel.
        given = base.model_dump(by_alias=True, exclude_unset=True)
        self.settings = base.model_validate({**given, **overrides})
        s = self.settings
        self.client = client or aioredis.Redis.from_url(
            s.redis_url, socket_timeout=10, socket_connect_timeout=5, client_name="kv-updater"
        )
        self.channel = s.channel
        self.validate = s.validate_writes
        self.rules: MessageRules = s.message_rules()
        self.committer = Committer(
            self.client,
            s.layout,
            s.stored_channel,
            validate=s.validate_writes,
            dead_letter=s.dead_letter,
            dead_letter_maxlen=s.dead_letter_maxlen,
            source_channel=s.channel,
            url=s.redis_url,
        )
        self.metrics = UpdaterMetrics()
        self.ready = False
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._subscription: Subscription | None = None
        self._run_id: str | None = None
        self._carry: tuple[list[Accepted], list[tuple[Rejected, bytes]]] | None = None
        self._rejections = RateLimitedLog(log)
        self._mismatch_log = RateLimitedLog(log, what="validation failures")
        self._summary_at = time.monotonic() + SUMMARY_INTERVAL
        self._summary = [0, 0]  # validated keys, committed messages since the last summary

    # -- the seed's persist_data: one message, parsed and committed --------------
    async def persist_data(self, message: bytes | str) -> BatchOutcome | Rejected:
        """Parse one message and commit it; returns the outcome or the rejection."""
        raw = message.encode() if isinstance(message, str) else message
        accepted, rejected = await self._parse([raw])
        outcome = await self._commit(accepted, rejected)
        return rejected[0][0] if rejected else outcome

    # -- the loop -----------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking messages; what is in hand is committed, then run() returns."""
        if self._stopping:
            return
        self._stopping = True
        log.info("kv-updater: stopping: committing what is in hand")
        if self._subscription is not None:
            _unsubscribe(self._subscription)
        if self._stop_event is not None:
            self._stop_event.set()

    async def run(self) -> None:
        s = self.settings
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        health: HealthServer | None = None
        if s.metrics_port:
            try:
                health = HealthServer(
                    s.metrics_host, s.metrics_port, self.metrics, lambda: self.ready
                )
            except OSError as exc:  # a port in use is a bad setting, not a crash
                raise SettingsError(
                    f"bad setting metrics_port: cannot listen on {s.metrics_host}:"
                    f"{s.metrics_port} ({exc.strerror or exc})"
                ) from None
        log.info("kv-updater: starting with %s", s.redacted())
        if health is not None:
            health.start()
            log.info("kv-updater: /metrics, /live, /ready on port %d", health.port)
        backoff = Backoff()
        outage = Outage(log, "kv-updater")
        try:
            while not self._stopping:
                try:
                    await self._connect()
                    if self._carry is not None:
                        carried, self._carry = self._carry, None
                        await self._commit(*carried)
                except CONNECTION_ERRORS as exc:
                    self._set_ready(False)
                    outage.failed(exc)
                    await self._sleep(backoff.next_delay())
                    continue
                outage.recovered()
                backoff.reset()
                self._set_ready(True)
                log.info(
                    "kv-updater: subscribed to %r, committing to %r", s.channel, s.stored_channel
                )
                try:
                    await self._consume()
                except CONNECTION_ERRORS as exc:
                    self._set_ready(False)
                    self.metrics.reconnects.inc()
                    outage.failed(await self._loss_cause(exc))
                finally:
                    self._close_subscription()
            if self._carry is not None:
                log.error(
                    "kv-updater: %d accepted messages could not be committed before shutdown "
                    "(Redis unavailable)",
                    len(self._carry[0]),
                )
        finally:
            self._set_ready(False)
            self._flush_summaries()
            self._close_subscription()
            if health is not None:
                health.stop()
            self.committer.close()
            with contextlib.suppress(Exception):
                await self.client.aclose()
            log.info("kv-updater: stopped")

    async def _connect(self) -> None:
        self._close_subscription()
        sub = await Subscription.open(self.settings.redis_url, self.channel)
        self._subscription = sub
        if self._stopping:
            _unsubscribe(sub)
        await self.committer.load_script()
        self._run_id = await self._server_run_id()

    async def _server_run_id(self) -> str | None:
        try:
            info = await asyncio.wait_for(self.client.info("server"), 2.0)
        except CONNECTION_ERRORS:
            return None
        return str(info.get("run_id"))

    async def _loss_cause(self, exc: BaseException) -> str:
        """Name why the connection ended: the ERROR line is the operator's first clue."""
        what = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, SubscriptionLost):
            return what
        run_id = await self._server_run_id()
        if run_id is None:
            return f"subscription lost and Redis unreachable ({what})"
        if run_id != self._run_id:
            return f"subscription lost: Redis restarted ({what})"
        return (
            f"subscription lost while Redis kept running ({what}): most likely Redis closed "
            "the subscriber on its client-output-buffer-limit for pubsub (the updater fell "
            "behind a burst), or a CLIENT KILL"
        )

    async def _consume(self) -> None:
        sub = self._subscription
        assert sub is not None
        batch_max = self.settings.batch_max
        in_flight: asyncio.Task[BatchOutcome] | None = None
        try:
            while not sub.unsubscribed:
                payloads = await sub.take(batch_max)
                self.metrics.backlog_bytes.set(sub.backlog_bytes)
                if not payloads:
                    continue
                accepted, rejected = await self._parse(payloads)
                if in_flight is not None:
                    try:
                        await in_flight
                    except CONNECTION_ERRORS:
                        # The failed batch is carried; this one goes with it.
                        self._carry_also(accepted, rejected)
                        raise
                    finally:
                        in_flight = None
                # Commit in the background: the next batch is parsed meanwhile.  But
                # only once its request is out: building it takes turns of the loop
                # (Committer._commit_command), and interleaved with the next parse
                # it would reach Redis later, and Redis would idle meanwhile.
                sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                in_flight = asyncio.create_task(self._commit(accepted, rejected, sent))
                in_flight.add_done_callback(partial(_resolve, sent))  # failed before sending
                await sent
        finally:
            if in_flight is not None:
                await in_flight

    def _carry_also(
        self, accepted: list[Accepted], rejected: list[tuple[Rejected, bytes]]
    ) -> None:
        if self._carry is None:
            self._carry = (accepted, rejected)
        else:
            self._carry[0].extend(accepted)
            self._carry[1].extend(rejected)

    async def _parse(
        self, payloads: list[bytes]
    ) -> tuple[list[Accepted], list[tuple[Rejected, bytes]]]:
        """Validate ``payloads``, handing the event loop a turn every ``DRAIN_EVERY``.

        The subscription's socket is only read between loop turns, and 10,000
        messages of distinct keys take ~100 ms to parse.  A burst published
        meanwhile piled up in Redis's output buffer for the subscriber until, past
        its client-output-buffer-limit (32 MB by default), Redis dropped the
        subscriber and the rest of the burst was lost.  One turn reads whatever the
        socket holds, so the burst waits in our memory instead.
        """
        parse = self.rules.parse
        accepted: list[Accepted] = []
        rejected: list[tuple[Rejected, bytes]] = []
        for start in range(0, len(payloads), DRAIN_EVERY):
            if start:
                await asyncio.sleep(0)
            for raw in payloads[start : start + DRAIN_EVERY]:
                result = parse(raw)
                if type(result) is Accepted:
                    accepted.append(result)
                else:
                    assert isinstance(result, Rejected)
                    rejected.append((result, raw))
        self.metrics.received.inc(len(payloads))
        if rejected:
            self._count_rejections(rejected)
        return accepted, rejected

    def _count_rejections(self, rejected: list[tuple[Rejected, bytes]]) -> None:
        """Count and log rejections: one counter update per reason, logs rate-limited."""
        for reason, n in collections.Counter(r.reason for r, _ in rejected).items():
            self.metrics.rejected.labels(reason).inc(n)
        for rejection, raw in rejected:
            if rejection.severity is Severity.UNDECODABLE:
                self._rejections.log(
                    logging.ERROR,
                    "undecodable message (%s, %d bytes): %s",
                    rejection.reason,
                    len(raw),
                    rejection.detail,
                )
            else:
                self._rejections.log(
                    logging.WARNING,
                    "malformed message (%s): %s",
                    rejection.reason,
                    rejection.detail,
                )

    async def _commit(
        self,
        accepted: list[Accepted],
        rejected: list[tuple[Rejected, bytes]],
        sent: asyncio.Future[None] | None = None,
    ) -> BatchOutcome:
        started = time.perf_counter()
        try:
            outcome = await self.committer.commit(accepted, rejected, sent=sent)
        except CONNECTION_ERRORS:
            # Keep what is in hand: it is committed first after the reconnect.
            # A retried batch is harmless: replays of committed values change nothing.
            self._carry_also(accepted, rejected)
            self._close_subscription()
            raise
        m = self.metrics
        m.commit_seconds.observe(time.perf_counter() - started)
        if accepted:
            m.batch_size.observe(len(accepted))
        # Each Counter.inc takes a lock: at one commit per message (low rates) the
        # zero increments were a measurable share of the commit's own Python time.
        if outcome.committed:
            m.committed.inc(outcome.committed)
        if outcome.stale:
            m.stale.inc(outcome.stale)
        if outcome.unchanged:
            m.unchanged.inc(outcome.unchanged)
        if outcome.superseded:
            m.superseded.inc(outcome.superseded)
        if outcome.dead_lettered:
            m.dead_lettered.inc(outcome.dead_lettered)
        if outcome.mismatches:
            m.validation_failures.inc(len(outcome.mismatches))
            for type_ in outcome.mismatches:
                self._mismatch_log.log(
                    logging.ERROR, "validation failed: key %r does not hold what was written", type_
                )
        if outcome.validated:
            m.validated.inc(outcome.validated)
        if log.isEnabledFor(logging.DEBUG):
            for msg, status in zip(accepted, outcome.statuses, strict=True):
                if status > 0:
                    log.debug("persisted %s (seq %d)", msg.type, status)
                else:
                    what = {UNCHANGED: "unchanged", SUPERSEDED: "superseded"}.get(status, "stale")
                    log.debug("not written (%s): %s", what, msg.type)
        self._summarise(outcome)
        return outcome

    def _summarise(self, outcome: BatchOutcome) -> None:
        self._summary[0] += outcome.validated
        self._summary[1] += outcome.committed
        if time.monotonic() >= self._summary_at:
            self._flush_summaries()

    def _flush_summaries(self) -> None:
        validated, committed = self._summary
        if committed:
            if self.validate:
                log.info(
                    "validation success: %d keys read back right after %d commits "
                    "in the last %.0f s",
                    validated,
                    committed,
                    SUMMARY_INTERVAL,
                )
            else:
                log.info("committed %d messages in the last %.0f s", committed, SUMMARY_INTERVAL)
        self._summary = [0, 0]
        self._summary_at = time.monotonic() + SUMMARY_INTERVAL
        self._rejections.flush()
        self._mismatch_log.flush()

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready else 0)

    def _close_subscription(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    async def _sleep(self, seconds: float) -> None:
        assert self._stop_event is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)


def _unsubscribe(sub: Subscription) -> None:
    """Ask Redis to stop sending; everything before its confirmation is committed.

    Redis may never confirm (a hung server, a silent network), so a waiting take()
    gives up on the confirmation after the shutdown grace.
    """
    sub.unsubscribe()
    with contextlib.suppress(RuntimeError):  # no running loop: run() is not running
        asyncio.get_running_loop().call_later(SHUTDOWN_GRACE, sub.abandon)


def _resolve(future: asyncio.Future[None], _: object = None) -> None:
    if not future.done():
        future.set_result(None)
