-- Count fraud labels into their terminal's hour; a label seen before counts once.
-- KEYS: per label, its terminal key then its label-dedupe key.
-- ARGV: ttl_ms, ring_days, then per label: hour (hours since the epoch), is_fraud ('1'/'0').
-- Returns the number of new fraud labels counted.
-- Terminal counters: see terminal_ring.lua. A label more than a ring late is not counted.

ttl = tonumber(ARGV[1])
ring = tonumber(ARGV[2])
local counted = 0
for e = 1, #KEYS / 2 do
  local tkey = KEYS[2 * e - 1]
  local lkey = KEYS[2 * e]
  local hour = tonumber(ARGV[2 * e + 1])
  local is_fraud = ARGV[2 * e + 2]
  if redis.call('SET', lkey, is_fraud, 'NX', 'PX', ttl) and is_fraud == '1' then
    local day = math.floor(hour / 24)
    if count_in_ring(tkey, read_day_slots(tkey), day, hour - day * 24, 0, 1) then
      counted = counted + 1
    end
  end
end
return counted
