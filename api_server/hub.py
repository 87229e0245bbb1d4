"""The hub: ONE pub/sub subscription per process, fanned out to every SSE client.

Each commit notification is parsed (type and seq) and framed for SSE once, then
offered to the clients that want it - a dict insertion per client, no copy and no
task per message.  Messages that Redis delivered together are handled in one go,
before any client runs, so a client woken once writes every commit it got.

Redis down or restarted: the subscription is reopened with capped, jittered
backoff (one ERROR per outage, one INFO when back), readiness is false meanwhile,
and on every (re)subscription each client is marked to re-read "since the last id
it received" - the commits published while nobody listened are caught up that way.
If the commit sequence went backwards (Redis lost its data), the streams are
closed instead: an EventSource reconnects with its Last-Event-ID, which is then
ahead of the store and gets a full snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator

import orjson
from redis.exceptions import RedisError

from api_server.events import Event, frame, parse_notification
from api_server.store import Store
from api_server.stream import KEEPALIVE, Client
from kv_updater.backoff import Backoff, Outage
from kv_updater.logs import RateLimitedLog
from kv_updater.message import MessageRules, render_event
from kv_updater.subscriber import CONNECTION_ERRORS, Subscription

log = logging.getLogger("api_server.hub")

TAKE_MAX = 2_000
RETRY_FIELD = b"retry: 1000\n\n"
"""First bytes of a stream: EventSource reconnects after 1 s instead of ~3 s."""


class Hub:
    def __init__(
        self,
        store: Store,
        rules: MessageRules,
        redis_url: str,
        channel: str,
        *,
        max_clients: int = 10_000,
        keepalive: float = 15.0,
        flush_interval: float = 0.0,
        stall_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self.redis_url = redis_url
        self.channel = channel
        self.max_clients = max_clients
        self.keepalive = keepalive
        self.flush_interval = flush_interval
        self.stall_timeout = stall_timeout
        self._dirty: list[Client] = []
        self._shared: dict[str, Event] = {}
        """Commits since the last flush for the unfiltered clients: newest per key,
        in seq order (a newer commit of a key replaces it and moves to the end)."""
        self._shared_replaced = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self.rules = rules
        self.clients: set[Client] = set()
        """Every registered client; ``unfiltered`` and ``by_type`` route commits to them."""
        self.unfiltered: set[Client] = set()
        self.by_type: dict[str, set[Client]] = {}
        self.subscribed = False
        self.generation = 0
        self.last_seq = 0
        self.outage = Outage(log, "api subscription")
        self._stall_log = RateLimitedLog(log, what="stalled-stream closes")
        self._stopping = False
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Counters read at scrape time (plain ints: they are bumped per client per event).
        self.events_sent = 0
        self.events_pushed = 0
        """Of those, written by the hub straight to the socket (Client.push)."""
        self.flushes = 0
        self.snapshot_events = 0
        self.conflated = 0
        self.messages = 0
        self.ignored = 0
        self.resyncs = 0
        self.streams_closed_on_reset = 0
        self.streams_closed_stalled = 0

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="hub-subscription"),
            asyncio.create_task(self._keepalive(), name="hub-keepalive"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.subscribed = False
        if self._sub is not None:
            self._sub.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.close_all()

    def close_all(self) -> None:
        """Server shutdown: refuse new streams and end every open one cleanly."""
        self._stopping = True
        for client in list(self.clients):
            client.closed = True
            client.wake()

    @property
    def count(self) -> int:
        return len(self.clients)

    @property
    def reconnects(self) -> int:
        """Subscriptions re-opened after the first one."""
        return max(self.generation - 1, 0)

    # ---- clients ---------------------------------------------------------------
    def register(self, client: Client) -> bool:
        """Add a client before it reads its snapshot; False at the client limit."""
        if len(self.clients) >= self.max_clients or self._stopping:
            return False
        self.clients.add(client)
        if client.types is None:
            self.unfiltered.add(client)
        else:
            for name in client.types:
                self.by_type.setdefault(name, set()).add(client)
        return True

    def unregister(self, client: Client) -> None:
        """Idempotent: the generator's finally and the response's background both call it."""
        if client not in self.clients:
            return
        self.clients.discard(client)
        client.closed = True
        if client.types is None:
            self.unfiltered.discard(client)
        else:
            for name in client.types:
                group = self.by_type.get(name)
                if group is not None:
                    group.discard(client)
                    if not group:
                        del self.by_type[name]
        client.pending.clear()
        client.wake()

    def pending_values(self) -> int:
        return sum(len(c.pending) for c in self.clients)

    # ---- the stream of one client ------------------------------------------------
    async def stream(self, client: Client) -> AsyncGenerator[bytes, None]:
        """The SSE body of a registered client: retry field, snapshot, then live."""
        try:
            yield RETRY_FIELD
            while not client.closed:
                if client.needs_snapshot:
                    if self.subscribed:
                        chunk = await self._read_snapshot(client)
                        if chunk:
                            yield chunk
                        continue
                    # Otherwise wait: the hub wakes every client once subscribed.
                    # Pending commits wait too - the read since the last id
                    # delivered must come first, or what the hub missed is lost.
                elif client.pending:
                    chunk, n = client.take()
                    self.events_sent += n
                    yield chunk
                    continue
                if client.ping_due:
                    client.ping_due = False
                    yield KEEPALIVE
                    continue
                await client.wait()
        finally:
            self.unregister(client)

    async def _read_snapshot(self, client: Client) -> bytes:
        client.needs_snapshot = False  # a resubscription during the read sets it again
        since = max(client.last_id, client.floor, 0)
        try:
            snap = await self.store.snapshot(since, client.types)
            if snap.seq < since:
                if client.floor >= 0:
                    # A live stream whose store went back (Redis lost its data):
                    # end it; the EventSource comes back with its Last-Event-ID.
                    self.streams_closed_on_reset += 1
                    client.closed = True
                    return b""
                # A new client resuming from an id the store never reached: all of it.
                client.last_id = since = 0
                snap = await self.store.snapshot(0, client.types)
        except RedisError as exc:
            # Redis is likely going away; the hub will notice and wake everyone when
            # it is back.  Until then retry now and then, not in a tight loop.
            log.debug("snapshot read failed (%s); retrying", exc)
            client.needs_snapshot = True
            await asyncio.sleep(0.2 + random.random() * 0.3)
            return b""
        client.drop_covered(snap.seq)
        if not snap.values:
            return b""
        type_json = self.rules.type_json
        parts = [
            # A type the updater indexed but this server's rules refuse (a stricter
            # TYPE_PATTERN here) is still sent, spelled directly.
            frame(s.seq, render_event(type_json(s.type) or orjson.dumps(s.type), s.value, s.seq))
            for s in snap.values
        ]
        client.last_id = snap.values[-1].seq  # all > since >= the previous last id
        self.snapshot_events += len(parts)
        self.events_sent += len(parts)
        return b"".join(parts)

    # ---- the subscription ------------------------------------------------------------
    async def _run(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while not self._stopping:
            try:
                sub = await Subscription.open(
                    self.redis_url, self.channel, client_name="api-server", connect_timeout=5.0
                )
            except Exception as exc:  # a bug must not end the subscription for good either
                if not isinstance(exc, CONNECTION_ERRORS):
                    log.exception("subscribing failed unexpectedly")
                self.outage.failed(exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            self._sub = sub
            self.generation += 1
            self.last_seq = 0
            self.subscribed = True
            backoff.reset()
            self.outage.recovered()
            self._resync_all()
            try:
                await self._pump(sub)
            except CONNECTION_ERRORS as exc:
                if not self._stopping:
                    self.outage.failed(exc)
            except Exception as exc:
                log.exception("commit subscription failed unexpectedly")
                self.outage.failed(exc)
                await asyncio.sleep(backoff.next_delay())
            finally:
                self.subscribed = False
                self._sub = None
                sub.close()

    async def _pump(self, sub: Subscription) -> None:
        # A quiet channel is checked by the subscription itself: PING after 10 s of
        # silence, lost without a PONG 5 s later (kv_updater.subscriber).
        while not self._stopping:
            self.dispatch(await sub.take(TAKE_MAX))

    def dispatch(self, batch: list[bytes]) -> None:
        """Fan a batch of commit notifications out to the clients, in order."""
        conflated = 0
        unfiltered = self.unfiltered
        by_type = self.by_type
        dirty = self._dirty
        shared = self._shared
        for payload in batch:
            parsed = parse_notification(payload)
            if parsed is None:
                self.ignored += 1
                continue
            type_, seq = parsed
            if seq <= self.last_seq:
                log.warning(
                    "commit sequence went back (%d after %d): re-reading every stream",
                    seq, self.last_seq,
                )
                self._resync_all()
            self.last_seq = seq
            group = by_type.get(type_)
            if not (unfiltered or group):
                continue  # nobody follows this key: not even framed
            event = Event(type_, seq, frame(seq, payload))
            if unfiltered:
                # Offered to the unfiltered clients at the flush (see _flush).
                if shared.pop(type_, None) is not None:
                    self._shared_replaced += 1
                shared[type_] = event
            if group:
                for client in group:
                    conflated += client.offer(event, dirty)
        self.messages += len(batch)
        self.conflated += conflated
        if (dirty or shared) and self._flush_handle is None:
            loop = asyncio.get_running_loop()
            delay = self._last_flush + self.flush_interval - loop.time()
            if delay <= 0:
                self._flush()
            else:
                self._flush_handle = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        """Send the clients their new commits: written here straight to the socket
        of each live client (``Client.push``), or by the client's own task when it
        is busy (a snapshot read, a paused transport).  At most one flush per
        ``flush_interval``: under load each client then gets several commits in one
        system call - the per-write cost bounds the fan-out - while a quiet stream
        is still written at once."""
        self._flush_handle = None
        self._last_flush = asyncio.get_running_loop().time()
        self.flushes += 1
        pushed = self._flush_shared() if self._shared else 0
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            client.dirty = False
            if client.can_push():
                pushed += client.push()
            else:
                client.wake()
        self.events_sent += pushed
        self.events_pushed += pushed

    def _flush_shared(self) -> int:
        """The commits since the last flush, to every unfiltered client.

        They all want the same commits, so a client that is keeping up - nothing
        pending, parked, past its snapshot - gets one shared, already joined and
        framed chunk: per client a check and a ``write``, no per-event dict work.
        Any other client is offered the commits one by one (``Client.offer``: its
        pending dict, conflation, the snapshot floor) and goes through the dirty
        list like a filtered one.  Offering at the flush instead of at arrival is
        the same thing when ``sse_flush_ms`` is 0 (the flush runs right after the
        dispatch); with a longer interval a client whose snapshot completed in
        between drops the commits its snapshot holds by its floor, as always."""
        shared, self._shared = self._shared, {}
        replaced, self._shared_replaced = self._shared_replaced, 0
        events = list(shared.values())
        first = events[0].seq
        # One event: join hands back that same frame object, so the writer's framing
        # cache still recognises it.
        chunk = b"".join([e.frame for e in events])
        last = events[-1].seq
        count = len(events)
        dirty = self._dirty
        pushed = 0
        # A commit replaced inside the window is one conflated value for each client.
        conflated = replaced * len(self.unfiltered)
        for client in self.unfiltered:
            if not client.pending and client.floor < first and client.can_push():
                writer = client.writer
                assert writer is not None
                writer.write(chunk)
                client.last_id = last
                pushed += count
            else:
                for event in events:
                    conflated += client.offer(event, dirty)
        self.conflated += conflated
        return pushed

    def _stalled(self, client: Client, now: float) -> bool:
        """End a stream whose client has taken no bytes for ``stall_timeout`` s.

        Its pending values are bounded (one per key), but its connection and its
        place under ``max_sse_clients`` are not: a client that stopped reading - a
        frozen tab, a peer gone without a FIN, someone holding slots on purpose -
        would keep them for good.  A live EventSource that was only slow
        reconnects and resumes from its Last-Event-ID.  Checked on the keep-alive
        tick, so the cut comes within one ``keepalive_seconds`` after the timeout.
        Needs the direct writer (it sees the transport's flow control)."""
        writer = client.writer
        if writer is None or client.closed or writer.writable():
            client.stalled_since = 0.0
            return False
        # Paused is not stalled: a slow reader behind a busy feed is paused most of
        # the time.  While paused nothing is added to the buffer, so a buffer that
        # did not shrink means the client took nothing.
        buffered = writer.buffered()
        if not client.stalled_since or buffered != client.stalled_bytes:
            client.stalled_since = now
            client.stalled_bytes = buffered
            return False
        if not self.stall_timeout or now - client.stalled_since < self.stall_timeout:
            return False
        self.streams_closed_stalled += 1
        self._stall_log.log(
            logging.WARNING,
            "closed an SSE stream whose client took no bytes for %.0f s",
            now - client.stalled_since,
        )
        client.closed = True
        writer.abort()
        client.wake()
        return True

    def _resync_all(self) -> None:
        for client in list(self.clients):
            client.needs_snapshot = True
            client.wake()
        self.resyncs += 1

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.keepalive)
            now = loop.time()
            for client in list(self.clients):
                if self._stalled(client, now):
                    continue
                if client.can_push():
                    assert client.writer is not None
                    client.writer.write(KEEPALIVE)
                else:
                    client.ping_due = True
                    client.wake()
