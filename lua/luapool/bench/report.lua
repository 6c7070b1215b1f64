-- luapool.bench.report: a run suite's results as an aligned table, as a
-- JSON-able document, and the files --json, --csv and --svg write.  Every
-- function here is a method of a suite (luapool.bench.runner installs them
-- as suite:table(), suite:report(), ...), called after suite:run().
local format = require "luapool.bench.format"
local json = require "luapool.bench.json"
local format_kb, format_rate, format_ratio = format.format_kb, format.format_rate, format.format_ratio
local format_table, format_time = format.format_table, format.format_time
local assert, ipairs, pairs, tostring = assert, ipairs, pairs, tostring
local io = io
local concat, sort = table.concat, table.sort

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

-- The report table as text.
function M.table(self)
  local results = assert(self.results, "suite:table: run the suite first")
  local with_units = false
  for _, r in ipairs(results) do if r.units then with_units = true end end
  local header = { "group", "case", "min", "median", "max", "cpu", "peak rss", "ratio" }
  local align = { "l", "l", "r", "r", "r", "r", "r", "r" }
  if with_units then
    header[#header + 1] = "per unit"; align[#align + 1] = "r"
    header[#header + 1] = "rate"; align[#align + 1] = "r"
  end
  local rows = {}
  local last_group
  for _, r in ipairs(results) do
    if last_group and r.group ~= last_group then rows[#rows + 1] = { separator = true } end
    last_group = r.group
    local ratio = format_ratio(r.ratio)
    if r.baseline == r.name then ratio = "base" end
    local row = { r.group, r.name, format_time(r.min), format_time(r.median), format_time(r.max),
                  format_time(r.cpu_median), format_kb(r.peak_rss_kb), ratio }
    if with_units then
      if r.units then
        row[#row + 1] = format_time(r.per_unit) .. "/" .. (r.unit or "unit")
        row[#row + 1] = format_rate(r.units / r.median, r.unit)
      else
        row[#row + 1] = "-"
        row[#row + 1] = "-"
      end
    end
    rows[#rows + 1] = row
  end
  local text = format_table(header, rows, align)
  return text .. "ratio: median over runs of time / baseline time in the same round (<1: faster)"
    .. "; cpu: this process's CPU time (worker processes not included)\n"
end

-- The results as a JSON-able table.
function M.report(self)
  local cases = {}
  for _, r in ipairs(assert(self.results, "suite:report: run the suite first")) do
    local params = {}
    for k, v in pairs(r.params) do params[k] = v end
    cases[#cases + 1] = {
      name = r.name, group = r.group, params = params, runs = json.array(r.runs),
      cpu = json.array(r.cpu), min = r.min, median = r.median, max = r.max,
      cpu_median = r.cpu_median, peak_rss_kb = r.peak_rss_kb or json.null,
      ratio = r.ratio or json.null, baseline = r.baseline or json.null,
      units = r.units or json.null, unit = r.unit or json.null, per_unit = r.per_unit or json.null,
    }
  end
  return {
    suite = self.name, title = self.title or json.null, machine = self.machine,
    runs = self.runs, warmup = self.warmup, quick = self.quick, cases = json.array(cases),
  }
end

local function write_file(file, text)
  local f, err = io.open(file, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(text)
  f:close()
  if not ok then return nil, werr end
  return true
end

function M.write_json(self, file)
  return write_file(file, json.json(self:report(), 2) .. "\n")
end

M.CSV_HEADER = { "suite", "group", "case", "params", "runs", "min_s", "median_s", "max_s",
                 "cpu_median_s", "peak_rss_kb", "ratio", "baseline", "units", "unit", "per_unit_s" }

function M.write_csv(self, file)
  local lines = { concat(M.CSV_HEADER, ",") }
  for _, r in ipairs(assert(self.results, "suite:write_csv: run the suite first")) do
    local keys = {}
    for k in pairs(r.params) do keys[#keys + 1] = tostring(k) end
    sort(keys)
    local p = {}
    for _, k in ipairs(keys) do p[#p + 1] = k .. "=" .. tostring(r.params[k]) end
    local row = { self.name, r.group, r.name, concat(p, ";"), #r.runs, r.min, r.median, r.max,
                  r.cpu_median, r.peak_rss_kb, r.ratio, r.baseline, r.units, r.unit, r.per_unit }
    for i = 1, #M.CSV_HEADER do row[i] = json.csv_field(row[i]) end
    lines[#lines + 1] = concat(row, ",")
  end
  return write_file(file, concat(lines, "\n") .. "\n")
end

-- Writes suite:svg_text(o) (see luapool.bench.svg) to file.
-- Returns true, or nil and a message.
function M.svg(self, file, o)
  local svg, err = self:svg_text(o)
  if not svg then return nil, err end
  return write_file(file, svg)
end

return M
