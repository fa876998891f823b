-- Terminal counters, shared by apply_transactions.lua and apply_labels.lua (the caller puts
-- this file in front of each script, which sets `ring` (days) and `ttl` (ms) from ARGV).
--
-- A terminal's counters are one string of `ring` 12-byte day slots <i4 day, i4 transactions,
-- i4 frauds> (slot = day % ring; a slot holding another day counts as empty), then as many
-- 192-byte hour slots, the same days' 24 hours of <i4 transactions, i4 frauds>. A string of
-- any other length (another layout) is replaced by an empty ring.

local SLOT = 12
local HOUR_SLOT = 192
local ring, ttl

local function ring_layout()
  return ring * SLOT, ring * SLOT + ring * HOUR_SLOT
end

-- The terminal's ring, replaced by an empty one when missing or of another layout.
local function load_ring(tkey)
  local _, size = ring_layout()
  local ring_blob = redis.call('GET', tkey)
  if not ring_blob or #ring_blob ~= size then
    ring_blob = string.rep('\0', size)
    redis.call('SET', tkey, ring_blob, 'PX', ttl)
  end
  return ring_blob
end

-- Add d_tx transactions and d_fr frauds to hour `hod` of `day` in a terminal's ring (read as
-- ring_blob). A slot of an older day starts afresh; one of a newer day means the count is
-- more than a ring late: nothing is counted and false is returned.
local function count_in_ring(tkey, ring_blob, day, hod, d_tx, d_fr)
  local hours_at = ring_layout()
  local slot = day % ring
  local s_day, s_tx, s_fr = struct.unpack('<i4i4i4', ring_blob, slot * SLOT + 1)
  local hours = hours_at + slot * HOUR_SLOT
  if s_day < day then
    redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, d_tx, d_fr))
    redis.call('SETRANGE', tkey, hours, string.rep('\0', hod * 8)
      .. struct.pack('<i4i4', d_tx, d_fr) .. string.rep('\0', (23 - hod) * 8))
  elseif s_day == day then
    local c_tx, c_fr = struct.unpack('<i4i4', ring_blob, hours + hod * 8 + 1)
    redis.call('SETRANGE', tkey, slot * SLOT, struct.pack('<i4i4i4', day, s_tx + d_tx, s_fr + d_fr))
    redis.call('SETRANGE', tkey, hours + hod * 8, struct.pack('<i4i4', c_tx + d_tx, c_fr + d_fr))
  else
    return false
  end
  redis.call('PEXPIRE', tkey, ttl)
  return true
end
