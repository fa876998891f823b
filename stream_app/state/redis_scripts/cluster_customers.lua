-- Redis Cluster, step 2 of a micro-batch: the events of one customer shard (one hash slot),
-- in order, atomically. See stream_app/state/redis_cluster.py for the protocol. Put after
-- terminal_ring.lua, state_header.lua, customer_history.lua, ledger.lua and
-- cluster_outbox.lua.
--
-- KEYS: the shard's outbox key, batch-number key and pending-label queue. The customer,
--       ledger and pending-label keys are the shard's key prefix and the id: built here
--       rather than passed, as the cluster client would hash every key passed to check they
--       share a slot (they do: the prefix holds the shard's hash tag).
-- ARGV: the state header, then
--   * the shard's key prefix ('{prefix}:{tag}:');
--   * one string packing every event as <8-byte tx hash, i8 time_ms, d amount, 8-byte
--     customer hash, 8-byte terminal hash, i4 x 2n terminal window counts (step 1),
--     i4 length, customer id, i4 length, terminal id, i4 length, transaction id>;
--   * trim_upto: outbox entries of batches up to this number are counted in their
--     terminals (the caller saw it done): they are dropped.
-- Returns: { outcome per event ('0' new, '1' duplicate, 'C' conflicting duplicate), reset
--            flags, the keys quarantined, the outcome codes of pending labels applied,
--            then per event the two parts of its retained history (stored, new record),
--            then the outbox after this call }.
--
-- A new event is appended to its customer's history and entered in the ledger and, in the
-- same atomic call, its terminal increment is appended to the shard's outbox (a label that
-- waited for it adds its fraud change after it): the increment cannot be lost between this
-- call and step 3, and step 3 applies a (shard, batch) at most once per terminal shard.

local qkey, bkey, pending_queue = KEYS[1], KEYS[2], KEYS[3]
local key_prefix = ARGV[argv_next]
local packed = ARGV[argv_next + 1]
local trim_upto = tonumber(ARGV[argv_next + 2])
local counts_len = 8 * n_windows

local outbox, outbox_changed = read_outbox(qkey, trim_upto)
local any_pending = redis.call('ZCARD', pending_queue) > 0
local batch = nil
local entries = {}
local flags, resets, applied = {}, {}, {}
local out = { '', '', {}, '' }
local pos = 1
local e = 0
local function field(at)
  local len = struct.unpack('<i4', packed, at)
  return string.sub(packed, at + 4, at + 3 + len), at + 4 + len
end
while pos <= #packed do
  e = e + 1
  local h = string.sub(packed, pos, pos + 7)
  local t, amount = struct.unpack('<i8d', packed, pos + 8)
  local content = string.sub(packed, pos + 8, pos + 39)
  local counts = string.sub(packed, pos + 40, pos + 39 + counts_len)
  local cid, tid, txid
  cid, pos = field(pos + 40 + counts_len)
  tid, pos = field(pos)
  txid, pos = field(pos)
  local ckey, xkey, pkey = key_prefix .. 'c:' .. cid, key_prefix .. 'x:' .. txid,
    key_prefix .. 'lp:' .. txid
  local x, bad_x = sound_get(xkey, LEDGER, nil)
  local blob, bad_c = sound_get(ckey, nil, REC)
  blob = blob or ''
  local dup_at = find_record(blob, h)
  local outcome = '0'
  if x then
    outcome = (string.sub(x, 1, CONTENT) == content) and '1' or 'C'
  elseif dup_at then
    local at = (dup_at - 1) * REC
    outcome = (string.sub(blob, at + 1, at + 16) == string.sub(content, 1, 16)) and '1' or 'C'
  end
  local base = 4 + 2 * e
  if outcome == 'C' then
    out[base - 1] = ''
    out[base] = struct.pack('<i8d', t, amount) .. h .. counts
  elseif outcome == '1' and dup_at then
    out[base - 1] = string.sub(blob, 1, dup_at * REC)
    out[base] = ''
  elseif outcome == '1' then
    -- A redelivery older than the history kept: today's inputs, nothing stored.
    out[base - 1] = blob
    out[base] = struct.pack('<i8d', t, amount) .. h .. counts
  else
    batch = batch or next_batch(bkey)
    local rec = struct.pack('<i8d', t, amount) .. h .. counts
    out[base - 1] = append_record(ckey, blob, t, rec)
    out[base] = rec
    local hour = math.floor(t / 3600000)
    entries[#entries + 1] = outbox_entry(batch, hour, 0, tid)
    x = content .. struct.pack('<i8', 0) .. '-'
    redis.call('SET', xkey, x, 'PX', ttl)
    if any_pending then
      local ident = identity_of(x)
      local ok, waiting = pcall(redis.call, 'HGET', pkey, ident)
      if not ok then
        quarantine(pkey)
        waiting = nil
      end
      if waiting then
        local code, delta = change_verdict(xkey, x, string.sub(waiting, 9, 9),
          struct.unpack('<i8', waiting, 1))
        applied[#applied + 1] = code
        if delta ~= 0 then entries[#entries + 1] = outbox_entry(batch, hour, delta, tid) end
        redis.call('HDEL', pkey, ident)
        if redis.call('HLEN', pkey) == 0 then redis.call('ZREM', pending_queue, pkey) end
      end
    end
  end
  flags[e] = outcome
  resets[e] = (bad_x or bad_c) and '1' or '0'
end
if #entries > 0 then
  outbox = outbox .. table.concat(entries)
  outbox_changed = true
end
if outbox_changed then save_outbox(qkey, outbox) end
out[1] = table.concat(flags)
out[2] = table.concat(resets)
out[3] = quarantined
out[4] = table.concat(applied)
out[#out + 1] = outbox
return out
