-- Claim pending labels past their deadline (put after terminal_ring.lua and ledger.lua).
-- KEYS: the pending-label queue. ARGV: now_ms, lease_ms, limit (transactions).
-- Returns: a flat list { pending key, source, ... }, one pair per label waiting (a
-- transaction may have several, naming it differently). Each claimed transaction's deadline
-- moves lease_ms ahead, so a caller that dies before dropping it hands it out again later.

local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, pkey in ipairs(due) do
  local ok, fields = pcall(redis.call, 'HVALS', pkey)
  if ok and #fields > 0 then
    redis.call('ZADD', KEYS[1], now + lease, pkey)
    for _, value in ipairs(fields) do
      out[#out + 1] = pkey
      out[#out + 1] = string.sub(value, 10)
    end
  else
    redis.call('ZREM', KEYS[1], pkey)  -- applied, expired or not ours: nothing to hand out
  end
end
return out
