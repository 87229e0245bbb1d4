-- Atomic batch commit of the kv_updater (see kv_updater/commit.py).
--
-- KEYS[1] = <namespace>seq        global commit sequence (contract)
-- KEYS[2] = <namespace>index      zset type -> seq of its last commit (contract)
-- KEYS[3] = <namespace>instants   hash type -> instant key of the stored value
-- KEYS[3+i] = data key of message i
-- ARGV[1] = stored channel
-- ARGV[2+4(i-1)..] = type, instant key, stored value, type as JSON (4 per message)
--
-- Each type appears at most once per call: commit.py sends only the winner of
-- each key in its batch.  Returns one integer per message: its new seq when
-- written, 0 when it was an identical replay (no-op), -1 when stale (the key
-- holds a later instant).
--
-- Instant keys are digit strings that sort like the instants they encode
-- (kv_updater/instant.py), so Lua's string comparison is an exact instant
-- comparison.  Data, instants and index are written with one command each, then
-- every commit is published, in order, after the writes.
local channel = ARGV[1]
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local mset, hset, zadd, notes, result = {}, {}, {}, {}, {}
local count = #KEYS - 3

-- unpack() is bounded by Lua's C stack: send long argument lists in chunks.
local step = 4000

-- Every message's current instant in one HMGET per chunk, not one HGET each.
local types = {}
for i = 1, count do
  types[i] = ARGV[2 + (i - 1) * 4]
end
local olds = {}
for s = 1, count, step do
  local got = redis.call('HMGET', KEYS[3], unpack(types, s, math.min(s + step - 1, count)))
  for j = 1, #got do
    olds[s + j - 1] = got[j]
  end
end

for i = 1, count do
  local a = 2 + (i - 1) * 4
  local typ, instant, value = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local key = KEYS[3 + i]
  local old = olds[i]
  -- pcall: a key planted with another Redis type must not abort the batch
  if old and instant < old then
    result[i] = -1
  elseif old == instant and redis.pcall('GET', key) == value then
    result[i] = 0
  else
    seq = seq + 1
    result[i] = seq
    mset[#mset + 1] = key
    mset[#mset + 1] = value
    hset[#hset + 1] = typ
    hset[#hset + 1] = instant
    zadd[#zadd + 1] = seq
    zadd[#zadd + 1] = typ
    notes[#notes + 1] = '{"type":' .. ARGV[a + 3] .. ',' .. string.sub(value, 2, -2)
      .. ',"seq":' .. seq .. '}'
  end
end

local function call_chunked(cmd, key, args)
  for s = 1, #args, step do
    local e = math.min(s + step - 1, #args)
    if key then
      redis.call(cmd, key, unpack(args, s, e))
    else
      redis.call(cmd, unpack(args, s, e))
    end
  end
end

if #notes > 0 then
  call_chunked('MSET', nil, mset)
  call_chunked('HSET', KEYS[3], hset)
  call_chunked('ZADD', KEYS[2], zadd)
  redis.call('SET', KEYS[1], seq)
  for _, note in ipairs(notes) do
    redis.call('PUBLISH', channel, note)
  end
end
return result
