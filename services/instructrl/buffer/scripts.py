"""The Lua scripts of the buffer. Each runs atomically in Redis; all keys of one call
share the run's hash tag, so they also run on Redis Cluster. Big record payloads never
pass through Lua on the experience path (see RESERVE_LUA)."""

# Two ways to append, both bounded by capacity (undelivered + reserved <= capacity, where
# undelivered = XLEN - entries pending in the group: a consumer that holds delivered records
# until its checkpoint does not stall the producers; the stream holds at most capacity +
# what consumers hold):
# - RESERVE_LUA then a pipeline of plain XADDs + ZREM of the reservation (experience:
#   large records; passing them through Lua would double the cost of a put);
# - PUT_LUA, which checks, dedups and appends in one script (prompts: small records that
#   must be queued once per epoch).

# KEYS[1] stream, KEYS[2] reservations (zset: member "n:token", score = expiry ms).
# ARGV: capacity, n, member, ttl ms, group. Expired reservations (a producer that died between
# reserving and appending) are dropped first. Returns {n, depth} or {-1, depth} when full.
RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  held = held + tonumber(string.match(member, '^(%d+):'))
end
local depth = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[5])[1] + held
local n = tonumber(ARGV[2])
if depth + n > tonumber(ARGV[1]) then return {-1, depth} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
return {n, depth + n}
"""
RESERVE_TTL_MS = 30_000

# KEYS[1] stream, KEYS[2] set of members already queued, KEYS[3] reservations.
# ARGV: capacity, k = field pairs per record, group, then per record: member, k pairs.
# All-or-nothing: appends every record whose member is new (and adds the member), or
# none when they would push undelivered + reserved past capacity.
# Returns {appended, depth after} or {-1, depth} when full.
PUT_LUA = """
local cap, k = tonumber(ARGV[1]), tonumber(ARGV[2])
local stride = 1 + 2 * k
local fresh, taken = {}, {}
for base = 4, #ARGV, stride do
  local member = ARGV[base]
  if not taken[member] and redis.call('SISMEMBER', KEYS[2], member) == 0 then
    taken[member] = true
    fresh[#fresh + 1] = base
  end
end
local depth = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[3])[1]
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  depth = depth + tonumber(string.match(member, '^(%d+):'))
end
if #fresh > 0 and depth + #fresh > cap then return {-1, depth} end
for _, base in ipairs(fresh) do
  redis.call('SADD', KEYS[2], ARGV[base])
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, base + 1, base + 2 * k))
end
return {#fresh, depth + #fresh}
"""

# KEYS[1] stream, KEYS[2] seen hash, KEYS[3] dead-letter stream, KEYS[4] outcomes hash.
# ARGV: group, commit token, dead maxlen, #commits, #drops, #dead, then
#   commits: entry id, sample id   (mark sample used unless another token holds it)
#   drops:   entry id, reason      (ack and delete)
#   dead:    entry id, reason, detail, raw, consumer   (copy to dead-letter, ack, delete)
# Every entry this call deletes from the stream is counted in the outcomes hash under why it
# left: "committed" (a commit holding its sample), "duplicate" (a commit another token beat),
# the drop's reason, or "dead:<reason>". Counted only when this call's XDEL removed it, so the
# sum of the hash plus XLEN is every entry ever added, across crashes and retries.
# Returns one flag per commit: 1 = this token holds the sample (now or from a retried
# call), 0 = another commit used it first. Idempotent, so safe to retry.
SETTLE_LUA = """
local group, token, maxlen = ARGV[1], ARGV[2], ARGV[3]
local nc, nd, nx = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ids, why, flags, i = {}, {}, {}, 7
for j = 1, nc do
  if redis.call('HSETNX', KEYS[2], ARGV[i + 1], token) == 1
      or redis.call('HGET', KEYS[2], ARGV[i + 1]) == token then
    flags[j] = 1
    why[#ids + 1] = 'committed'
  else
    flags[j] = 0
    why[#ids + 1] = 'duplicate'
  end
  ids[#ids + 1] = ARGV[i]
  i = i + 2
end
for j = 1, nd do
  why[#ids + 1] = ARGV[i + 1]
  ids[#ids + 1] = ARGV[i]
  i = i + 2
end
for j = 1, nx do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', 'reason', ARGV[i + 1],
    'detail', ARGV[i + 2], 'r', ARGV[i + 3], 'consumer', ARGV[i + 4],
    'source', KEYS[1], 'source_id', ARGV[i])
  why[#ids + 1] = 'dead:' .. ARGV[i + 1]
  ids[#ids + 1] = ARGV[i]
  i = i + 5
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ids))
  for k, id in ipairs(ids) do
    if redis.call('XDEL', KEYS[1], id) == 1 then
      redis.call('HINCRBY', KEYS[4], why[k], 1)
    end
  end
end
return flags
"""

# KEYS[1] stream. ARGV: group, consumer, entry ids. Resets the idle time of the entries
# this consumer still owns (a lease renewal); never takes one another consumer reclaimed.
TOUCH_LUA = """
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then owned[#owned + 1] = ARGV[i] end
end
if #owned > 0 then
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(owned), 'JUSTID')
end
return #owned
"""

# Admission of generation (buffer/pacing.py: the staleness rule, AReaL's).
# KEYS[1] pacing hash (the learner's version, max_policy_lag, batch_size, held, finished),
# KEYS[2] tickets (zset: member "n:replica:token", score = expiry ms), KEYS[3] experience stream.
# ARGV: replica version w, want, granularity g, member suffix, ttl ms.
# Outstanding O = sum(tickets) + XLEN - held; grant = the largest multiple of g <= want with
# O + grant <= (L + 1 - (v - min(w, v))) * B. Returns {grant, budget, v, stale}: grant -1 = no
# learner state yet, -2 = the learner finished; stale = 1 when the replica is more than L behind.
ADMIT_LUA = """
local st = redis.call('HMGET', KEYS[1], 'version', 'max_policy_lag', 'batch_size', 'held', 'finished')
if not st[1] then return {-1, 0, 0, 0} end
local v = tonumber(st[1])
if st[5] == '1' then return {-2, 0, v, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want, g = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local grant, budget, stale = want, -1, 0
if st[2] ~= 'none' then
  local lag, b = tonumber(st[2]), tonumber(st[3])
  local behind = v - math.min(tonumber(ARGV[1]), v)
  local out = redis.call('XLEN', KEYS[3]) - tonumber(st[4] or '0')
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    out = out + tonumber(string.match(m, '^(%d+):'))
  end
  budget = (lag + 1 - behind) * b - out
  if behind > lag then stale = 1 end
  grant = math.min(want, math.floor(budget / g) * g)
end
if grant <= 0 then return {0, budget, v, stale} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), grant .. ':' .. ARGV[4])
return {grant, budget, v, 0}
"""
