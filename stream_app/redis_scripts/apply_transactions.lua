-- Apply a micro-batch of transactions to customer and terminal state, in order, atomically.
-- See stream_app/state.py for the semantics; stream_app/redis_state.py for the caller.
--
-- KEYS: per event, its customer key then its terminal key.
-- ARGV: sequence_length, lookback_ms, ttl_ms, n_windows, then per window its inclusive day
--       offsets (lo, hi), then per event: tx_hash (8 bytes), time_ms, amount.
-- Returns: { duplicate flags ('0'/'1' per event), then per event its retained history blob }.

local REC = 48
local seq_len = tonumber(ARGV[1])
local lookback = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local n_windows = tonumber(ARGV[4])
local lo, hi = {}, {}
local min_lo, max_hi = 0, -1e18
for w = 1, n_windows do
  lo[w] = tonumber(ARGV[3 + 2 * w])
  hi[w] = tonumber(ARGV[4 + 2 * w])
  if lo[w] < min_lo then min_lo = lo[w] end
  if hi[w] > max_hi then max_hi = hi[w] end
end
local counts_fmt = '<' .. string.rep('i4', 2 * n_windows)
local first_arg = 5 + 2 * n_windows
local n_events = #KEYS / 2

local flags = {}
local out = { '' }
for e = 1, n_events do
  local ckey = KEYS[2 * e - 1]
  local tkey = KEYS[2 * e]
  local a = first_arg + 3 * (e - 1)
  local h = ARGV[a]
  local t = tonumber(ARGV[a + 1])
  local amount = tonumber(ARGV[a + 2])
  local blob = redis.call('GET', ckey) or ''
  local n = #blob / REC

  local dup_at = nil
  for k = 1, n do
    local off = (k - 1) * REC
    if string.sub(blob, off + 17, off + 24) == h then
      dup_at = k
      break
    end
  end

  if dup_at then
    flags[e] = '1'
    out[e + 1] = string.sub(blob, 1, dup_at * REC)
  else
    flags[e] = '0'
    local day = math.floor(t / 86400000)
    local fields = {}
    for d = day + min_lo, day + max_hi do
      fields[#fields + 1] = 't' .. d
      fields[#fields + 1] = 'f' .. d
    end
    local values = redis.call('HMGET', tkey, unpack(fields))
    local sums = {}
    for w = 1, n_windows do
      local tx, fr = 0, 0
      for d = day + lo[w], day + hi[w] do
        local i = 2 * (d - (day + min_lo)) + 1
        tx = tx + (tonumber(values[i]) or 0)
        fr = fr + (tonumber(values[i + 1]) or 0)
      end
      sums[w] = tx
      sums[n_windows + w] = fr
    end
    blob = blob .. struct.pack('<i8d', t, amount) .. h .. struct.pack(counts_fmt, unpack(sums))
    n = n + 1
    if n > seq_len then
      local cutoff = struct.unpack('<i8', blob, (n - seq_len) * REC + 1) - lookback
      local keep = 1
      while struct.unpack('<i8', blob, (keep - 1) * REC + 1) <= cutoff do
        keep = keep + 1
      end
      if keep > 1 then blob = string.sub(blob, (keep - 1) * REC + 1) end
    end
    redis.call('SET', ckey, blob, 'PX', ttl)
    if redis.call('HINCRBY', tkey, 't' .. day, 1) == 1 then
      -- First transaction of the day here: drop a week of counters no window reads any
      -- more, a week past the widest window, so events up to a week late still see theirs.
      local stale = {}
      for d = day + min_lo - 15, day + min_lo - 8 do
        stale[#stale + 1] = 't' .. d
        stale[#stale + 1] = 'f' .. d
      end
      redis.call('HDEL', tkey, unpack(stale))
    end
    redis.call('PEXPIRE', tkey, ttl)
    out[e + 1] = blob
  end
end
out[1] = table.concat(flags)
return out
