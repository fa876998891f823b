-- The transaction ledger and pending labels, shared by apply_transactions.lua and
-- apply_labels.lua (put after terminal_ring.lua). See stream_app/state/store.py for the semantics.
--
-- Ledger entry, per transaction id: 41 bytes <i8 time_ms, d amount, 8-byte customer hash,
-- 8-byte terminal hash, i8 reported_at ms of the verdict, 1 byte verdict ('-' none, '0'
-- genuine, '1' fraud)>; the first 32 bytes are the transaction's content.
-- Pending labels, per transaction id: a hash whose field is the transaction a label names
-- (24 bytes <i8 time_ms, 8-byte customer hash, 8-byte terminal hash>: labels naming
-- different ones wait side by side) and whose value is <i8 reported_at ms, 1 byte verdict>
-- then the caller's opaque source bytes (the latest verdict kept). The pending queue (a
-- sorted set) holds the hash's key, scored by its deadline (wall clock, ms).

local LEDGER = 41
local CONTENT = 32
local LABEL_HEAD = 33  -- a label as packed: its identity, reported_at ms, verdict
local IDENTITY = 24

-- Record a verdict in a ledger entry x (at xkey). Returns the outcome code (see
-- state.LABEL_CODES) and the change it makes to the fraud counter of the transaction's hour
-- at its terminal (-1, 0 or 1), which the caller applies in the same atomic call (one
-- Redis) or through the outbox (a cluster).
local function change_verdict(xkey, x, verdict, reported)
  local old = string.sub(x, LEDGER, LEDGER)
  local old_reported = struct.unpack('<i8', x, CONTENT + 1)
  if old ~= '-' and old_reported > reported then return 'S', 0 end
  if old == verdict then return 'D', 0 end
  local delta = (verdict == '1' and 1 or 0) - (old == '1' and 1 or 0)
  redis.call('SET', xkey, string.sub(x, 1, CONTENT) .. struct.pack('<i8', reported) .. verdict,
    'KEEPTTL')
  if old ~= '-' then return 'R', delta end
  if verdict == '1' then return 'F', delta end
  return 'G', delta
end

-- The hour (since the epoch) of the transaction whose ledger entry is x.
local function ledger_hour(x)
  return math.floor(struct.unpack('<i8', x, 1) / 3600000)
end

-- change_verdict, and the fraud counter of the terminal at tkey moved with it (one Redis).
local function apply_verdict(xkey, x, tkey, verdict, reported)
  local code, delta = change_verdict(xkey, x, verdict, reported)
  if delta ~= 0 and sound_terminal(tkey) then
    local hour = ledger_hour(x)
    local day = math.floor(hour / 24)
    adjust_fraud(tkey, day, hour - day * 24, delta)
  end
  return code
end

-- The 24-byte identity <time, customer hash, terminal hash> of the transaction whose ledger
-- entry is x, as a label names it.
local function identity_of(x)
  return string.sub(x, 1, 8) .. string.sub(x, 17, 32)
end
