-- Count fraud labels into their terminal's per-day counters; a label seen before counts once.
-- KEYS: per label, its terminal key then its label-dedupe key.
-- ARGV: ttl_ms, then per label: day, is_fraud ('1' or '0').
-- Returns the number of new fraud labels counted.

local ttl = tonumber(ARGV[1])
local counted = 0
for e = 1, #KEYS / 2 do
  local tkey = KEYS[2 * e - 1]
  local lkey = KEYS[2 * e]
  local day = ARGV[2 * e]
  local is_fraud = ARGV[2 * e + 1]
  if redis.call('SET', lkey, is_fraud, 'NX', 'PX', ttl) then
    if is_fraud == '1' then
      redis.call('HINCRBY', tkey, 'f' .. day, 1)
      redis.call('PEXPIRE', tkey, ttl)
      counted = counted + 1
    end
  end
end
return counted
