"""The atomic batch commit and its read-back validation.

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

import time
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from kv_updater.keys import KeyLayout
from kv_updater.message import Accepted, Rejected

COMMIT_LUA = files("kv_updater").joinpath("commit.lua").read_text()
STALE = -1
UNCHANGED = 0
SUPERSEDED = -2
DEAD_LETTER_PAYLOAD_MAX = 65_536


@dataclass(slots=True)
class BatchOutcome:
    statuses: list[int]
    """Per accepted message: its seq when written, else UNCHANGED, STALE or SUPERSEDED."""
    committed: int = 0
    superseded: int = 0
    unchanged: int = 0
    stale: int = 0
    validated: int = 0
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
    ) -> None:
        self.client = client
        self.layout = layout
        self.stored_channel = stored_channel
        self.validate = validate
        self.dead_letter = dead_letter
        self.dead_letter_maxlen = dead_letter_maxlen
        self.source_channel = source_channel
        self._sha: str | None = None

    async def load_script(self) -> None:
        self._sha = str(await self.client.script_load(COMMIT_LUA))

    async def commit(
        self, batch: list[Accepted], rejected: list[tuple[Rejected, bytes]] | None = None
    ) -> BatchOutcome:
        """Commit ``batch`` atomically, keep ``rejected`` in the dead-letter stream."""
        if self._sha is None:
            await self.load_script()
        dead = rejected if (rejected and self.dead_letter) else []
        if not batch:
            if dead:
                pipe = self.client.pipeline(transaction=False)
                self._queue_dead_letters(pipe, dead)
                await pipe.execute()
            return BatchOutcome([])
        winners = _winners(batch)
        results = await self._run(batch, winners, dead)
        if isinstance(results[0], NoScriptError):
            # Redis lost its script cache (SCRIPT FLUSH, failover): load and redo the
            # commit; the dead letters of the first attempt were already written.
            await self.load_script()
            results = await self._run(batch, winners, [])
        for item in results:
            if isinstance(item, Exception):
                raise item
        statuses = _statuses(batch, winners, results[0])
        return self._outcome(batch, winners, statuses, results[-2:] if self.validate else None)

    async def _run(
        self, batch: list[Accepted], winners: dict[str, int], dead: list[tuple[Rejected, bytes]]
    ) -> list[Any]:
        layout = self.layout
        keys: list[str] = [layout.seq, layout.index, layout.instants]
        args: list[str | bytes] = [self.stored_channel]
        data_key = layout.data_key
        for position in winners.values():
            msg = batch[position]
            keys.append(data_key(msg.type))
            args += (msg.type, msg.instant, msg.stored, msg.type_json)
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command("EVALSHA", self._sha, len(keys), *keys, *args)
        self._queue_dead_letters(pipe, dead)
        if self.validate:
            pipe.execute_command("MGET", *keys[3:])
            pipe.execute_command("ZMSCORE", layout.index, *winners)
        return list(await pipe.execute(raise_on_error=False))

    def _queue_dead_letters(self, pipe: Any, dead: list[tuple[Rejected, bytes]]) -> None:
        now = f"{time.time():.6f}"
        for rejection, raw in dead:
            pipe.xadd(
                self.dead_letter,
                {
                    "reason": rejection.reason,
                    "detail": rejection.detail,
                    "channel": self.source_channel,
                    "received": now,
                    "size": str(len(raw)),
                    "payload": raw[:DEAD_LETTER_PAYLOAD_MAX],
                },
                maxlen=self.dead_letter_maxlen,
                approximate=True,
            )

    def _outcome(
        self,
        batch: list[Accepted],
        winners: dict[str, int],
        statuses: list[int],
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
        for position, value, score in zip(winners.values(), values, scores, strict=True):
            msg, seq = batch[position], statuses[position]
            if seq <= 0:
                continue
            outcome.validated += 1
            # A higher index score is a newer commit (another updater): that is fine.
            if score is None or int(score) < seq or (int(score) == seq and value != msg.stored):
                outcome.mismatches.append(msg.type)
        return outcome


def _winners(batch: list[Accepted]) -> dict[Accepted, int]:
    """The message that wins each key in the batch, mapped to its position.

    The latest instant wins; on a tie the later arrival does (DESIGN.md), except an
    identical value, which would be a no-op anyway.  Ordered by first appearance.
    """
    best: dict[str, int] = {}
    for position, msg in enumerate(batch):
        current = best.get(msg.type)
        if current is None:
            best[msg.type] = position
            continue
        held = batch[current]
        if msg.instant > held.instant or (msg.instant == held.instant and msg.stored != held.stored):
            best[msg.type] = position
    return best


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


def is_script_error(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and not isinstance(exc, NoScriptError)
