-- Terminal counters, shared by apply_transactions.lua and apply_labels.lua (the caller puts
-- this file in front of each script, which sets `ring` (days) and `ttl` (ms) from ARGV).
--
-- A terminal's counters are one string of `ring` 12-byte day slots <i4 day, i4 transactions,
-- i4 frauds> (slot = day % ring; a slot holding another day counts as empty), then as many
-- 192-byte hour slots, the same days' 24 hours of <i4 transactions, i4 frauds>. Only the
-- ranges needed are read (GETRANGE): reading the whole 13 KB string costs ~15 us in a script.

local SLOT = 12
local HOUR_SLOT = 192
local ring, ttl
-- The unpack format of n hour slots, built when first needed: building all 24 up front cost
-- ~10 us a call (measured), which a Redis Cluster pays on every one of its per-slot calls.
local hour_fmt = {}
local function hours_format(n)
  local fmt = hour_fmt[n]
  if not fmt then
    fmt = '<' .. string.rep('i4', 2 * n)
    hour_fmt[n] = fmt
  end
  return fmt
end

-- Keys set aside as corrupt by this call (returned to the caller, which logs and counts them).
local quarantined = {}

-- Rename a key that is not what this store writes (another type, another size) out of the
-- way, kept for inspection as long as any state: the events it concerns start afresh.
local function quarantine(key)
  redis.call('RENAME', key, key .. ':quarantined')
  redis.call('PEXPIRE', key .. ':quarantined', ttl)
  quarantined[#quarantined + 1] = key
end

-- A string key's value, or nil when missing; a key of another type, or whose length is not
-- `size` (or a multiple of `multiple_of`), is quarantined and reads as missing. Returns the
-- value and whether the key was quarantined.
local function sound_get(key, size, multiple_of)
  local ok, value = pcall(redis.call, 'GET', key)
  if not ok then
    quarantine(key)
    return nil, true
  end
  if not value then return nil, false end
  if (size and #value ~= size) or (multiple_of and #value % multiple_of ~= 0) then
    quarantine(key)
    return nil, true
  end
  return value, false
end

-- Whether a terminal's counters are sound (missing, or a string of the ring's size);
-- corrupt ones are quarantined, and the terminal starts afresh.
local function sound_terminal(tkey)
  local ok, len = pcall(redis.call, 'STRLEN', tkey)
  if ok and (len == 0 or len == ring * (SLOT + HOUR_SLOT)) then return true end
  quarantine(tkey)
  return false
end

-- Offset of hour `hod` of the day in `slot`.
local function hour_offset(slot, hod)
  return ring * SLOT + slot * HOUR_SLOT + hod * 8
end

-- The terminal's day slots; a missing terminal gets an empty ring (all zeros), created
-- unless `peek` (a read that writes nothing).
local function read_day_slots(tkey, peek)
  local days = redis.call('GETRANGE', tkey, 0, ring * SLOT - 1)
  if #days < ring * SLOT then
    if not peek then
      redis.call('SETRANGE', tkey, hour_offset(ring, 0) - 1, '\0')
      redis.call('PEXPIRE', tkey, ttl)
    end
    days = string.rep('\0', ring * SLOT)
  end
  return days
end

-- Transaction and fraud counts of hours from_h..to_h of a day its slot holds.
local function read_hours(tkey, day, from_h, to_h)
  if to_h < from_h then return 0, 0 end
  local n = to_h - from_h + 1
  local at = hour_offset(day % ring, from_h)
  local v = { struct.unpack(hours_format(n), redis.call('GETRANGE', tkey, at, at + 8 * n - 1)) }
  local tx, fr = 0, 0
  for j = 1, 2 * n, 2 do
    tx = tx + v[j]
    fr = fr + v[j + 1]
  end
  return tx, fr
end

-- Add d_tx transactions and d_fr frauds to hour `hod` of `day` (`days`: the day slots as
-- read). A slot of an older day starts afresh; one of a newer day means the count is more
-- than a ring late: nothing is counted and false is returned.
local function count_in_ring(tkey, days, day, hod, d_tx, d_fr)
  local slot = day % ring
  local s_day, s_tx, s_fr = struct.unpack('<i4i4i4', days, slot * SLOT + 1)
  local cell = hour_offset(slot, hod)
  if s_day < day then
    redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, d_tx, d_fr))
    redis.call('SETRANGE', tkey, hour_offset(slot, 0), string.rep('\0', hod * 8)
      .. struct.pack('<i4i4', d_tx, d_fr) .. string.rep('\0', (23 - hod) * 8))
  elseif s_day == day then
    local c_tx, c_fr = struct.unpack('<i4i4', redis.call('GETRANGE', tkey, cell, cell + 7))
    redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, s_tx + d_tx, s_fr + d_fr))
    redis.call('SETRANGE', tkey, cell, struct.pack('<i4i4', c_tx + d_tx, c_fr + d_fr))
  else
    return false
  end
  redis.call('PEXPIRE', tkey, ttl)
  return true
end

-- Move a terminal hour's fraud count by delta (a verdict or its correction), never below 0
-- nor above the hour's transactions. Only an hour whose day the ring still holds changes: a
-- terminal that forgot the transaction has nothing to correct.
local function adjust_fraud(tkey, day, hod, delta)
  local days = read_day_slots(tkey, true)
  local slot = day % ring
  local s_day, s_tx, s_fr = struct.unpack('<i4i4i4', days, slot * SLOT + 1)
  if s_day ~= day then return false end
  local cell = hour_offset(slot, hod)
  local c_tx, c_fr = struct.unpack('<i4i4', redis.call('GETRANGE', tkey, cell, cell + 7))
  local n_fr = math.min(math.max(c_fr + delta, 0), c_tx)
  redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, s_tx, s_fr + n_fr - c_fr))
  redis.call('SETRANGE', tkey, cell, struct.pack('<i4i4', c_tx, n_fr))
  redis.call('PEXPIRE', tkey, ttl)
  return true
end
