-- A terminal's window counters as an event sees them (after terminal_ring.lua and
-- state_header.lua). A window of an event at hour of day h takes its first day's hours
-- h..23, the full days between (day slots) and its last day's hours 0..h-1, i.e. 24 x w
-- whole hours.
--
-- A day slot's totals are the sums of its 24 hour cells (count_in_ring and adjust_fraud
-- move both together), so a window is also
--   (days first..last-1) - (first day's hours 0..h-1) + (last day's hours 0..h-1), or
--   (days first+1..last) + (first day's hours h..23) - (last day's hours h..23):
-- whichever reads fewer hours (the first when h <= 12). The day totals come from one pass
-- over the slots, the boundary days' hours from one GETRANGE each (the windows share their
-- last day). Measured alone on a terminal with 40 days of data, this takes 46 us a call
-- against 54 us for summing each window's days and both partial days separately; in a
-- whole bench run the difference is within the noise.

-- The window sums {tx_1..tx_n, fraud_1..fraud_n} of an event at time t (ms) on the terminal
-- at tkey, then the day slots as read, the event's day and hour of day (what count_in_ring
-- needs). With `peek`, a missing terminal is not created.
local function window_sums(tkey, t, peek)
  local hour = math.floor(t / 3600000)
  local day = math.floor(hour / 24)
  local hod = hour - day * 24
  local days = read_day_slots(tkey, peek)
  local prefix = hod <= 12
  local from_h, to_h = 0, hod - 1
  if not prefix then from_h, to_h = hod, 23 end
  -- Running day totals from day + min_lo, kept at the offsets the windows start and end at
  -- (cum_*[r]: the days min_lo..r-1), and whether each boundary day's slot holds it.
  local cum_tx, cum_fr, held = {}, {}, {}
  local s_tx, s_fr = 0, 0
  for r = min_lo, max_hi do
    local d = day + r
    local v_day, v_tx, v_fr = struct.unpack('<i4i4i4', days, (d % ring) * SLOT + 1)
    if bound[r] then
      cum_tx[r], cum_fr[r] = s_tx, s_fr
      held[r] = v_day == d
    end
    if v_day == d then
      s_tx, s_fr = s_tx + v_tx, s_fr + v_fr
    end
  end
  cum_tx[max_hi + 1], cum_fr[max_hi + 1] = s_tx, s_fr
  -- The boundary days' hours from_h..to_h, each read once.
  local part_tx, part_fr = {}, {}
  local function part(r)
    if part_tx[r] == nil then
      if held[r] then
        part_tx[r], part_fr[r] = read_hours(tkey, day + r, from_h, to_h)
      else
        part_tx[r], part_fr[r] = 0, 0
      end
    end
    return part_tx[r], part_fr[r]
  end
  local sums = {}
  for w = 1, n_windows do
    local first, last = lo[w], hi[w]
    local f_tx, f_fr = part(first)
    local l_tx, l_fr = part(last)
    if prefix then
      sums[w] = cum_tx[last] - cum_tx[first] - f_tx + l_tx
      sums[n_windows + w] = cum_fr[last] - cum_fr[first] - f_fr + l_fr
    else
      sums[w] = cum_tx[last + 1] - cum_tx[first + 1] + f_tx - l_tx
      sums[n_windows + w] = cum_fr[last + 1] - cum_fr[first + 1] + f_fr - l_fr
    end
  end
  return sums, days, day, hod
end
