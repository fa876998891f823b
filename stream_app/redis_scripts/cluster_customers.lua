-- Redis Cluster, step 2 of a micro-batch: the events of one customer shard (one hash slot),
-- in order, atomically. See stream_app/redis_cluster_state.py for the protocol. Put after
-- terminal_ring.lua, state_header.lua and customer_history.lua.
--
-- KEYS: the shard's outbox key and batch-number key. The customer keys are the shard's key
--       prefix and the customer id: built here rather than passed, as the cluster client
--       would hash every key passed to check they share a slot (they do: the prefix holds
--       the shard's hash tag).
-- ARGV: the state header, then
--   * the shard's customer key prefix ('{prefix}:{tag}:c:');
--   * one string packing every event as <8-byte tx hash, i8 time_ms, d amount,
--     i4 x 2n terminal window counts (step 1), i4 length, customer id, i4 length,
--     terminal id>;
--   * trim_upto: outbox entries of batches up to this number are counted in their
--     terminals (the caller saw it done): they are dropped.
-- Returns: { outcome per event ('0' new, '1' duplicate, 'C' conflicting duplicate), then per event the two parts of its
--            retained history (stored, new record), then the outbox after this call }.
--
-- A new event is appended to its customer's history and, in the same atomic call, its
-- terminal increment is appended to the shard's outbox as <i8 batch, i4 hour, i4 length,
-- terminal id>: the increment cannot be lost between this call and step 3, and step 3
-- applies a (shard, batch) at most once per terminal shard. The batch number grows with
-- time (microseconds of the server clock, at least the last one + 1), so it keeps growing
-- even after its key expired.

local qkey, bkey = KEYS[1], KEYS[2]
local key_prefix = ARGV[argv_next]
local packed = ARGV[argv_next + 1]
local trim_upto = tonumber(ARGV[argv_next + 2])
local counts_len = 8 * n_windows

local outbox = redis.call('GET', qkey) or ''
local outbox_changed = false
if trim_upto > 0 and #outbox > 0 then
  local pos = 1
  while pos <= #outbox do
    local b, _, len = struct.unpack('<i8i4i4', outbox, pos)
    if b > trim_upto then break end
    pos = pos + 16 + len
  end
  if pos > 1 then
    outbox = string.sub(outbox, pos)
    outbox_changed = true
  end
end

local batch = nil
local entries = {}
local flags = {}
local out = { '' }
local pos = 1
local e = 0
while pos <= #packed do
  e = e + 1
  local h = string.sub(packed, pos, pos + 7)
  local t, amount = struct.unpack('<i8d', packed, pos + 8)
  local counts = string.sub(packed, pos + 24, pos + 23 + counts_len)
  pos = pos + 24 + counts_len
  local c_len = struct.unpack('<i4', packed, pos)
  local ckey = key_prefix .. string.sub(packed, pos + 4, pos + 3 + c_len)
  pos = pos + 4 + c_len
  local t_len = struct.unpack('<i4', packed, pos)
  local tid = string.sub(packed, pos + 4, pos + 3 + t_len)
  pos = pos + 4 + t_len
  local blob, reset = sound_get(ckey, nil, REC)
  blob = blob or ''
  local dup_at = find_record(blob, h)
  if dup_at and string.sub(blob, (dup_at - 1) * REC + 1, (dup_at - 1) * REC + 16)
      ~= struct.pack('<i8d', t, amount) then
    -- The id of another transaction (time or amount differ): not scored, a placeholder.
    flags[e] = 'C'
    out[2 * e] = ''
    out[2 * e + 1] = struct.pack('<i8d', t, amount) .. h .. counts
  elseif dup_at then
    flags[e] = '1'
    out[2 * e] = string.sub(blob, 1, dup_at * REC)
    out[2 * e + 1] = ''
  else
    flags[e] = '0'
    if not batch then
      local now = redis.call('TIME')
      batch = math.max(tonumber(redis.call('GET', bkey) or '0') + 1,
        tonumber(now[1]) * 1000000 + tonumber(now[2]))
      redis.call('SET', bkey, string.format('%.0f', batch), 'PX', ttl)
    end
    local rec = struct.pack('<i8d', t, amount) .. h .. counts
    out[2 * e] = append_record(ckey, blob, t, rec)
    out[2 * e + 1] = rec
    entries[#entries + 1] = struct.pack('<i8i4i4', batch, math.floor(t / 3600000), #tid) .. tid
  end
end
if #entries > 0 then
  outbox = outbox .. table.concat(entries)
  outbox_changed = true
end
if outbox_changed then
  if #outbox > 0 then
    redis.call('SET', qkey, outbox, 'PX', ttl)
  else
    redis.call('DEL', qkey)
  end
end
out[1] = table.concat(flags)
out[#out + 1] = outbox
return out
