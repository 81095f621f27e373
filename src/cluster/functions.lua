#!lua name=fastgate_v3
-- FastGate's shared state, one atomic call per decision, on Redis's clock.
--
-- Versions. Function names carry their library's version: a node of a later
-- release loads its own library beside the older one, so a rolling upgrade
-- never calls new code with old arguments. Change a function's arguments
-- only in a new version.
--   fastgate_v1  keys `fg:*`, the client's request id as log member (gone:
--                not idempotent, and a repeated id was a free pass).
--   fastgate_v2  keys `fg:{fg}:*` (one hash tag: every call's keys share one
--                slot, so it runs on Redis Cluster / Valkey cluster; all of
--                FastGate's state sits on one shard), members are op ids the
--                nodes mint (`node:boot:counter`), token windows are fixed
--                buckets, settlements are sequenced per node (exactly once),
--                key states are versioned and trimmed, every key has a TTL.
--   fastgate_v3  v2's keys and functions, plus budgets in money (kind `b`:
--                admission reserves, settlement swaps the reservation for
--                the cost) and a settlement that answers each budget
--                counter's value (threshold alerts). v2 and v3 nodes share
--                every v2 counter; budgets are v3's alone.
-- Nodes of v1 and v2 do not share counters (different keys): upgrade every
-- node of a cluster together, or accept one window of per-release limits.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Token windows: the window in 20 fixed buckets. A bucket's tokens count
-- until the whole bucket has left the window, so tokens are held up to one
-- bucket longer than the window, never shorter: never more admitted.
local BUCKETS = 20

local function bucket_width(window)
  return math.max(1, math.ceil(window / BUCKETS))
end

-- A bucket hash also keeps two bookkeeping fields: `s`, the sum of its
-- buckets, and `o`, the oldest bucket in it. While bucket `o` is still in
-- the window every bucket is, and `s` is the live total: an admission
-- reads two fields, not the whole hash (the hash is rewalked at most once
-- per bucket width, or on a refusal).
local SUM, OLDEST = 's', 'o'

-- Sum a bucket hash's live buckets (dropping the dead ones and restating
-- `s` and `o`). Returns the total and the live buckets (unsorted), as
-- {index, tokens}.
local function live_buckets(hash, width, window, now)
  local all = redis.call('HGETALL', hash)
  local total, live, dead, oldest = 0, {}, {}, math.floor(now / width)
  for i = 1, #all, 2 do
    local name = all[i]
    if name ~= SUM and name ~= OLDEST then
      local b = tonumber(name)
      local n = tonumber(all[i + 1]) or 0
      if b == nil or (b + 1) * width + window <= now then
        dead[#dead + 1] = name
      else
        total = total + n
        live[#live + 1] = {b, n}
        if b < oldest then oldest = b end
      end
    end
  end
  if #dead > 0 then
    redis.call('HDEL', hash, unpack(dead))
  end
  if #live == 0 then
    -- Nothing left to count: no key without buckets (or a TTL) stays.
    if #all > 0 then redis.call('DEL', hash) end
  else
    redis.call('HSET', hash, SUM, total, OLDEST, oldest)
  end
  return total, live
end

-- The live total of a bucket hash: its `s` while its oldest bucket is
-- live, else a walk of the hash.
local function window_total(hash, width, window, now)
  local kept = redis.call('HMGET', hash, SUM, OLDEST)
  local sum, oldest = tonumber(kept[1]), tonumber(kept[2])
  if sum and oldest and (oldest + 1) * width + window > now then
    return sum
  end
  return (live_buckets(hash, width, window, now))
end

-- Check every limit of one request and, only if all allow it, take them.
-- KEYS[1]: the op's marker (used only when no request limit is checked).
-- ARGV: op id, window ms, count of limits, then per limit: kind, limit,
-- cost. Kinds and their KEYS, in order after the marker:
--   r  requests in the rolling window: a sorted set of op ids (only
--      admitted ops are added: at most `limit` live members);
--   t  tokens in the window: a hash of bucket -> tokens (cost = tokens
--      reserved, settled by fastgate_settle_v3 in the same bucket);
--   q  tokens per quota period: one counter (cost ignored: the quota is
--      exhausted once used >= limit; usage is added when settled).
--   b  money per budget period, in micro-units: one counter of spend plus
--      reservations; refused once it reaches the limit, else the cost (the
--      reservation) is added, and swapped for the real cost when settled.
-- Returns {0, bucket} when admitted, else {1, index of the refusing limit,
-- wait ms}.
local function admit(keys, args)
  local now = now_ms()
  local id, window, n = args[1], tonumber(args[2]), tonumber(args[3])
  local width = bucket_width(window)
  -- A retried admit answers as the first did. With a request limit the
  -- op's own log entry says so (it stays as long as it counts); only
  -- without one is the marker key needed.
  local log
  for i = 1, n do
    if args[1 + 3 * i] == 'r' then
      log = keys[1 + i]
      break
    end
  end
  if log then
    local at = redis.call('ZSCORE', log, id)
    if at then
      return {0, math.floor(tonumber(at) / width)}
    end
  else
    local seen = redis.call('GET', keys[1])
    if seen then
      return {0, tonumber(seen)}
    end
  end
  local bucket = math.floor(now / width)
  local cutoff = now - window
  local k = 2
  local take = {}
  for i = 1, n do
    local kind, limit, cost = args[1 + 3 * i], tonumber(args[2 + 3 * i]), tonumber(args[3 + 3 * i])
    if kind == 'r' then
      local log = keys[k]
      k = k + 1
      redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
      local used = redis.call('ZCARD', log)
      if used + 1 > limit then
        -- The entry whose expiry brings the count under the limit.
        local e = redis.call('ZRANGE', log, used - limit, used - limit, 'WITHSCORES')
        local wait = window
        if e[2] then wait = tonumber(e[2]) + window - now end
        return {1, i, wait}
      end
      take[#take + 1] = {'r', log}
    elseif kind == 't' then
      local hash = keys[k]
      k = k + 1
      local total = window_total(hash, width, window, now)
      if cost > limit then cost = limit end
      if total + cost > limit then
        local live
        total, live = live_buckets(hash, width, window, now)
        -- The oldest buckets whose expiry makes room (sorted only here:
        -- an admission that fits never needs the order).
        table.sort(live, function(x, y) return x[1] < y[1] end)
        local wait = window
        for _, b in ipairs(live) do
          total = total - b[2]
          if total + cost <= limit then
            wait = (b[1] + 1) * width + window - now
            break
          end
        end
        return {1, i, wait}
      end
      take[#take + 1] = {'t', hash, cost}
    else
      local counter = keys[k]
      k = k + 1
      local used = tonumber(redis.call('GET', counter) or '0')
      if used >= limit then
        return {1, i, 0}
      end
      if kind == 'b' and cost > 0 then
        take[#take + 1] = {'b', counter, cost}
      end
    end
  end
  for _, t in ipairs(take) do
    if t[1] == 'r' then
      redis.call('ZADD', t[2], now, id)
      redis.call('PEXPIRE', t[2], window)
    elseif t[1] == 'b' then
      redis.call('INCRBY', t[2], t[3])
      -- The settlement sets the real expiry; a node that dies first
      -- leaves a counter that still goes (after a month and a bit).
      if redis.call('PTTL', t[2]) < 0 then
        redis.call('PEXPIRE', t[2], 2851200000)
      end
    else
      redis.call('HINCRBY', t[2], bucket, t[3])
      redis.call('HINCRBY', t[2], SUM, t[3])
      redis.call('PEXPIRE', t[2], window + 2 * width)
    end
  end
  if not log then
    redis.call('SET', keys[1], bucket, 'PX', window + 2 * width)
  end
  return {0, bucket}
end

-- Settle a batch of finished requests, exactly once: KEYS[1] holds the
-- last batch number applied for this node's process (ARGV[1]); a batch
-- whose number is not above it was applied already (its answer was lost)
-- and changes nothing. ARGV: batch number, window ms, count of requests,
-- then per request: count of limits, and per limit: kind, tokens, reserved,
-- where. KEYS after the first, limit after limit:
--   t  the bucket hash; where = the bucket the admission answered (an
--      adjustment to a bucket already out of the window is left out);
--   q  its counter; where = Unix ms at which the counter may go (past the
--      quota period's end). Reserved is unused.
--   b  its counter; tokens = the cost, reserved = what admission added;
--      where as for q.
-- Returns {1, each b counter's value after it, in order} when applied,
-- {0} when it had been.
local function settle(keys, args)
  local seq = tonumber(args[1])
  local last = tonumber(redis.call('GET', keys[1]) or '0')
  -- Kept a day: a node's batches are replayed in order within an outage.
  redis.call('SET', keys[1], math.max(seq, last), 'PX', 86400000)
  if seq <= last then
    return {0}
  end
  local values = {}
  local now, window = now_ms(), tonumber(args[2])
  local width = bucket_width(window)
  local k, a = 2, 4
  for _ = 1, tonumber(args[3]) do
    local n = tonumber(args[a])
    a = a + 1
    for _ = 1, n do
      local kind, tokens, reserved, where = args[a], tonumber(args[a + 1]), tonumber(args[a + 2]), tonumber(args[a + 3])
      a = a + 4
      local key = keys[k]
      k = k + 1
      if kind == 't' then
        local b = math.floor(where)
        local held = redis.call('HGET', key, b)
        if held and (b + 1) * width + window > now and tokens ~= reserved then
          local change = tokens - reserved
          local left = redis.call('HINCRBY', key, b, change)
          if left < 0 then
            redis.call('HSET', key, b, 0)
            change = change - left
          end
          redis.call('HINCRBY', key, SUM, change)
        end
      elseif kind == 'b' then
        local v = redis.call('INCRBY', key, tokens - reserved)
        if v < 0 then
          redis.call('SET', key, 0)
          v = 0
        end
        redis.call('PEXPIREAT', key, where)
        values[#values + 1] = v
      else
        if tokens > 0 then
          redis.call('INCRBY', key, tokens)
        end
        redis.call('PEXPIREAT', key, where)
      end
    end
  end
  return {1, unpack(values)}
end

-- A pool key's state as one node saw it change, stored only when its
-- version is not older than the stored one (a delayed older state never
-- replaces a newer). KEYS: the state hash, the sorted set of when each was
-- stored. ARGV: channel, field (pool/key), version, payload, keep ms (states
-- older than that are dropped, a few per call). Stored with Redis's time so
-- a resync can age the relative deadlines inside the payload. Returns 1
-- when stored (and published); else the stored state and Redis's time.
local function key_state(keys, args)
  local now = now_ms()
  local version, keep = tonumber(args[3]), tonumber(args[5])
  local stored = redis.call('HGET', keys[1], args[2])
  if stored then
    local v = tonumber(string.match(stored, '^(%d+)|'))
    if v and v >= version then
      -- Not newer: the caller merges what is stored (two nodes can reach
      -- one version apart; neither may overwrite the other's disable).
      return {stored, now}
    end
  end
  redis.call('HSET', keys[1], args[2], version .. '|' .. now .. '|' .. args[4])
  redis.call('ZADD', keys[2], now, args[2])
  local old = redis.call('ZRANGEBYSCORE', keys[2], '-inf', now - keep, 'LIMIT', 0, 100)
  if #old > 0 then
    redis.call('HDEL', keys[1], unpack(old))
    redis.call('ZREM', keys[2], unpack(old))
  end
  redis.call('PEXPIRE', keys[1], keep)
  redis.call('PEXPIRE', keys[2], keep)
  redis.call('PUBLISH', args[1], args[4])
  return 1
end

-- Every stored key state (`version|stored at|payload`) and Redis's time
-- now, for a resync. KEYS: the state hash.
local function key_states(keys, args)
  return {now_ms(), redis.call('HGETALL', keys[1])}
end

-- A node's heartbeat. KEYS: the node set. ARGV: node id, ttl ms.
-- Returns the count of nodes seen within the ttl.
local function heartbeat(keys, args)
  local now = now_ms()
  local ttl = tonumber(args[2])
  redis.call('ZADD', keys[1], now, args[1])
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now - ttl)
  redis.call('PEXPIRE', keys[1], ttl)
  return redis.call('ZCARD', keys[1])
end

-- A lease set holds the slots taken, each op with its expiry as score (>
-- 0), and the ops given back before their take arrived (a take whose
-- answer was lost, released by the node, then delivered late by a stalled
-- connection): a tombstone, scored minus its expiry, so that take takes
-- nothing. Tombstones live as long as a slot could.
local TOMBSTONE_MS = 600000

-- Take one of a pool key's `cap` in-flight slots across the cluster, held
-- until released or for `ttl` ms (a node that died mid-request). Taking a
-- slot the op holds already answers 1 again (a retried call); so does a
-- take arriving after its release (it takes nothing).
-- KEYS: the key's lease set. ARGV: op id, cap, ttl ms. Returns 1 when taken.
local function lease(keys, args)
  local now = now_ms()
  -- Slots past their expiry, and tombstones past theirs.
  redis.call('ZREMRANGEBYSCORE', keys[1], 0, now)
  redis.call('ZREMRANGEBYSCORE', keys[1], '(' .. -now, '(0')
  if redis.call('ZSCORE', keys[1], args[1]) then
    return 1
  end
  if redis.call('ZCOUNT', keys[1], '(0', '+inf') >= tonumber(args[2]) then
    return 0
  end
  redis.call('ZADD', keys[1], now + tonumber(args[3]), args[1])
  local last = redis.call('ZRANGE', keys[1], -1, -1, 'WITHSCORES')
  if redis.call('PTTL', keys[1]) < tonumber(last[2]) - now then
    redis.call('PEXPIREAT', keys[1], tonumber(last[2]))
  end
  return 1
end

-- Give slots back (idempotent: an op's slot goes once); an op holding
-- none is left a tombstone (above). KEYS: the lease set. ARGV: op ids.
-- Returns how many slots were given back.
local function release(keys, args)
  local now = now_ms()
  local given = 0
  local stones = {}
  for _, op in ipairs(args) do
    local at = tonumber(redis.call('ZSCORE', keys[1], op))
    if at == nil then
      stones[#stones + 1] = -(now + TOMBSTONE_MS)
      stones[#stones + 1] = op
    elseif at > 0 then
      redis.call('ZREM', keys[1], op)
      given = given + 1
    end
  end
  if #stones > 0 then
    redis.call('ZADD', keys[1], unpack(stones))
    if redis.call('PTTL', keys[1]) < TOMBSTONE_MS then
      redis.call('PEXPIRE', keys[1], TOMBSTONE_MS)
    end
  end
  return given
end

redis.register_function('fastgate_admit_v3', admit)
redis.register_function('fastgate_lease_v3', lease)
redis.register_function('fastgate_release_v3', release)
redis.register_function('fastgate_settle_v3', settle)
redis.register_function('fastgate_key_state_v3', key_state)
redis.register_function('fastgate_key_states_v3', key_states)
redis.register_function('fastgate_heartbeat_v3', heartbeat)
