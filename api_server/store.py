"""Reads of the KV, each one atomic: a value is only ever read with its index entry.

The API serves nothing but the updater's index (DESIGN.md): every read starts at
``<namespace>index`` and touches a data key only for a member found there, inside
the same Lua script, so a key planted by someone else is never read and a value
is never paired with another commit's seq.  Data keys are derived in the script
from the prefix, which is why this needs a single Redis (not a Cluster).
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from kv_updater.keys import KeyLayout
from kv_updater.resp import RespLink

# KEYS[1] index, KEYS[2] data key; ARGV[1] type.  -> {seq, value} or nil
READ_ONE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return false end
local value = redis.pcall('GET', KEYS[2])
if type(value) ~= 'string' then return false end
return {score, value}
"""

# KEYS[1] seq, KEYS[2] index; ARGV[1] key prefix, ARGV[2] since (exclusive),
# ARGV[3..] the types of a filter (none: every indexed type).
# -> {global seq, type1, seq1, value1, type2, ...}
SNAPSHOT = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[2])
local out = {seq}
local function add(typ, score)
  local value = redis.pcall('GET', ARGV[1] .. typ)
  if type(value) == 'string' then
    out[#out + 1] = typ
    out[#out + 1] = score
    out[#out + 1] = value
  end
end
if #ARGV > 2 then
  for i = 3, #ARGV do
    local score = redis.call('ZSCORE', KEYS[2], ARGV[i])
    if score and tonumber(score) > since then add(ARGV[i], score) end
  end
else
  local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '+inf', 'WITHSCORES')
  for i = 1, #members, 2 do add(members[i], members[i + 1]) end
end
return out
"""


class Stored(NamedTuple):
    type: str
    seq: int
    value: bytes


class Snapshot(NamedTuple):
    seq: int
    """The global commit sequence at the instant of the read."""
    values: list[Stored]
    """Keys committed after ``since``, ordered by their seq."""


def _looks_stored(value: bytes) -> bool:
    # The updater only stores JSON objects; anything else at an indexed key was
    # written by someone else and is not served (it could not be spliced).
    return value[:1] == b"{" and value[-1:] == b"}"


class Store:
    """The API's reads.

    ``get`` is pipelined automatically: one pipeline is in flight at a time, and
    the reads requested while it is out go to Redis together as the next one (one
    write, one read) instead of one round trip each - on a busy server most of a
    request's cost is system calls.
    Each read is still its own atomic script.  The pipelines go out on a
    ``RespLink`` of their own (kv_updater.resp), packed and parsed by hiredis:
    redis-py's pipeline machinery (pool checkout, per-command packing and
    parsing, timeouts per reply) was a fifth of the server's CPU on the read path.
    Snapshots, the index and health checks stay on redis-py.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        layout: KeyLayout,
        probe: aioredis.Redis | None = None,
        *,
        url: str | None = None,
    ) -> None:
        self.client = client
        self.layout = layout
        # Health checks use a connection of their own: a pool busy with snapshot
        # reads must not make the server look unready.
        self.probe = probe or client
        self._read_one = client.register_script(READ_ONE)
        self._snapshot = client.register_script(SNAPSHOT)
        # ``url``: where ``client`` connects, spelled as configured (TLS options too).
        self._link = RespLink.for_client(client, "api-server-reads", url)
        self._queued: list[tuple[str, asyncio.Future[Any]]] = []
        self._reader: asyncio.Task[None] | None = None

    def close(self) -> None:
        self._link.close()

    async def get(self, type_: str) -> Stored | None:
        """The stored value of an indexed type, with the seq of its commit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((type_, future))
        if self._reader is None:
            self._reader = loop.create_task(self._read_queued())
        reply = await future
        if not reply or not _looks_stored(reply[1]):
            return None
        return Stored(type_, int(reply[0]), reply[1])

    async def _read_queued(self) -> None:
        """Send what is queued as one pipeline; what queued up meanwhile goes next.

        One pipeline in flight at a time: under load the reads that arrive during a
        round trip make the next pipeline, so batches grow with the load instead of
        the round trips.
        """
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                await self._read_batch(batch)
        finally:
            self._reader = None

    async def _read_batch(self, batch: list[tuple[str, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._pipelined(batch)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RedisError("read cancelled")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipelined(self, batch: list[tuple[str, asyncio.Future[Any]]]) -> list[Any]:
        index, data_key, sha = self.layout.index, self.layout.data_key, self._read_one.sha
        pack = hiredis.pack_command
        packed = b"".join(
            pack(("EVALSHA", sha, "2", index, data_key(type_), type_))  # type: ignore[arg-type]
            for type_, _ in batch
        )
        for attempt in (1, 2):
            try:
                replies = await self._link.request(packed, len(batch))
            except OSError as exc:  # refused, timed out, TLS: what redis-py would raise
                raise RedisConnectionError(f"Redis unavailable ({exc!r})") from exc
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                # Redis lost its script cache (restart, SCRIPT FLUSH): load it, redo.
                await self.client.script_load(READ_ONE)
                continue
            return replies
        raise AssertionError("unreachable")

    async def snapshot(self, since: int = 0, types: frozenset[str] | None = None) -> Snapshot:
        """Global seq and every (filtered) indexed key committed after ``since``."""
        args: list[str | int] = [self.layout.key_prefix, since]
        if types is not None:
            args.extend(types)  # the reply is sorted by seq below
        reply: list[Any] = await self._snapshot(
            keys=[self.layout.seq, self.layout.index], args=args
        )
        values = [
            Stored(reply[i].decode(), int(reply[i + 1]), reply[i + 2])
            for i in range(1, len(reply), 3)
            if _looks_stored(reply[i + 2])
        ]
        if types is not None:
            values.sort(key=lambda s: s.seq)
        return Snapshot(int(reply[0]), values)

    async def index(self) -> list[tuple[str, int]]:
        """Every indexed type with the seq of its last commit, oldest first."""
        pairs: list[Any] = await self.client.zrange(
            self.layout.index, 0, -1, withscores=True
        )
        return [(name.decode(), int(score)) for name, score in pairs]

    async def ping(self) -> bool:
        return bool(await self.probe.ping())
