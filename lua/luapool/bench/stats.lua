-- luapool.bench.stats: the statistics of a case's runs.  The median, min,
-- max and mean of a list of numbers, and the paired ratio of a case to its
-- baseline (see luapool.bench.runner for why runs are paired).
local assert, type = assert, type
local sort = table.sort

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

local function copy_numbers(list, what)
  assert(type(list) == "table", what .. ": list of numbers expected")
  local t = {}
  for i = 1, #list do
    local v = list[i]
    assert(type(v) == "number", what .. ": list of numbers expected")
    t[i] = v
  end
  return t
end

-- Median of a list of numbers (mean of the middle two for an even count);
-- nil for an empty list.  The list is not modified.
function M.median(list)
  local t = copy_numbers(list, "median")
  local n = #t
  if n == 0 then return nil end
  sort(t)
  if n % 2 == 1 then return t[(n + 1) // 2] end
  return (t[n // 2] + t[n // 2 + 1]) / 2
end

function M.min(list)
  local t = copy_numbers(list, "min")
  local m = t[1]
  for i = 2, #t do if t[i] < m then m = t[i] end end
  return m
end

function M.max(list)
  local t = copy_numbers(list, "max")
  local m = t[1]
  for i = 2, #t do if t[i] > m then m = t[i] end end
  return m
end

function M.mean(list)
  local t = copy_numbers(list, "mean")
  if #t == 0 then return nil end
  local s = 0
  for i = 1, #t do s = s + t[i] end
  return s / #t
end

-- Median over i of times[i] / base_times[i]: the runs are paired (run i of
-- a case and run i of its baseline happened back to back), so a slowdown of
-- the machine that hits both cancels out.  Pairs whose base is not positive
-- are skipped; nil when no pair is left.
function M.paired_ratio(times, base_times)
  local a, b = copy_numbers(times, "paired_ratio"), copy_numbers(base_times, "paired_ratio")
  assert(#a == #b, ("paired_ratio: %d times against %d baseline times"):format(#a, #b))
  local r = {}
  for i = 1, #a do
    if b[i] > 0 then r[#r + 1] = a[i] / b[i] end
  end
  return M.median(r)
end

return M
