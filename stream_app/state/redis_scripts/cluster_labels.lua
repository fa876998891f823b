-- Redis Cluster: reconcile labels with the ledger of one customer shard (one hash slot) and
-- record their verdicts, in order, atomically; a verdict's change to its terminal's fraud
-- counter goes to the shard's outbox, which step 3 counts at the terminal shard (see
-- stream_app/state/redis_cluster.py). Put after terminal_ring.lua, ledger.lua and
-- cluster_outbox.lua.
--
-- KEYS: the shard's outbox key, batch-number key and pending-label queue.
-- ARGV: ttl_ms, now_ms, wait_ms, the shard's key prefix ('{prefix}:{tag}:'), trim_upto (see
--       cluster_customers.lua), then one string packing every label as <33-byte label head
--       (ledger.lua), i4 length, transaction id, i4 length, terminal id, i4 length, source>.
-- Returns: { outcome codes (one letter per label), the keys quarantined, the outbox }.

ttl = tonumber(ARGV[1])
local now, wait = tonumber(ARGV[2]), tonumber(ARGV[3])
local key_prefix = ARGV[4]
local trim_upto = tonumber(ARGV[5])
local packed = ARGV[6]
local qkey, bkey, pending_queue = KEYS[1], KEYS[2], KEYS[3]

local outbox, outbox_changed = read_outbox(qkey, trim_upto)
local batch = nil
local entries = {}
local codes = {}
local pos = 1
local function field(at)
  local len = struct.unpack('<i4', packed, at)
  return string.sub(packed, at + 4, at + 3 + len), at + 4 + len
end
while pos <= #packed do
  local head = string.sub(packed, pos, pos + LABEL_HEAD - 1)
  local txid, tid, source
  txid, pos = field(pos + LABEL_HEAD)
  tid, pos = field(pos)
  source, pos = field(pos)
  local xkey, pkey = key_prefix .. 'x:' .. txid, key_prefix .. 'lp:' .. txid
  local reported = struct.unpack('<i8', head, 25)
  local ident = string.sub(head, 1, IDENTITY)
  local x = sound_get(xkey, LEDGER, nil)
  local code
  if not x then
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
    code = 'P'
  elseif identity_of(x) ~= ident then
    code = 'M'
  else
    local delta
    code, delta = change_verdict(xkey, x, string.sub(head, 33, 33), reported)
    if delta ~= 0 then
      batch = batch or next_batch(bkey)
      entries[#entries + 1] = outbox_entry(batch, ledger_hour(x), delta, tid)
    end
  end
  codes[#codes + 1] = code
end
if #entries > 0 then
  outbox = outbox .. table.concat(entries)
  outbox_changed = true
end
if outbox_changed then save_outbox(qkey, outbox) end
return { table.concat(codes), quarantined, outbox }
