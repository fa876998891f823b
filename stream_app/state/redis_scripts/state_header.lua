-- The header every transaction script's ARGV starts with (RedisStateStore builds it once):
-- sequence_length, lookback_ms, ttl_ms, n_windows, then per window its first and last day
-- relative to the event's day (features.terminal_window_days), then trim_slack, ring_days,
-- max_window_tx (features.MAX_CUSTOMER_WINDOW_TX).
-- Sets the locals below (and terminal_ring.lua's `ring` and `ttl`, which must come first);
-- the script's own arguments start at ARGV[argv_next].

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
local max_window_tx = tonumber(ARGV[7 + 2 * n_windows])
local argv_next = 8 + 2 * n_windows
local counts_fmt = '<' .. string.rep('i4', 2 * n_windows)
-- The days (relative to an event's) where a window starts or ends, and the day after each:
-- where terminal_windows.lua keeps its running day totals.
local bound = {}
for w = 1, n_windows do
  bound[lo[w]], bound[lo[w] + 1], bound[hi[w]], bound[hi[w] + 1] = true, true, true, true
end
