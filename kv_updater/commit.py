"""The atomic batch commit and its read-back validation.

Commands go out as one packed write on a connection of the committer's own (a
``RespLink``, kv_updater.resp) and their replies come back in order: a pipeline,
built with hiredis's C ``pack_command``.  redis-py's asyncio pipeline packs
arguments in Python, which for an EVALSHA of thousands of arguments costs more
than the commit itself; its connections cost more than the commit at low rates.

A batch is everything the subscriber had in hand; it is committed as one atomic
step.  Inside that step, only the winning update of each key - the latest
``updated`` instant, the later arrival on a tie - is written and announced; the
others are counted as *superseded*.  No reader can tell the difference (the step
is atomic, so an intermediate value could never be observed), and it keeps the
Redis-side work proportional to the keys touched rather than to the messages:
under a burst this is what lets one updater commit 100k messages/s.

One Redis round trip per batch: a pipeline of EVALSHA (kv_updater/commit.lua,
which does stale protection, data, index, sequence and notifications in one
atomic step), the dead-letter XADDs, and - when validation is on - an MGET of the
batch's keys with a ZMSCORE of their index entries.  Redis runs a connection's
commands in order, so the read-back sees the state right after the commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from kv_updater.keys import KeyLayout
from kv_updater.message import Accepted, Rejected
from kv_updater.resp import RespLink

COMMIT_LUA = files("kv_updater").joinpath("commit.lua").read_text()
STALE = -1
UNCHANGED = 0
SUPERSEDED = -2
DEAD_LETTER_PAYLOAD_MAX = 65_536
DRAIN_EVERY = 1_000
"""Messages handled between two turns of the event loop, when a batch is parsed
(kv_updater.service) and when its commit is built: the subscription's socket is
only read between turns."""


@dataclass(slots=True)
class BatchOutcome:
    statuses: list[int]
    """Per accepted message: its seq when written, else UNCHANGED, STALE or SUPERSEDED."""
    committed: int = 0
    superseded: int = 0
    unchanged: int = 0
    stale: int = 0
    validated: int = 0
    dead_lettered: int = 0
    """Rejected messages written to the dead-letter stream."""
    mismatches: list[str] = field(default_factory=list)
    """Types whose read-back held neither what was written nor a newer commit."""


class Committer:
    """Commits batches of accepted messages through one Redis client."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: KeyLayout,
        stored_channel: str,
        *,
        validate: bool = True,
        dead_letter: str = "",
        dead_letter_maxlen: int = 10_000,
        source_channel: str = "",
        url: str | None = None,
    ) -> None:
        self.client = client
        self.layout = layout
        self.stored_channel = stored_channel
        self.validate = validate
        self.dead_letter = dead_letter
        self.dead_letter_maxlen = dead_letter_maxlen
        self.source_channel = source_channel
        self._sha: str | None = None
        # The link connects to ``url`` (default: where ``client`` connects).
        self._link = RespLink.for_client(client, "kv-updater", url)

    async def load_script(self) -> None:
        self._sha = str(await self.client.script_load(COMMIT_LUA))

    async def commit(
        self,
        batch: list[Accepted],
        rejected: list[tuple[Rejected, bytes]] | None = None,
        *,
        sent: asyncio.Future[None] | None = None,
    ) -> BatchOutcome:
        """Commit ``batch`` atomically, keep ``rejected`` in the dead-letter stream.

        ``sent`` is resolved as the request goes out, before its replies are awaited:
        the updater parses the next batch while Redis runs this one.
        """
        if self._sha is None:
            await self.load_script()
        dead = rejected if (rejected and self.dead_letter) else []
        if not batch:
            if dead:
                for item in await self._pipeline(self._dead_letter_commands(dead)):
                    if isinstance(item, Exception):
                        raise item
            return BatchOutcome([], dead_lettered=len(dead))
        encoded: dict[int, bytes] = {}
        winners = _winners(batch, encoded)
        commit, data_keys, written = await self._commit_command(batch, winners, encoded)
        reads: list[Sequence[str | bytes]] = []
        if self.validate:
            reads = [("MGET", *data_keys), ("ZMSCORE", self.layout.index, *winners)]
        if sent is not None and not sent.done():
            sent.set_result(None)  # the write below happens before the next loop turn
        results = await self._pipeline([commit, *self._dead_letter_commands(dead), *reads])
        if isinstance(results[0], NoScriptError):
            # Redis lost its script cache (SCRIPT FLUSH, failover): load and redo the
            # commit; the dead letters of the first attempt were already written.
            # The SHA is the script's, so the same command goes again.
            await self.load_script()
            results = await self._pipeline([commit, *reads])
        for item in results:
            if isinstance(item, Exception):
                raise item
        statuses = _statuses(batch, winners, results[0])
        outcome = self._outcome(
            batch, winners, statuses, written, results[-2:] if self.validate else None
        )
        outcome.dead_lettered = len(dead)
        return outcome

    async def _commit_command(
        self, batch: list[Accepted], winners: dict[str, int], encoded: dict[int, bytes]
    ) -> tuple[tuple[str | bytes, ...], list[str], list[bytes]]:
        """The EVALSHA of the winners, their data keys, and the stored value of each.

        ``encoded``: stored values _winners already encoded, by position.  The
        read-back compares against those values instead of encoding them again.

        The event loop gets a turn every ``DRAIN_EVERY`` winners: building a
        10,000-key commit is 10-20 ms of Python, and the subscription's socket is
        only read between turns (kv_updater.service).  Packing it whole afterwards
        is one C call of ~6 ms.
        """
        layout = self.layout
        data_key = layout.data_key
        data_keys: list[str] = []
        args: list[str | bytes] = [self.stored_channel]
        written: list[bytes] = []
        for done, position in enumerate(winners.values(), 1):
            msg = batch[position]
            stored = encoded.get(position) or msg.stored
            written.append(stored)
            data_keys.append(data_key(msg.type))
            args += (msg.type, msg.instant, stored, msg.type_json)
            if not done % DRAIN_EVERY:
                await asyncio.sleep(0)
        assert self._sha is not None
        keys = (layout.seq, layout.index, layout.instants, *data_keys)
        return ("EVALSHA", self._sha, str(len(keys)), *keys, *args), data_keys, written

    async def _pipeline(self, commands: list[Sequence[str | bytes]]) -> list[Any]:
        """Send ``commands`` in one write, return their replies (errors as exceptions)."""
        return await self._link.request(
            b"".join(_pack(tuple(c)) for c in commands), len(commands)
        )

    @property
    def connected(self) -> bool:
        """True while the commit connection is open; it opens at the first commit."""
        return self._link.connected

    def close(self) -> None:
        """Close the commit connection (a later commit would open a new one)."""
        self._link.close()

    def _dead_letter_commands(
        self, dead: list[tuple[Rejected, bytes]]
    ) -> list[Sequence[str | bytes]]:
        now = f"{time.time():.6f}"
        return [
            (
                "XADD",
                self.dead_letter,
                "MAXLEN",
                "~",
                str(self.dead_letter_maxlen),
                "*",
                "reason",
                rejection.reason,
                "detail",
                rejection.detail,
                "channel",
                self.source_channel,
                "received",
                now,
                "size",
                str(len(raw)),
                "payload",
                raw[:DEAD_LETTER_PAYLOAD_MAX],
            )
            for rejection, raw in dead
        ]

    def _outcome(
        self,
        batch: list[Accepted],
        winners: dict[str, int],
        statuses: list[int],
        written: list[bytes],
        readback: list[Any] | None,
    ) -> BatchOutcome:
        outcome = BatchOutcome(statuses)
        for status in statuses:
            if status > 0:
                outcome.committed += 1
            elif status == SUPERSEDED:
                outcome.superseded += 1
            elif status == UNCHANGED:
                outcome.unchanged += 1
            else:
                outcome.stale += 1
        if readback is None:
            return outcome
        values, scores = readback
        for position, stored, value, score in zip(
            winners.values(), written, values, scores, strict=True
        ):
            seq = statuses[position]
            if seq <= 0:
                continue
            outcome.validated += 1
            # A higher index score is a newer commit (another updater): that is fine.
            held = -1 if score is None else int(float(score))
            if held < seq or (held == seq and value != stored):
                outcome.mismatches.append(batch[position].type)
        return outcome


# hiredis's C packer; its stub types the argument as a 1-tuple, hence Any.
_pack: Any = hiredis.pack_command


def _winners(batch: list[Accepted], encoded: dict[int, bytes]) -> dict[str, int]:
    """The message that wins each key in the batch, mapped to its position.

    The latest instant wins; on a tie the later arrival does (DESIGN.md), except an
    identical value, which would be a no-op anyway.  Ordered by first appearance.
    A tie compares stored values: each is encoded once, kept in ``encoded`` by position.
    """
    best: dict[str, int] = {}
    for position, msg in enumerate(batch):
        current = best.get(msg.type)
        if current is None:
            best[msg.type] = position
            continue
        held = batch[current]
        if msg.instant > held.instant or (
            msg.instant == held.instant
            and _stored(batch, encoded, position) != _stored(batch, encoded, current)
        ):
            best[msg.type] = position
    return best


def _stored(batch: list[Accepted], encoded: dict[int, bytes], position: int) -> bytes:
    """The stored value of ``batch[position]``, encoded at most once per batch."""
    stored = encoded.get(position)
    if stored is None:
        stored = encoded[position] = batch[position].stored
    return stored


def _statuses(batch: list[Accepted], winners: dict[str, int], committed: list[int]) -> list[int]:
    """Per message: the winners' commit results; for the others, what a one-by-one
    commit would have said - replaced by a later update (superseded), older than
    one already in hand (stale), or a replay of it (unchanged)."""
    statuses = [SUPERSEDED] * len(batch)
    for position, status in zip(winners.values(), committed, strict=True):
        statuses[position] = status
    for position, msg in enumerate(batch):
        winner = winners[msg.type]
        if position > winner:
            statuses[position] = STALE if msg.instant < batch[winner].instant else UNCHANGED
    return statuses
