-- Apply a micro-batch of transactions to customer and terminal state, in order, atomically,
-- on one Redis. See stream_app/state.py for the semantics; stream_app/redis_state.py for
-- the caller. Put after terminal_ring.lua, state_header.lua, terminal_windows.lua and
-- customer_history.lua.
--
-- KEYS: per event, its customer key then its terminal key.
-- ARGV: the state header (state_header.lua), then one string packing every event as 24
--       bytes <8-byte tx hash, i8 time_ms, d amount> (one argument, not three per event:
--       the client's command packing is per argument).
-- Returns: { duplicate flags ('0'/'1' per event), then per event two strings whose
--            concatenation is its retained history: the stored part and the new record }.

local packed = ARGV[argv_next]
local n_events = #KEYS / 2
local flags = {}
local out = { '' }
for e = 1, n_events do
  local ckey = KEYS[2 * e - 1]
  local tkey = KEYS[2 * e]
  local o = (e - 1) * 24
  local h = string.sub(packed, o + 1, o + 8)
  local t, amount = struct.unpack('<i8d', packed, o + 9)
  local blob = redis.call('GET', ckey) or ''
  local dup_at = find_record(blob, h)
  if dup_at then
    flags[e] = '1'
    out[2 * e] = string.sub(blob, 1, dup_at * REC)
    out[2 * e + 1] = ''
  else
    flags[e] = '0'
    local sums, days, day, hod = window_sums(tkey, t, false)
    local rec = struct.pack('<i8d', t, amount) .. h .. struct.pack(counts_fmt, unpack(sums))
    out[2 * e] = append_record(ckey, blob, t, rec)
    out[2 * e + 1] = rec
    count_in_ring(tkey, days, day, hod, 1, 0)
  end
end
out[1] = table.concat(flags)
return out
