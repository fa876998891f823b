-- Redis Cluster: count fraud labels into their terminal's hour, on one terminal shard (one
-- hash slot); a label seen before counts once. Put after terminal_ring.lua.
-- KEYS: per label, its terminal key then its label-dedupe key (both on the shard's slot).
-- ARGV: ttl_ms, ring_days, then per label: hour (hours since the epoch), is_fraud ('1'/'0').
-- Returns the outcome codes (state.LABEL_CODES): 'F' a fraud counted, 'G' a genuine label,
-- 'D' a label seen before (or more than a ring late).
--
-- Unlike one Redis, a cluster does not reconcile labels with a transaction ledger: see
-- stream_app/redis_cluster_state.py.

ttl = tonumber(ARGV[1])
ring = tonumber(ARGV[2])
local codes = {}
for e = 1, #KEYS / 2 do
  local tkey = KEYS[2 * e - 1]
  local lkey = KEYS[2 * e]
  local hour = tonumber(ARGV[2 * e + 1])
  local is_fraud = ARGV[2 * e + 2]
  codes[e] = 'D'
  if redis.call('SET', lkey, is_fraud, 'NX', 'PX', ttl) then
    codes[e] = 'G'
    if is_fraud == '1' then
      local day = math.floor(hour / 24)
      if sound_terminal(tkey) and count_in_ring(tkey, read_day_slots(tkey), day, hour - day * 24, 0, 1) then
        codes[e] = 'F'
      else
        codes[e] = 'D'
      end
    end
  end
end
return table.concat(codes)
