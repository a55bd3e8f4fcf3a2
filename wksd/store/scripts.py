"""The Lua scripts that make wksd's composite steps atomic in Redis.

Each script is a constant whose comment states its KEYS and ARGV and what it
returns. They run with EVALSHA; the SHA is computed here, the script loaded
at connect (SCRIPT LOAD) and loaded again if Redis answers NOSCRIPT (after a
SCRIPT FLUSH, a restart or a failover to a node that never saw it).

``WORKFLOW_SNAPSHOT`` reads state keys it computes from a prefix rather than
receiving them in KEYS: that is what lets ``stats`` read every state in one
round trip. It is fine on a single Redis or behind Sentinel, not on Cluster
(which DESIGN does not ask for).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = [
    "CACHE_FILL",
    "CACHE_LOOKUP",
    "DELETE_IF_EQUAL",
    "LOCK_ACQUIRE",
    "LOCK_EXTEND",
    "LOCK_RELEASE",
    "RAISE_COUNTER",
    "RESTORE_LOCK",
    "RESTORE_PLAIN",
    "RESTORE_WORKFLOW",
    "SCRIPTS",
    "WORKFLOW_SNAPSHOT",
    "WORKFLOW_SWAP",
    "Script",
]


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# The token key records whose holding its token is: "{token}:{worker id}",
# expiring at the very millisecond its lock does (PEXPIREAT to the lock's
# PEXPIRETIME). The token is the current holding's only while both still
# agree: a lock the seed's app deleted and set again (plain DEL, SET NX EX),
# even for the same worker, has another expiry, and an old plain-integer
# value names nobody. Either way the next acquire takes a new token.
# ``held_token(lock key, token key, holder)`` -> that token (a string), or false.
_HELD_TOKEN = """
local function held_token(lock_key, token_key, holder)
  local record = redis.call('GET', token_key)
  if not record then return false end
  if redis.call('PEXPIRETIME', token_key) ~= redis.call('PEXPIRETIME', lock_key) then
    return false
  end
  local sep = string.find(record, ':', 1, true)
  if not sep or string.sub(record, sep + 1) ~= holder then return false end
  local token = string.sub(record, 1, sep - 1)
  if not string.match(token, '^%d+$') then return false end
  return token
end
local function bind_token(lock_key, token_key, token, holder)
  redis.call('SET', token_key, token .. ':' .. holder, 'PXAT', redis.call('PEXPIRETIME', lock_key))
end
"""

# KEYS[1] lock key (holds the worker id), KEYS[2] token key, KEYS[3] fencing counter
# ARGV[1] worker id, ARGV[2] TTL in ms
# -> {1, worker, token, ttl} when acquired: a free lock (the counter gives a
#    new token) or one this worker already holds (TTL refreshed; the same
#    token if it was given to this holding, see _HELD_TOKEN, else a new one);
#    {0, holder, -1, pttl} when another worker holds it.
LOCK_ACQUIRE = Script(
    "lock_acquire",
    _HELD_TOKEN
    + """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return {0, holder, -1, redis.call('PTTL', KEYS[1])}
end
local token = false
if holder then token = held_token(KEYS[1], KEYS[2], holder) end
if not token then token = string.format('%d', redis.call('INCR', KEYS[3])) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
bind_token(KEYS[1], KEYS[2], token, ARGV[1])
return {1, ARGV[1], tonumber(token), tonumber(ARGV[2])}
""",
)

# KEYS[1] lock key, KEYS[2] token key; ARGV[1] worker id, ARGV[2] a fencing
# token, or '' for any: with one, only the holding that token was given to
# is released (undoing one grant, never a later holding of the same worker).
# -> 'released', 'not_found' or 'not_owner'. Only the holder deletes.
LOCK_RELEASE = Script(
    "lock_release",
    _HELD_TOKEN
    + """
local holder = redis.call('GET', KEYS[1])
if not holder then return 'not_found' end
if holder ~= ARGV[1] then return 'not_owner' end
if ARGV[2] ~= '' and held_token(KEYS[1], KEYS[2], holder) ~= ARGV[2] then
  return 'not_owner'
end
redis.call('DEL', KEYS[1], KEYS[2])
return 'released'
""",
)

# KEYS[1] lock key, KEYS[2] token key; ARGV[1] worker id, ARGV[2] TTL in ms
# -> 'extended', 'not_found' or 'not_owner'. Only the holder extends; the
#    token goes on with the lock only if it is this holding's (_HELD_TOKEN).
LOCK_EXTEND = Script(
    "lock_extend",
    _HELD_TOKEN
    + """
local holder = redis.call('GET', KEYS[1])
if not holder then return 'not_found' end
if holder ~= ARGV[1] then return 'not_owner' end
local token = held_token(KEYS[1], KEYS[2], holder)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if token then bind_token(KEYS[1], KEYS[2], token, holder) end
return 'extended'
""",
)

# ``record_event(execution stream, all stream, at ms, event, length kept per
# execution, length kept for all, execution stream's TTL ms)``: append the
# event to both streams, trimmed approximately; the execution's stream goes
# with the workflow state (its TTL). The entry id is "<time>-*" so XRANGE by
# time finds it; when that is not after the stream's last id (another
# daemon's clock ran ahead), Redis picks the id ("*").
_RECORD_EVENT = """
local function record_event(mine, all, at, event, per_execution, in_all, retain_ms)
  local function add(key, maxlen)
    local ok = pcall(redis.call, 'XADD', key, 'MAXLEN', '~', maxlen, at .. '-*', 'e', event)
    if not ok then
      redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'e', event)
    end
  end
  add(mine, per_execution)
  redis.call('PEXPIRE', mine, retain_ms)
  add(all, in_all)
end
"""

# KEYS[1] state key, KEYS[2] active set, KEYS[3] finished index (ZSET)
# ARGV[1] '1' if a state is expected, '0' if the key must be absent
# ARGV[2] the expected state (compared whole: redis.sha1hex would save bytes but
#         is missing from Redis-compatible servers such as fakeredis)
# ARGV[3] new state, or '' to leave the state as it is; ARGV[4] its TTL in ms, or ''
# ARGV[5] execution id; ARGV[6] '1' to join the active set, '0' to leave it
# ARGV[7] finished-at score (ms) for the finished index, or ''
# ARGV[8] index entries scored below this are pruned
# With an event (KEYS[4] the execution's event stream, KEYS[5] the one for all):
# ARGV[9..13] record_event's at, event, lengths and TTL; ARGV[14] the channel, ARGV[15] the
# message published there. Both only once the swap is applied, and an error
# recording the event (a key of another type, say) leaves the swap applied.
# -> 1 when applied, 2 when applied but its event could not be recorded, 0 when
#    the state was not as expected (the caller re-reads).
WORKFLOW_SWAP = Script(
    "workflow_swap",
    _RECORD_EVENT
    + """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[3] ~= '' then
  if ARGV[4] ~= '' then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
end
if ARGV[6] == '1' then
  redis.call('SADD', KEYS[2], ARGV[5])
  redis.call('ZREM', KEYS[3], ARGV[5])
else
  redis.call('SREM', KEYS[2], ARGV[5])
  if ARGV[7] ~= '' then
    redis.call('ZADD', KEYS[3], ARGV[7], ARGV[5])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[8])
  end
end
if #KEYS == 5 then
  local recorded = pcall(
    record_event, KEYS[4], KEYS[5], ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13])
  redis.call('PUBLISH', ARGV[14], ARGV[15])
  if not recorded then return 2 end
end
return 1
""",
)

# KEYS[1] active set, KEYS[2] finished index
# ARGV[1] state key prefix; ARGV[2] finished since (ms), or '' to skip finished ones
# -> {ids, states, finished}: states[i] is ids[i]'s state or nil when gone;
#    finished holds the states (still present) of ids finished since ARGV[2].
WORKFLOW_SNAPSHOT = Script(
    "workflow_snapshot",
    """
local ids = redis.call('SMEMBERS', KEYS[1])
local states = {}
for i, id in ipairs(ids) do
  states[i] = redis.call('GET', ARGV[1] .. id)
end
local finished = {}
if ARGV[2] ~= '' then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], '+inf')) do
    local state = redis.call('GET', ARGV[1] .. id)
    if state then finished[#finished + 1] = state end
  end
end
return {ids, states, finished}
""",
)

# Reconciliation after an outage: the state wksd wrote to memory goes back
# unless Redis holds a newer one, or a finished one and ours is not finished
# (the seed's app completes a run without touching updatedAt). What ours is
# comes from the journal (ARGV[5..7], as the domain told it when writing);
# a journal written before it kept that is read from our state itself, as
# Redis's state is read.
# KEYS[1] state key, KEYS[2] active set, KEYS[3] finished index
# ARGV[1] our state, ARGV[2] its TTL in ms or ''
# ARGV[3] execution id, ARGV[4] '1' active / '0' not
# ARGV[5] our updatedAt (ms), or '' when not told (then ARGV[6..7] are read
#         from ARGV[1] too); ARGV[6] '1' if our state is finished, else '0'
# ARGV[7] our finished-index score (ms), or '' for none
# -> {'written'} (ours was newer, or Redis had none), or {'conflict', state,
#    pttl, member}: Redis's state stays, and is returned (with its TTL and
#    whether the id is in the active set) so memory can copy it.
RESTORE_WORKFLOW = Script(
    "restore_workflow",
    """
-- A stored state as whoever wrote it wrote it: {finished, updatedAt or nil,
-- completedAt or nil}, or nil when it is not JSON.
local function describe(raw)
  local ok, state = pcall(cjson.decode, raw)
  if not ok then
    -- cjson refuses the escape JSON.stringify writes for a lone surrogate
    -- ("\\\\ud83d"): read the fields with every surrogate escape replaced.
    local repaired = string.gsub(raw, '\\\\u[dD][89abcdefABCDEF]%x%x', '\\\\ufffd')
    ok, state = pcall(cjson.decode, repaired)
  end
  if not ok or type(state) ~= 'table' then return nil end
  local status = state['status']
  local finished = status == 'completed' or status == 'failed' or status == 'cancelled'
  return {finished, tonumber(state['updatedAt']), tonumber(state['completedAt'])}
end
local ours_updated, ours_finished, ours_index = tonumber(ARGV[5]), ARGV[6] == '1', ARGV[7]
if ARGV[5] == '' then
  local ours = describe(ARGV[1])
  ours_updated, ours_finished, ours_index = 0, false, ''
  if ours then
    ours_updated, ours_finished = ours[2] or 0, ours[1]
    if ours[1] and ours[3] then ours_index = ours[3] end
  end
end
local current = redis.call('GET', KEYS[1])
if current then
  local theirs = describe(current)
  if theirs then
    local finished, updated = theirs[1], theirs[2]
    if (finished and not ours_finished) or (updated and updated >= ours_updated) then
      return {'conflict', current, redis.call('PTTL', KEYS[1]),
              redis.call('SISMEMBER', KEYS[2], ARGV[3])}
    end
  end
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if ARGV[4] == '1' then
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
else
  redis.call('SREM', KEYS[2], ARGV[3])
  if ours_index ~= '' then redis.call('ZADD', KEYS[3], ours_index, ARGV[3]) end
end
return {'written'}
""",
)

# Reconciliation of a session, cache entry or other plain key written or
# deleted in memory during an outage: a compare-and-set against what this
# host last saw of it before the outage, so another host's write meanwhile
# is never undone.
# KEYS[1] the key
# ARGV[1] '1' if this host last saw a value, '0' if it saw the key absent
# ARGV[2] that value, or ''
# ARGV[3] '1' to write ours, '0' to delete the key
# ARGV[4] our value, or ''; ARGV[5] its TTL in ms, or '' for none
# ARGV[6...] other values Redis may hold instead of what this host saw (writes
#         that were in flight when the link broke): 'v' .. value, or '-' for absent
# -> {'written'} or {'deleted'} when Redis still held what this host saw (or
#    already holds our outcome); {'conflict', current or nil, pttl} when not:
#    Redis's value stays, and is returned so memory can copy it. A key that
#    holds no string (not ours to touch) is a conflict with nil.
RESTORE_PLAIN = Script(
    "restore_plain",
    """
local current = redis.pcall('GET', KEYS[1])
if type(current) == 'table' and current.err then return {'conflict', false, -2} end
local seen = false
if ARGV[1] == '1' then seen = ARGV[2] end
local ours = false
if ARGV[3] == '1' then ours = ARGV[4] end
local expected = current == seen or current == ours
for i = 6, #ARGV do
  if expected then break end
  local other = ARGV[i]
  if other == '-' then
    expected = not current
  elseif current and string.sub(other, 1, 1) == 'v' then
    expected = current == string.sub(other, 2)
  end
end
if not expected then
  return {'conflict', current, redis.call('PTTL', KEYS[1])}
end
if ARGV[3] ~= '1' then
  redis.call('DEL', KEYS[1])
  return {'deleted'}
end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[4])
end
return {'written'}
""",
)

# Reconciliation of a lock taken in memory during an outage.
# KEYS[1] lock key, KEYS[2] token key, KEYS[3] fencing counter
# ARGV[1] holder, ARGV[2] TTL left in ms, ARGV[3] the token memory gave it
#         ('0': none known, the next acquire takes a new one)
# -> 'written' when Redis had no lock or the same holder (it keeps Redis's
#    token if that is this holding's, see _HELD_TOKEN); 'conflict' when
#    another worker holds it: theirs stays.
RESTORE_LOCK = Script(
    "restore_lock",
    _HELD_TOKEN
    + """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 'conflict' end
local token = false
if holder then token = held_token(KEYS[1], KEYS[2], holder) end
if not token and ARGV[3] ~= '0' then token = ARGV[3] end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if token then
  bind_token(KEYS[1], KEYS[2], token, ARGV[1])
else
  redis.call('DEL', KEYS[2])
end
local counter = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[3]) > counter then redis.call('SET', KEYS[3], ARGV[3]) end
return 'written'
""",
)

# KEYS[1] a counter; ARGV[1] a value. The counter becomes ARGV[1] if that is
# higher, so fencing tokens issued in memory are never issued again.
# -> the counter's value afterwards.
RAISE_COUNTER = Script(
    "raise_counter",
    """
local counter = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > counter then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return counter
""",
)

# KEYS[1] a key; ARGV[1] a value. Deletes the key only if it holds the value:
# a lease or lock released by its owner only, never by a latecomer.
# -> 1 when deleted, 0 otherwise.
DELETE_IF_EQUAL = Script(
    "delete_if_equal",
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
)

# A cached value and its stale-while-revalidate metadata (wksd.coordination.singleflight).
# The metadata is the value's while both expire at the same millisecond: it
# is written with PXAT the value's PEXPIRETIME, never to outlive it, and any
# other write of the value (the seed's SET EX, cache.set, a fill) gives the
# value another expiry, so the old metadata no longer counts.
# KEYS[1] the value's key, KEYS[2] its metadata's
# ARGV[1] the value, ARGV[2] its TTL in ms, ARGV[3] the metadata, or '' for none
# -> 1. The value is set, and the metadata set with it or deleted, at once.
CACHE_FILL = Script(
    "cache_fill",
    """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PXAT', redis.call('PEXPIRETIME', KEYS[1]))
else
  redis.call('DEL', KEYS[2])
end
return 1
""",
)

# KEYS[1] the value's key, KEYS[2] its metadata's
# -> {value or nil, metadata or nil, 1 if the metadata expires with the value
#    (it is that value's) else 0}
CACHE_LOOKUP = Script(
    "cache_lookup",
    """
local value = redis.call('GET', KEYS[1])
local meta = redis.call('GET', KEYS[2])
local bound = 0
if value and meta and redis.call('PEXPIRETIME', KEYS[1]) == redis.call('PEXPIRETIME', KEYS[2]) then
  bound = 1
end
return {value, meta, bound}
""",
)

SCRIPTS = (
    LOCK_ACQUIRE,
    LOCK_RELEASE,
    LOCK_EXTEND,
    WORKFLOW_SWAP,
    WORKFLOW_SNAPSHOT,
    RESTORE_WORKFLOW,
    RESTORE_PLAIN,
    RESTORE_LOCK,
    RAISE_COUNTER,
    DELETE_IF_EQUAL,
    CACHE_FILL,
    CACHE_LOOKUP,
)
