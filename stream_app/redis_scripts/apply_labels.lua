-- Count fraud labels into their terminal's day; a label seen before counts once.
-- KEYS: per label, its terminal key then its label-dedupe key.
-- ARGV: ttl_ms, ring_days, then per label: day, is_fraud ('1' or '0').
-- Returns the number of new fraud labels counted.
-- The terminal ring is described in apply_transactions.lua. A label for a day whose slot
-- already holds a newer day (more than a ring late) is not counted.

local SLOT = 12
local ttl = tonumber(ARGV[1])
local ring = tonumber(ARGV[2])
local counted = 0
for e = 1, #KEYS / 2 do
  local tkey = KEYS[2 * e - 1]
  local lkey = KEYS[2 * e]
  local day = tonumber(ARGV[2 * e + 1])
  local is_fraud = ARGV[2 * e + 2]
  if redis.call('SET', lkey, is_fraud, 'NX', 'PX', ttl) and is_fraud == '1' then
    local slot = day % ring
    local ring_blob = redis.call('GET', tkey) or ''
    local s_day, s_tx, s_fr = day, 0, 0
    if #ring_blob >= ring * SLOT then
      s_day, s_tx, s_fr = struct.unpack('<i4i4i4', ring_blob, slot * SLOT + 1)
    end
    if s_day ~= day then s_tx, s_fr = 0, 0 end
    if s_day <= day then
      redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, s_tx, s_fr + 1))
      if #ring_blob < ring * SLOT then
        redis.call('SETRANGE', tkey, ring * SLOT - 1, '\0')
      end
      redis.call('PEXPIRE', tkey, ttl)
      counted = counted + 1
    end
  end
end
return counted
