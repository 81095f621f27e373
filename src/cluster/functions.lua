#!lua name=fastgate_v1
-- FastGate's shared state, one atomic call per decision, on Redis's clock.
-- Function names carry their version: a node of a later release loads its
-- own library beside this one, so a rolling upgrade never calls new code
-- with old arguments. Change a function's arguments only in a new version.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Drop a token log's entries older than `cutoff`; returns the tokens left.
local function expire_tokens(log, amounts, cutoff)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  local total = tonumber(redis.call('HGET', amounts, '#total') or '0')
  if #old > 0 then
    for _, id in ipairs(old) do
      total = total - tonumber(redis.call('HGET', amounts, id) or '0')
      redis.call('HDEL', amounts, id)
    end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    if total < 0 then total = 0 end
    redis.call('HSET', amounts, '#total', total)
  end
  return total
end

-- Milliseconds until the log frees enough tokens for `cost` under `limit`.
local function tokens_wait(log, amounts, total, cost, limit, window, now)
  local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    total = total - tonumber(redis.call('HGET', amounts, entries[i]) or '0')
    if total + cost <= limit then
      return tonumber(entries[i + 1]) + window - now
    end
  end
  return window
end

-- Check every limit of one request and, only if all allow it, take them.
-- ARGV: request id, window ms, count of limits, then per limit: kind, limit,
-- cost. Kinds and their KEYS, in order:
--   r  requests in the rolling window: one sorted set (the log);
--   t  tokens in the rolling window: the log and its amounts hash
--      (cost = tokens reserved; settled by fastgate_settle_v1);
--   q  tokens per quota period: one counter (cost ignored: the quota is
--      exhausted once used >= limit; usage is added when settled).
-- Returns {0} when admitted, else {1, index of the refusing limit, wait ms}.
local function admit(keys, args)
  local now = now_ms()
  local id, window, n = args[1], tonumber(args[2]), tonumber(args[3])
  local cutoff = now - window
  local k = 1
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
      local log, amounts = keys[k], keys[k + 1]
      k = k + 2
      local total = expire_tokens(log, amounts, cutoff)
      if cost > limit then cost = limit end
      if total + cost > limit then
        return {1, i, tokens_wait(log, amounts, total, cost, limit, window, now)}
      end
      take[#take + 1] = {'t', log, amounts, cost}
    else
      local counter = keys[k]
      k = k + 1
      local used = tonumber(redis.call('GET', counter) or '0')
      if used >= limit then
        return {1, i, 0}
      end
    end
  end
  for _, t in ipairs(take) do
    redis.call('ZADD', t[2], now, id)
    redis.call('PEXPIRE', t[2], window)
    if t[1] == 't' then
      redis.call('HSET', t[3], id, t[4])
      redis.call('HINCRBY', t[3], '#total', t[4])
      redis.call('PEXPIRE', t[3], window)
    end
  end
  return {0}
end

-- One request's settlement, its keys from `k` and arguments from `a`;
-- returns where the next request's begin.
local function settle_one(keys, args, k, a)
  local id, n = args[a], tonumber(args[a + 1])
  a = a + 2
  for _ = 1, n do
    local kind, tokens, expiry = args[a], tonumber(args[a + 1]), args[a + 2]
    a = a + 3
    if kind == 't' then
      local amounts = keys[k + 1]
      k = k + 2
      local reserved = redis.call('HGET', amounts, id)
      if reserved then
        redis.call('HSET', amounts, id, tokens)
        redis.call('HINCRBY', amounts, '#total', tokens - tonumber(reserved))
      end
    else
      local counter = keys[k]
      k = k + 1
      if tokens > 0 then
        redis.call('INCRBY', counter, tokens)
      end
      redis.call('PEXPIREAT', counter, expiry)
    end
  end
  return k, a
end

-- Replace requests' token reservations with what they really used (a
-- batch: settlements are not urgent, and one call for many is cheaper).
-- ARGV: count of requests, then per request: its id, count of limits, and
-- per limit: kind, tokens, expiry. KEYS, request after request, as for
-- admit: t takes the log and amounts (expiry unused; an entry already out
-- of the window is left out), q its counter (expiry = Unix ms at which the
-- counter may go, past the quota period's end).
local function settle(keys, args)
  local k, a = 1, 2
  for _ = 1, tonumber(args[1]) do
    k, a = settle_one(keys, args, k, a)
  end
  return 0
end

-- A pool key's state as one node saw it change. KEYS: the state hash.
-- ARGV: channel, field (pool/key), payload. Stored with Redis's time so a
-- resync can age the relative deadlines inside the payload.
local function key_state(keys, args)
  local now = now_ms()
  redis.call('HSET', keys[1], args[2], now .. '|' .. args[3])
  redis.call('PUBLISH', args[1], args[3])
  return now
end

-- Every stored key state and Redis's time now, for a resync.
local function key_states(keys, args)
  return {now_ms(), redis.call('HGETALL', keys[1])}
end

-- A node's heartbeat. KEYS: the node set. ARGV: node id, ttl ms.
-- Returns the count of nodes seen within the ttl.
local function heartbeat(keys, args)
  local now = now_ms()
  redis.call('ZADD', keys[1], now, args[1])
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now - tonumber(args[2]))
  return redis.call('ZCARD', keys[1])
end

-- Take one of a pool key's `cap` in-flight slots across the cluster, held
-- until released or for `ttl` ms (a node that died mid-request).
-- KEYS: the key's lease set. ARGV: lease id, cap, ttl ms. Returns 1 when taken.
local function lease(keys, args)
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now)
  if redis.call('ZCARD', keys[1]) >= tonumber(args[2]) then
    return 0
  end
  redis.call('ZADD', keys[1], now + tonumber(args[3]), args[1])
  redis.call('PEXPIRE', keys[1], tonumber(args[3]))
  return 1
end

-- Give a slot back. KEYS: the lease set. ARGV: lease id.
local function release(keys, args)
  return redis.call('ZREM', keys[1], args[1])
end

redis.register_function('fastgate_admit_v1', admit)
redis.register_function('fastgate_lease_v1', lease)
redis.register_function('fastgate_release_v1', release)
redis.register_function('fastgate_settle_v1', settle)
redis.register_function('fastgate_key_state_v1', key_state)
redis.register_function('fastgate_key_states_v1', key_states)
redis.register_function('fastgate_heartbeat_v1', heartbeat)
