-- Redis Cluster, steps 1 and 3 of a micro-batch on one terminal shard (one hash slot),
-- atomically: count the increments of customer-shard outboxes not counted here yet, then
-- read the window counts events will be scored with. See stream_app/state/redis_cluster.py.
-- Put after terminal_ring.lua, state_header.lua and terminal_windows.lua.
--
-- KEYS: the shard's counted-batches key (a hash: customer shard -> last batch counted
--       here). Terminal keys are the shard's key prefix and the terminal id, built here (see
--       cluster_customers.lua for why).
-- ARGV: the state header, then
--   * the shard's terminal key prefix ('{prefix}:{tag}:t2:');
--   * increments: one string of <i4 customer shard, i8 batch, i4 hour, i4 kind (0 a
--     transaction, -1 or 1 a fraud verdict's change), i4 length, terminal id>, batches in
--     increasing order per customer shard;
--   * reads: one string of <i8 time_ms, i4 length, terminal id>.
-- Returns: one string, per read its i4 x 2n window counts.
--
-- A (customer shard, batch) at or below the one recorded for its customer shard was
-- counted here before (a retry, a redelivery, another worker flushing the same outbox):
-- it is skipped whole, which makes counting idempotent.

local wkey = KEYS[1]
local key_prefix = ARGV[argv_next]
local increments = ARGV[argv_next + 1]
local reads = ARGV[argv_next + 2]

local counted = {}  -- customer shard -> last batch counted here, before this call
local newest = {}
local pos = 1
while pos <= #increments do
  local shard, batch, hour, kind, len = struct.unpack('<i4i8i4i4i4', increments, pos)
  local tkey = key_prefix .. string.sub(increments, pos + 24, pos + 23 + len)
  pos = pos + 24 + len
  if counted[shard] == nil then
    counted[shard] = tonumber(redis.call('HGET', wkey, shard) or '0')
  end
  if batch > counted[shard] then
    local day = math.floor(hour / 24)
    if sound_terminal(tkey) then
      if kind == 0 then
        count_in_ring(tkey, read_day_slots(tkey, false), day, hour - day * 24, 1, 0)
      else
        adjust_fraud(tkey, day, hour - day * 24, kind)
      end
    end
    if batch > (newest[shard] or 0) then newest[shard] = batch end
  end
end
local changed = false
for shard, batch in pairs(newest) do
  redis.call('HSET', wkey, shard, string.format('%.0f', batch))
  changed = true
end
if changed then redis.call('PEXPIRE', wkey, ttl) end

local out = {}
pos = 1
while pos <= #reads do
  local t, len = struct.unpack('<i8i4', reads, pos)
  local sums = window_sums(key_prefix .. string.sub(reads, pos + 12, pos + 11 + len), t, true)
  pos = pos + 12 + len
  out[#out + 1] = struct.pack(counts_fmt, unpack(sums))
end
return table.concat(out)
