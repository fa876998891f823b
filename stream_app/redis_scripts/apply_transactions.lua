-- Apply a micro-batch of transactions to customer and terminal state, in order, atomically.
-- See stream_app/state.py for the semantics; stream_app/redis_state.py for the caller.
--
-- KEYS: per event, its customer key then its terminal key.
-- ARGV: sequence_length, lookback_ms, ttl_ms, n_windows, then per window its first and last
--       day relative to the event's day (features.terminal_window_days), then trim_slack,
--       ring_days, then one string packing every event as 24 bytes <8-byte tx hash,
--       i8 time_ms, d amount> (one argument, not three per event: the client's command
--       packing is per argument).
-- Returns: { duplicate flags ('0'/'1' per event), then per event two strings whose
--            concatenation is its retained history: the stored part and the new record }.
--
-- Customer history: 48-byte records <i8 time_ms, d amount, 8-byte tx hash, i4 x 2n counts>.
-- Terminal counters: see terminal_ring.lua.
--
-- A window of an event at hour of day h takes its first day's hours h..23, the full days
-- between (day slots) and its last day's hours 0..h-1, i.e. 24 x w whole hours.

local REC = 48
local seq_len = tonumber(ARGV[1])
local lookback = tonumber(ARGV[2])
ttl = tonumber(ARGV[3])
local n_windows = tonumber(ARGV[4])
local lo, hi = {}, {}
local min_lo, max_hi = 0, -1e18
for w = 1, n_windows do
  lo[w] = tonumber(ARGV[3 + 2 * w])
  hi[w] = tonumber(ARGV[4 + 2 * w])
  if lo[w] < min_lo then min_lo = lo[w] end
  if hi[w] > max_hi then max_hi = hi[w] end
end
local trim_slack = tonumber(ARGV[5 + 2 * n_windows])
ring = tonumber(ARGV[6 + 2 * n_windows])
local counts_fmt = '<' .. string.rep('i4', 2 * n_windows)
local packed = ARGV[7 + 2 * n_windows]
local n_events = #KEYS / 2
local span = max_hi - min_lo + 1

-- Transaction and fraud counts of the days day+min_lo .. day+max_hi, from a terminal's ring,
-- and whether each day's slot holds that day.
local function read_days(days, day)
  local tx, fr, held = {}, {}, {}
  for i = 1, span do
    tx[i] = 0
    fr[i] = 0
    held[i] = false
  end
  -- The days map to at most two contiguous runs of slots: unpack each run in one call.
  local first = day + min_lo
  local i = 1
  while i <= span do
    local slot = (first + i - 1) % ring
    local run = math.min(span - i + 1, ring - slot)
    local v = { struct.unpack('<' .. string.rep('i4', 3 * run), days, slot * SLOT + 1) }
    for j = 0, run - 1 do
      if v[3 * j + 1] == first + i - 1 + j then
        tx[i + j] = v[3 * j + 2]
        fr[i + j] = v[3 * j + 3]
        held[i + j] = true
      end
    end
    i = i + run
  end
  return tx, fr, held
end

local flags = {}
local out = { '' }
for e = 1, n_events do
  local ckey = KEYS[2 * e - 1]
  local tkey = KEYS[2 * e]
  local o = (e - 1) * 24
  local h = string.sub(packed, o + 1, o + 8)
  local t, amount = struct.unpack('<i8d', packed, o + 9)
  local blob = redis.call('GET', ckey) or ''
  local n = #blob / REC

  -- Dedupe: a plain search for the hash, accepted only at a record's hash position.
  local dup_at = nil
  local from = 1
  while true do
    local pos = string.find(blob, h, from, true)
    if not pos then break end
    if (pos - 17) % REC == 0 then
      dup_at = (pos - 17) / REC + 1
      break
    end
    from = pos + 1
  end

  if dup_at then
    flags[e] = '1'
    out[2 * e] = string.sub(blob, 1, dup_at * REC)
    out[2 * e + 1] = ''
  else
    flags[e] = '0'
    local hour = math.floor(t / 3600000)
    local day = math.floor(hour / 24)
    local hod = hour - day * 24
    local days = read_day_slots(tkey)
    local tx, fr, held = read_days(days, day)
    local sums = {}
    local last_day = {}  -- hours 0..hod-1 of a last day, read once for the windows sharing it
    for w = 1, n_windows do
      local s_tx, s_fr = 0, 0
      local first, last = lo[w] - min_lo + 1, hi[w] - min_lo + 1
      for d = first + 1, last - 1 do
        s_tx = s_tx + tx[d]
        s_fr = s_fr + fr[d]
      end
      if held[first] then
        local h_tx, h_fr = read_hours(tkey, day + lo[w], hod, 23)
        s_tx, s_fr = s_tx + h_tx, s_fr + h_fr
      end
      if held[last] then
        if not last_day[last] then last_day[last] = { read_hours(tkey, day + hi[w], 0, hod - 1) } end
        s_tx, s_fr = s_tx + last_day[last][1], s_fr + last_day[last][2]
      end
      sums[w] = s_tx
      sums[n_windows + w] = s_fr
    end
    local rec = struct.pack('<i8d', t, amount) .. h .. struct.pack(counts_fmt, unpack(sums))
    n = n + 1
    -- Drop history no sequence element needs (see state.retained), once there is enough of
    -- it to be worth rewriting the key; until then only append.
    local keep = 1
    if n > seq_len then
      local idx = n - seq_len + 1
      local cutoff
      if idx == n then
        cutoff = t - lookback
      else
        cutoff = struct.unpack('<i8', blob, (idx - 1) * REC + 1) - lookback
      end
      while keep < n and struct.unpack('<i8', blob, (keep - 1) * REC + 1) <= cutoff do
        keep = keep + 1
      end
    end
    if keep - 1 >= trim_slack then
      blob = string.sub(blob, (keep - 1) * REC + 1)
      redis.call('SET', ckey, blob .. rec, 'PX', ttl)
    else
      redis.call('APPEND', ckey, rec)
      redis.call('PEXPIRE', ckey, ttl)
    end
    count_in_ring(tkey, days, day, hod, 1, 0)
    out[2 * e] = blob
    out[2 * e + 1] = rec
  end
end
out[1] = table.concat(flags)
return out
