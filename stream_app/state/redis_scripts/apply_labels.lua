-- Reconcile labels with the transaction ledger and apply their verdicts, in order,
-- atomically, on one Redis. See stream_app/state/store.py for the semantics. Put after
-- terminal_ring.lua and ledger.lua.
--
-- KEYS: the pending-label queue, then per label its terminal key, ledger key and
--       pending-label key.
-- ARGV: ttl_ms, ring_days, now_ms, wait_ms, then one string packing every label as
--       <i8 time_ms, 8-byte customer hash, 8-byte terminal hash, i8 reported_at ms,
--       1 byte verdict, i4 source length, source>.
-- Returns: { outcome codes (one letter per label, see state.LABEL_CODES), the keys
--            quarantined }.

ttl = tonumber(ARGV[1])
ring = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local wait = tonumber(ARGV[4])
local packed = ARGV[5]
local pending_queue = KEYS[1]
local codes = {}
local pos = 1
local e = 0
while pos <= #packed do
  e = e + 1
  local head = string.sub(packed, pos, pos + LABEL_HEAD - 1)
  local source_len = struct.unpack('<i4', packed, pos + LABEL_HEAD)
  local source = string.sub(packed, pos + LABEL_HEAD + 4, pos + LABEL_HEAD + 3 + source_len)
  pos = pos + LABEL_HEAD + 4 + source_len
  local tkey, xkey, pkey = KEYS[3 * e - 1], KEYS[3 * e], KEYS[3 * e + 1]
  local reported = struct.unpack('<i8', head, 25)
  local verdict = string.sub(head, 33, 33)
  local x = sound_get(xkey, LEDGER, nil)
  if not x then
    local ident = string.sub(head, 1, IDENTITY)
    local ok, waiting = pcall(redis.call, 'HGET', pkey, ident)
    if not ok then
      quarantine(pkey)
      waiting = nil
    end
    if not waiting or #waiting < 9 or struct.unpack('<i8', waiting, 1) <= reported then
      redis.call('HSET', pkey, ident, string.sub(head, 25, LABEL_HEAD) .. source)
      redis.call('PEXPIRE', pkey, ttl)
    end
    redis.call('ZADD', pending_queue, now + wait, pkey)
    codes[e] = 'P'
  elseif identity_of(x) ~= string.sub(head, 1, IDENTITY) then
    codes[e] = 'M'
  else
    codes[e] = apply_verdict(xkey, x, tkey, verdict, reported)
  end
end
return { table.concat(codes), quarantined }
