-- luapool.bench.format: numbers for people (times, sizes, ratios, counts,
-- rates) and aligned text tables.
local ipairs = ipairs
local math, utf8 = math, utf8
local floor, huge = math.floor, math.huge
local concat = table.concat

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

-- 3 significant digits, no exponent.
local function sig3(v)
  local a = math.abs(v)
  if a >= 100 then return ("%.0f"):format(v) end
  if a >= 10 then return ("%.1f"):format(v) end
  return ("%.2f"):format(v)
end
M.sig3 = sig3

-- Seconds as "812 ns", "12.3 µs", "4.56 ms", "1.23 s".
function M.format_time(s)
  if s == nil or s ~= s then return "-" end
  local a = math.abs(s)
  if a == 0 then return "0 s" end
  if a < 1e-6 then return sig3(s * 1e9) .. " ns" end
  if a < 1e-3 then return sig3(s * 1e6) .. " µs" end
  if a < 1 then return sig3(s * 1e3) .. " ms" end
  return sig3(s) .. " s"
end

-- Kibibytes as "812 KiB", "12.3 MiB", "1.20 GiB".
function M.format_kb(kb)
  if kb == nil then return "-" end
  if kb < 1024 then return ("%d KiB"):format(floor(kb + 0.5)) end
  if kb < 1024 * 1024 then return sig3(kb / 1024) .. " MiB" end
  return sig3(kb / (1024 * 1024)) .. " GiB"
end

function M.format_ratio(r)
  if r == nil or r ~= r then return "-" end
  if r >= 100 then return ("%.0fx"):format(r) end
  if r >= 10 then return ("%.1fx"):format(r) end
  return ("%.2fx"):format(r)
end

-- A count and its SI prefix: 950, "" / 12.3, "k" / 4.56, "M" / 1.20, "G".
local function si(v)
  local a = math.abs(v)
  if a >= 1e9 then return sig3(v / 1e9), "G" end
  if a >= 1e6 then return sig3(v / 1e6), "M" end
  if a >= 1e3 then return sig3(v / 1e3), "k" end
  return sig3(v), ""
end

-- A count with an SI prefix: "950", "12.3 k", "4.56 M", "1.20 G".
function M.format_count(v)
  if v == nil or v ~= v then return "-" end
  local n, p = si(v)
  return p == "" and n or (n .. " " .. p)
end

-- Units per second: "341 MB/s" for a unit of one or two letters ("B"),
-- "12.4 k req/s" for three, "45.6 k tasks/s" for a word ("task": plural).
function M.format_rate(per_s, unit)
  if per_s == nil or per_s ~= per_s or per_s == huge then return "-" end
  unit = unit or "unit"
  local n, p = si(per_s)
  if #unit <= 2 then return n .. " " .. p .. unit .. "/s" end
  if #unit >= 4 then unit = unit .. "s" end
  return n .. " " .. (p == "" and "" or (p .. " ")) .. unit .. "/s"
end

local function width(s) return utf8.len(s) or #s end

-- Renders rows (lists of strings) as an aligned table; align[i] "l" or "r".
function M.format_table(header, rows, align)
  local w = {}
  for i, h in ipairs(header) do w[i] = width(h) end
  for _, row in ipairs(rows) do
    for i, cell in ipairs(row) do
      if width(cell) > w[i] then w[i] = width(cell) end
    end
  end
  local function line(row)
    local parts = {}
    for i = 1, #header do
      local cell = row[i] or ""
      local pad = (" "):rep(w[i] - width(cell))
      parts[i] = (align[i] == "r") and (pad .. cell) or (cell .. pad)
    end
    return (concat(parts, "  "):gsub("%s+$", ""))
  end
  local out = { line(header) }
  local rule = {}
  for i = 1, #header do rule[i] = ("-"):rep(w[i]) end
  out[#out + 1] = concat(rule, "  ")
  for _, row in ipairs(rows) do
    out[#out + 1] = row.separator and "" or line(row)
  end
  return concat(out, "\n") .. "\n"
end


return M
