-- A Redis Cluster customer shard's outbox (put after terminal_ring.lua, which sets `ttl`):
-- the terminal changes its calls made, waiting to be counted at their terminal shards (see
-- stream_app/state/redis_cluster.py). An entry is <i8 batch, i4 hour, i4 kind, i4 length,
-- terminal id>; kind 0 is a transaction (+1 transaction), -1 or 1 a fraud verdict's change.

local OUTBOX_HEAD = 20

-- The outbox at qkey, without the entries of batches up to trim_upto (counted everywhere:
-- the caller saw it done). Returns it and whether it changed.
local function read_outbox(qkey, trim_upto)
  local outbox = redis.call('GET', qkey) or ''
  if trim_upto <= 0 or #outbox == 0 then return outbox, false end
  local pos = 1
  while pos <= #outbox do
    local b, _, _, len = struct.unpack('<i8i4i4i4', outbox, pos)
    if b > trim_upto then break end
    pos = pos + OUTBOX_HEAD + len
  end
  if pos == 1 then return outbox, false end
  return string.sub(outbox, pos), true
end

-- This call's batch number, from the shard's clock in microseconds (at least the last one
-- + 1), so it keeps growing even after its key expired.
local function next_batch(bkey)
  local now = redis.call('TIME')
  local batch = math.max(tonumber(redis.call('GET', bkey) or '0') + 1,
    tonumber(now[1]) * 1000000 + tonumber(now[2]))
  redis.call('SET', bkey, string.format('%.0f', batch), 'PX', ttl)
  return batch
end

local function outbox_entry(batch, hour, kind, tid)
  return struct.pack('<i8i4i4i4', batch, hour, kind, #tid) .. tid
end

local function save_outbox(qkey, outbox)
  if #outbox > 0 then
    redis.call('SET', qkey, outbox, 'PX', ttl)
  else
    redis.call('DEL', qkey)
  end
end
