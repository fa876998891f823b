-- A customer's history (after state_header.lua): a string of 48-byte records <i8 time_ms,
-- d amount, 8-byte tx hash, i4 x 2n terminal counts> in arrival order.

local REC = 48

-- Position (1-based record index) of the record whose hash is h, or nil: a plain search for
-- the hash, accepted only at a record's hash position.
local function find_record(blob, h)
  local from = 1
  while true do
    local pos = string.find(blob, h, from, true)
    if not pos then return nil end
    if (pos - 17) % REC == 0 then return (pos - 17) / REC + 1 end
    from = pos + 1
  end
end

-- Append rec (an event at time t) to the history blob stored at ckey; returns the history
-- kept before rec. History no sequence element needs is dropped (see state.retained: of the
-- last seq_len - 1 + max_window_tx records, those from 30 days before the oldest of the
-- last seq_len on) once there is enough of it to be worth rewriting the key; until then
-- only append. The key so never holds more than seq_len - 2 + max_window_tx + trim_slack.
local function append_record(ckey, blob, t, rec)
  local n = #blob / REC + 1
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
    keep = math.max(keep, n - (seq_len - 1 + max_window_tx) + 1)
  end
  if keep - 1 >= trim_slack then
    blob = string.sub(blob, (keep - 1) * REC + 1)
    redis.call('SET', ckey, blob .. rec, 'PX', ttl)
  else
    redis.call('APPEND', ckey, rec)
    redis.call('PEXPIRE', ckey, ttl)
  end
  return blob
end
