"""Reads of the KV, each one atomic: a value is only ever read with its index entry.

The API serves nothing but the updater's index (DESIGN.md): every read starts at
``<namespace>index`` and touches a data key only for a member found there, inside
the same Lua script, so a key planted by someone else is never read and a value
is never paired with another commit's seq.  Data keys are derived in the script
from the prefix, which is why this needs a single Redis (not a Cluster).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import redis.asyncio as aioredis

from kv_updater.keys import KeyLayout

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
    def __init__(self, client: aioredis.Redis, layout: KeyLayout) -> None:
        self.client = client
        self.layout = layout
        self._read_one = client.register_script(READ_ONE)
        self._snapshot = client.register_script(SNAPSHOT)

    async def get(self, type_: str) -> Stored | None:
        """The stored value of an indexed type, with the seq of its commit."""
        reply: Any = await self._read_one(
            keys=[self.layout.index, self.layout.data_key(type_)], args=[type_]
        )
        if not reply or not _looks_stored(reply[1]):
            return None
        return Stored(type_, int(reply[0]), reply[1])

    async def snapshot(self, since: int = 0, types: frozenset[str] | None = None) -> Snapshot:
        """Global seq and every (filtered) indexed key committed after ``since``."""
        args: list[str | int] = [self.layout.key_prefix, since]
        if types is not None:
            args.extend(sorted(types))
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
        return bool(await self.client.ping())
