-- Count fraud labels into their terminal's hour; a label seen before counts once.
-- KEYS: per label, its terminal key then its label-dedupe key.
-- ARGV: ttl_ms, ring_days, then per label: hour (hours since the epoch), is_fraud ('1'/'0').
-- Returns the number of new fraud labels counted.
-- The terminal ring is described in apply_transactions.lua. A label for a day whose slot
-- already holds a newer day (more than a ring late) is not counted.

local SLOT = 12
local HOUR_SLOT = 192
local ttl = tonumber(ARGV[1])
local ring = tonumber(ARGV[2])
local hours_at = ring * SLOT
local ring_size = hours_at + ring * HOUR_SLOT
local counted = 0
for e = 1, #KEYS / 2 do
  local tkey = KEYS[2 * e - 1]
  local lkey = KEYS[2 * e]
  local hour = tonumber(ARGV[2 * e + 1])
  local is_fraud = ARGV[2 * e + 2]
  if redis.call('SET', lkey, is_fraud, 'NX', 'PX', ttl) and is_fraud == '1' then
    local day = math.floor(hour / 24)
    local hod = hour - day * 24
    local slot = day % ring
    local ring_blob = redis.call('GET', tkey)
    if not ring_blob or #ring_blob ~= ring_size then
      ring_blob = string.rep('\0', ring_size)
      redis.call('SET', tkey, ring_blob, 'PX', ttl)
    end
    local s_day, s_tx, s_fr = struct.unpack('<i4i4i4', ring_blob, slot * SLOT + 1)
    local cell = hours_at + slot * HOUR_SLOT + hod * 8
    if s_day < day then
      redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, 0, 1))
      redis.call('SETRANGE', tkey, hours_at + slot * HOUR_SLOT,
        string.rep('\0', hod * 8) .. struct.pack('<i4i4', 0, 1) .. string.rep('\0', (23 - hod) * 8))
    elseif s_day == day then
      local c_tx, c_fr = struct.unpack('<i4i4', ring_blob, cell + 1)
      redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, s_tx, s_fr + 1))
      redis.call('SETRANGE', tkey, cell, struct.pack('<i4i4', c_tx, c_fr + 1))
    end
    if s_day <= day then
      redis.call('PEXPIRE', tkey, ttl)
      counted = counted + 1
    end
  end
end
return counted
