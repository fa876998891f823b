-- A terminal's window counters as an event sees them (after terminal_ring.lua and
-- state_header.lua). A window of an event at hour of day h takes its first day's hours
-- h..23, the full days between (day slots) and its last day's hours 0..h-1, i.e. 24 x w
-- whole hours.

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

-- The window sums {tx_1..tx_n, fraud_1..fraud_n} of an event at time t (ms) on the terminal
-- at tkey, then the day slots as read, the event's day and hour of day (what count_in_ring
-- needs). With `peek`, a missing terminal is not created.
local function window_sums(tkey, t, peek)
  local hour = math.floor(t / 3600000)
  local day = math.floor(hour / 24)
  local hod = hour - day * 24
  local days = read_day_slots(tkey, peek)
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
  return sums, days, day, hod
end
