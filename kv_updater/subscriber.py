"""The updater's pub/sub subscription: a raw RESP connection, read in batches.

Why not redis-py's ``PubSub``: its convenience API handles one message per call
(a coroutine, a timeout context and a dict per message), which costs more than
everything else the updater does per message and caps it far below 100k
messages/s.  Here an asyncio ``Protocol`` appends whatever the socket delivers
to a queue of chunks the moment it arrives - so Redis's output buffer for us is
drained even while a commit is in flight and the subscriber is never dropped for
an output-buffer overrun - and ``take()`` parses many messages per call with
hiredis.  Connection details (URL forms, ACL user and password, TLS) come from
redis-py's own ``parse_url`` (kv_updater.resp).

hiredis compacts its buffer on every reply once 1 KiB is consumed (a memmove of
what is left), so feeding it a large backlog at once is quadratic; chunks are fed
in small pieces instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, cast

import hiredis
from redis.exceptions import RedisError

from kv_updater.resp import connect, handshake

FEED_PIECE = 16_384
IDLE_PING = 10.0
"""Seconds without a byte from Redis before the subscription asks for a PONG."""
PING_DEADLINE = 5.0
"""Seconds the PONG may take: past that, Redis hung or the network went silent."""


class SubscriptionLost(ConnectionError):
    """The connection to Redis ended (restart, network, or an output-buffer limit)."""


CONNECTION_ERRORS = (OSError, RedisError, SubscriptionLost, asyncio.TimeoutError)
"""What "Redis is not reachable right now" looks like to the services: retry, don't crash."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.wakeup = asyncio.Event()
        self.lost: BaseException | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        self.wakeup.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or SubscriptionLost("connection closed by Redis")
        self.wakeup.set()


class Subscription:
    """One channel subscription on a connection of its own."""

    def __init__(self, proto: _Protocol, reader: Any, channel: str) -> None:
        self._proto = proto
        self._reader = reader
        self._channel = channel.encode()
        self._piece: tuple[bytes, int] | None = None
        self._ping_sent = False
        self.unsubscribed = False

    @classmethod
    async def open(
        cls,
        url: str,
        channel: str,
        *,
        client_name: str = "kv-updater",
        connect_timeout: float = 5.0,
    ) -> Subscription:
        _, proto, kwargs = await connect(url, _Protocol, connect_timeout)
        sub = cls(proto, hiredis.Reader(), channel)
        try:
            for command in handshake(kwargs, client_name, select_db=False):
                await asyncio.wait_for(sub._call(*command), connect_timeout)
            reply = await asyncio.wait_for(sub._call("SUBSCRIBE", channel), connect_timeout)
            if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
                raise SubscriptionLost(f"unexpected reply to SUBSCRIBE: {reply!r}")
        except BaseException:
            sub.close()
            raise
        return sub

    def _send(self, *args: str) -> None:
        transport = self._proto.transport
        # The peer may have hung up already (a proxy in front of a Redis still starting):
        # writing to a closed uvloop transport raises RuntimeError, not a connection error.
        if transport is None or self._proto.lost is not None or transport.is_closing():
            raise SubscriptionLost(f"connection closed before {args[0]}")
        transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]

    async def _call(self, *args: str) -> Any:
        self._send(*args)
        while True:
            reply = self._next_reply()
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise SubscriptionLost(f"{args[0]} failed: {reply}")
                return reply
            await self._wait()

    def _next_reply(self) -> Any:
        """The next complete reply, or False when more bytes are needed."""
        reader = self._reader
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:  # e.g. another server on the port
                raise SubscriptionLost(f"not a Redis reply ({exc})") from None
            if reply is not False:
                return reply
            if not self._feed():
                return False

    def _feed(self) -> bool:
        piece = self._piece
        if piece is None:
            chunks = self._proto.chunks
            if not chunks:
                return False
            piece = (chunks.popleft(), 0)
        data, offset = piece
        size = min(FEED_PIECE, len(data) - offset)
        self._reader.feed(data, offset, size)
        self._proto.buffered -= size
        offset += size
        self._piece = (data, offset) if offset < len(data) else None
        return True

    async def _wait(self) -> None:
        proto = self._proto
        if proto.lost is not None and not proto.chunks and self._piece is None:
            raise SubscriptionLost(str(proto.lost)) from proto.lost
        proto.wakeup.clear()
        if proto.chunks or self._piece is not None:
            return
        await proto.wakeup.wait()

    @property
    def backlog_bytes(self) -> int:
        """Bytes received and not yet parsed."""
        return self._proto.buffered

    async def take(self, limit: int) -> list[bytes]:
        """Wait for at least one message, return up to ``limit`` payloads in hand.

        Raises SubscriptionLost when the connection ended and everything it
        delivered has been taken; returns [] once an unsubscribe completed.
        """
        out: list[bytes] = []
        channel = self._channel
        while True:
            reader_gets = self._reader.gets
            while len(out) < limit:
                try:
                    reply = reader_gets()
                except hiredis.ProtocolError as exc:  # a corrupt stream: start afresh
                    raise SubscriptionLost(f"not a Redis reply ({exc})") from None
                if reply is False:
                    if self._feed():
                        continue
                    break
                if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                    if reply[1] == channel:
                        out.append(reply[2])
                elif type(reply) is list and reply[:1] == [b"pong"]:
                    self._ping_sent = False
                elif type(reply) is list and reply[:1] == [b"unsubscribe"]:
                    self.unsubscribed = True
                    return out
                elif isinstance(reply, hiredis.ReplyError):
                    raise SubscriptionLost(f"Redis replied with an error: {reply}")
            if out or self.unsubscribed:
                return out
            await self._wait_alive()

    async def _wait_alive(self) -> None:
        """Wait for bytes; when Redis is quiet for IDLE_PING s, check it still answers.

        A subscriber only reads: a hung Redis, or a path that drops packets without
        closing (a proxy, a NAT), would otherwise look like a quiet channel for ever,
        with /ready still green while every publish is lost.
        """
        if self._proto.chunks or self._piece is not None or self._proto.lost is not None:
            await self._wait()
            return
        limit = PING_DEADLINE if self._ping_sent else IDLE_PING
        try:
            async with asyncio.timeout(limit):
                await self._wait()
        except TimeoutError:
            if self._ping_sent:
                raise SubscriptionLost(
                    f"no answer to PING within {PING_DEADLINE:g} s "
                    "(Redis hung or the network went silent)"
                ) from None
            self._send("PING")
            self._ping_sent = True

    def unsubscribe(self) -> None:
        """Ask Redis to stop sending; messages before the confirmation still arrive."""
        with contextlib.suppress(SubscriptionLost):  # a lost connection sends nothing more
            self._send("UNSUBSCRIBE")

    def abandon(self) -> None:
        """Stop waiting for the unsubscribe confirmation: a waiting take() returns."""
        self.unsubscribed = True
        self._proto.wakeup.set()

    def close(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.close()
