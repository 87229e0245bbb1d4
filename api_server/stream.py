"""One SSE client: its pending commits and the generator that writes them out.

Order of a stream (DESIGN.md: snapshot, then live, no gap, no duplicate):

1. the client is registered with the hub first, so every commit published from
   now on lands in its ``pending`` buffer;
2. one atomic read returns the global seq ``S`` and every (filtered) key
   committed after the client's Last-Event-ID, each with its seq;
3. those values go out sorted by seq (all <= S), then ``pending`` minus anything
   <= S (already covered by the read), then live commits, all > S.

``pending`` is an insertion-ordered dict type -> newest commit of that type.  A
newer commit of a type replaces the pending one *and moves to the end*, so the
dict stays sorted by seq and ids on the wire strictly increase - which is what
makes a Last-Event-ID resume exact.  A slow reader therefore costs at most one
pending value per key (conflation), never an unbounded queue.

After the hub lost and regained its subscription it may have missed commits, so
it marks every client for a new read "since the last id delivered": step 2 again.
"""

from __future__ import annotations

import asyncio
from itertools import islice
from typing import Protocol

from api_server.events import Event

KEEPALIVE = b": keep-alive\n\n"
CHUNK_EVENTS = 512
"""Events per write at most: a client far behind gets several moderate writes."""


class Writer(Protocol):
    """The client's socket, for the hub to write to directly (see ``Client.push``)."""

    def writable(self) -> bool:
        """False while the transport is paused (a slow reader) or gone."""

    def write(self, data: bytes) -> None:
        """Send SSE bytes as the next piece of the response body."""

    def abort(self) -> None:
        """Drop the connection now, whatever is still buffered."""

    def buffered(self) -> int:
        """Bytes written and not yet taken by the kernel (they shrink as the client reads)."""


class Client:
    """Per-client state; the hub writes into it, the client's generator reads it."""

    __slots__ = (
        "closed",
        "dirty",
        "floor",
        "last_id",
        "needs_snapshot",
        "pending",
        "ping_due",
        "stalled_bytes",
        "stalled_since",
        "types",
        "waiter",
        "writer",
    )

    def __init__(self, types: frozenset[str] | None, last_event_id: int) -> None:
        self.types = types
        """The ``?keys=`` filter, None for every key."""
        self.pending: dict[str, Event] = {}
        self.last_id = last_event_id
        """Seq of the last event written to the client (or its Last-Event-ID)."""
        self.floor = -1
        """Global seq of the last snapshot read: commits up to it are covered by it."""
        self.needs_snapshot = True
        self.ping_due = False
        self.closed = False
        self.dirty = False
        self.waiter: asyncio.Future[None] | None = None
        self.writer: Writer | None = None
        """Set once the response has started, when the server lets us write directly."""
        self.stalled_since = 0.0
        """Loop time the transport was seen paused with ``stalled_bytes`` buffered (0: not)."""
        self.stalled_bytes = 0

    def offer(self, event: Event, dirty: list[Client]) -> bool:
        """Queue a commit for this client; True when it replaced a pending one.

        The client is listed in ``dirty`` (once) for the hub to wake it: waking is
        done per flush, not per commit (see Hub.dispatch)."""
        if event.seq <= self.floor:
            return False
        pending = self.pending
        replaced = pending.pop(event.type, None) is not None
        pending[event.type] = event
        if not self.dirty:
            self.dirty = True
            dirty.append(self)
        return replaced

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    def can_push(self) -> bool:
        """True when the hub may write to this client's socket itself.

        Only while the client's own task is parked in ``wait`` - it is then not in
        the middle of a write of its own, so bytes cannot interleave - with no
        snapshot to read first and a transport that takes data now.  Otherwise the
        task is woken and does the write through the ASGI ``send``, which waits
        for a paused transport to drain."""
        writer = self.writer
        return (
            writer is not None
            and self.waiter is not None
            and not self.needs_snapshot
            and not self.closed
            and writer.writable()
        )

    def push(self) -> int:
        """Write pending commits straight to the socket; how many were written.

        The fan-out's hot path: one ``write`` per client per flush, without waking
        the client's task (a future, a task step, a generator resume and the ASGI
        send chain per client per flush cost as much as the system call itself).
        Call only when ``can_push()``; a transport that pauses part-way leaves the
        rest to the task."""
        writer = self.writer
        assert writer is not None
        written = 0
        while self.pending:
            chunk, n = self.take()
            writer.write(chunk)
            written += n
            if self.pending and not writer.writable():
                self.wake()
                break
        return written

    def take(self) -> tuple[bytes, int]:
        """Pending events as one write (oldest first) and how many it holds."""
        pending = self.pending
        if len(pending) == 1:  # the usual case when keeping up: no list, no join
            event = pending.popitem()[1]
            self.last_id = event.seq
            return event.frame, 1
        if len(pending) <= CHUNK_EVENTS:
            events = list(pending.values())
            pending.clear()
        else:
            events = [pending.pop(name) for name in list(islice(pending, CHUNK_EVENTS))]
        self.last_id = events[-1].seq
        return b"".join([e.frame for e in events]), len(events)

    def drop_covered(self, seq: int) -> None:
        """Forget pending commits a snapshot at ``seq`` already holds (or superseded)."""
        self.floor = seq
        pending = self.pending
        if pending and next(iter(pending.values())).seq <= seq:
            # Sorted by seq: drop from the front only.
            for name in [n for n, e in pending.items() if e.seq <= seq]:
                del pending[name]
