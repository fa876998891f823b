-- Apply a micro-batch of transactions to customer and terminal state, in order, atomically,
-- on one Redis. See stream_app/state/store.py for the semantics; stream_app/state/redis.py for
-- the caller. Put after terminal_ring.lua, state_header.lua, terminal_windows.lua,
-- customer_history.lua and ledger.lua.
--
-- KEYS: the pending-label queue, then per event its customer key, terminal key, ledger key
--       and pending-label key.
-- ARGV: the state header (state_header.lua), then one string packing every event as 40
--       bytes <8-byte tx hash, i8 time_ms, d amount, 8-byte customer hash, 8-byte terminal
--       hash> (one argument, not five per event: the client's command packing is per
--       argument).
-- Returns: { outcome per event ('0' new, '1' duplicate, 'C' conflicting duplicate),
--            reset flags ('0'/'1' per event: scored from empty state, its state was corrupt),
--            the keys quarantined, the outcome codes of the pending labels applied,
--            then per event two strings whose concatenation is its retained history: the
--            stored part and the new record }.

local packed = ARGV[argv_next]
local pending_queue = KEYS[1]
local n_events = (#KEYS - 1) / 4
local any_pending = redis.call('ZCARD', pending_queue) > 0
local flags, resets = {}, {}
local applied = {}
local out = { '', '', {}, '' }
local zeros = struct.pack(counts_fmt, unpack((function()
  local z = {}
  for w = 1, 2 * n_windows do z[w] = 0 end
  return z
end)()))
for e = 1, n_events do
  local ckey, tkey = KEYS[4 * e - 2], KEYS[4 * e - 1]
  local xkey, pkey = KEYS[4 * e], KEYS[4 * e + 1]
  local o = (e - 1) * 40
  local h = string.sub(packed, o + 1, o + 8)
  local t, amount = struct.unpack('<i8d', packed, o + 9)
  local content = string.sub(packed, o + 9, o + 40)
  local reset = false
  local x, bad_x = sound_get(xkey, LEDGER, nil)
  local blob, bad_c = sound_get(ckey, nil, REC)
  blob = blob or ''
  reset = bad_x or bad_c
  local dup_at = find_record(blob, h)
  local outcome = '0'
  if x then
    if string.sub(x, 1, CONTENT) ~= content then
      outcome = 'C'
    else
      outcome = '1'
    end
  elseif dup_at then
    -- In a history written before the ledger: the same time and amount is a redelivery.
    if string.sub(blob, (dup_at - 1) * REC + 1, (dup_at - 1) * REC + 16) == string.sub(content, 1, 16) then
      outcome = '1'
    else
      outcome = 'C'
    end
  end
  local base = 4 + 2 * e
  if outcome == 'C' then
    -- Not scored: a placeholder history (the event alone).
    out[base - 1] = ''
    out[base] = struct.pack('<i8d', t, amount) .. h .. zeros
  elseif outcome == '1' and dup_at then
    out[base - 1] = string.sub(blob, 1, dup_at * REC)
    out[base] = ''
  elseif outcome == '1' then
    -- A redelivery older than the history kept: today's inputs, nothing stored.
    if not sound_terminal(tkey) then reset = true end
    local sums = window_sums(tkey, t, true)
    out[base - 1] = blob
    out[base] = struct.pack('<i8d', t, amount) .. h .. struct.pack(counts_fmt, unpack(sums))
  else
    if not sound_terminal(tkey) then reset = true end
    local sums, days, day, hod = window_sums(tkey, t, false)
    local rec = struct.pack('<i8d', t, amount) .. h .. struct.pack(counts_fmt, unpack(sums))
    out[base - 1] = append_record(ckey, blob, t, rec)
    out[base] = rec
    count_in_ring(tkey, days, day, hod, 1, 0)
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
        local reported = struct.unpack('<i8', waiting, 1)
        applied[#applied + 1] = apply_verdict(xkey, x, tkey, string.sub(waiting, 9, 9), reported)
        redis.call('HDEL', pkey, ident)
        if redis.call('HLEN', pkey) == 0 then redis.call('ZREM', pending_queue, pkey) end
      end
    end
  end
  flags[e] = outcome
  resets[e] = reset and '1' or '0'
end
out[1] = table.concat(flags)
out[2] = table.concat(resets)
out[3] = quarantined
out[4] = table.concat(applied)
return out
