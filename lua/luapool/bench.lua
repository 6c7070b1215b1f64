-- luapool.bench: scripted benchmark suites.
--
--   local bench = require "luapool.bench"
--   local suite = bench.suite { name = "demo", title = "What it shows", args = { ... } }
--   local n = suite.quick and 10 or 1000          -- --quick: tiny sizes for smoke tests
--   suite:case { name = "sequential", group = "io", body = function() ... end }
--   suite:case { name = "threads", group = "io", baseline = "sequential",
--                params = { workers = 4 },
--                setup = function(params) return state end,     -- untimed, every run
--                body = function(state, params) ... end,         -- timed
--                teardown = function(state, params) end,         -- untimed
--                units = n, unit = "task" }                      -- also report time per task
--   suite:product { group = "io", name = "{pool} x{workers}", baseline = "sequential",
--                   axes = { { "pool", { "threadpool", "processpool" } }, { "workers", { 1, 2, 4 } } },
--                   body = function(state, params) ... end }
--   suite:chart { name = "io", group = "io", x = "workers", series = "pool", log_x = true }
--   suite:run()      -- or suite:run(arg): --runs N --warmup N --json F --csv F --svg F --quick
--
-- How it measures.  Every case of a group runs once per round, rounds
-- repeat `runs` times (after `warmup` untimed rounds), and the order of the
-- cases rotates from round to round: whatever the machine does meanwhile
-- (another job, a frequency change) falls on all cases alike.  A case's
-- ratio is the median over rounds of its time divided by its baseline's
-- time in the same round, pair by pair, so drift cancels.  Each run
-- records wall time (luapool.now), this process's CPU time (os.clock: all
-- its threads, not worker processes) and the peak resident set (VmHWM,
-- reset through /proc/self/clear_refs before each run when the kernel
-- lets us; "-" when it does not).
--
-- Plain Lua 5.4 plus luapool.now: runs in the luapool host and under stock
-- lua5.4 with require "luapool".
local luapool = rawget(_G, "luapool") or package.loaded.luapool or require "luapool"

local M = {}

local now = luapool.now
local floor, huge = math.floor, math.huge
local concat, sort = table.concat, table.sort

-- {====== statistics

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

-- }======

-- {====== human units

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

-- }======

-- {====== the machine

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- luapool.info() plus the CPU model, memory and the date (UTC).
function M.machine()
  local m = {}
  local ok, info = pcall(luapool.info)
  if ok and type(info) == "table" then
    for k, v in pairs(info) do m[k] = v end
  end
  m.cpus = m.cpus or (luapool.cpu_count and luapool.cpu_count())
  local cpuinfo = readfile("/proc/cpuinfo") or ""
  m.cpu_model = cpuinfo:match("model name%s*:%s*([^\n]-)%s*\n")
    or cpuinfo:match("Model%s*:%s*([^\n]-)%s*\n") or "unknown"
  local mem = (readfile("/proc/meminfo") or ""):match("MemTotal:%s*(%d+)")
  m.memory_kb = mem and math.tointeger(tonumber(mem)) or nil
  m.date = os.date("!%Y-%m-%dT%H:%M:%SZ")
  m.loadavg = M.loadavg()
  return m
end

-- The 1-minute load average, or nil.
function M.loadavg()
  local l = (readfile("/proc/loadavg") or ""):match("^(%S+)")
  return l and tonumber(l)
end

function M.describe_machine(m)
  local parts = {}
  parts[#parts + 1] = ("%s, %s cpus"):format(m.cpu_model or "unknown CPU", tostring(m.cpus or "?"))
  if m.memory_kb then parts[#parts + 1] = M.format_kb(m.memory_kb) .. " RAM" end
  if m.os then parts[#parts + 1] = m.os end
  local soft = {}
  if m.luapool then soft[#soft + 1] = "luapool " .. m.luapool end
  if m.lua then soft[#soft + 1] = m.lua end
  if m.curl then soft[#soft + 1] = "libcurl " .. m.curl end
  if #soft > 0 then parts[#parts + 1] = concat(soft, ", ") end
  if m.loadavg then parts[#parts + 1] = ("load %.2f"):format(m.loadavg) end
  return concat(parts, "; ")
end

-- }======

-- {====== peak RSS

local function reset_hwm()
  local f = io.open("/proc/self/clear_refs", "w")
  if not f then return false end
  local ok = f:write("5")
  local closed = f:close()
  return ok ~= nil and closed ~= nil
end

local function read_hwm()
  local kb = (readfile("/proc/self/status") or ""):match("VmHWM:%s*(%d+)%s*kB")
  return kb and math.tointeger(tonumber(kb)) or nil
end

-- }======

-- {====== JSON and CSV

-- JSON null, for values that must appear as null.
M.null = setmetatable({}, { __name = "json.null", __tostring = function() return "null" end })

local ESC = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
              ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESC[c] or ("\\u%04x"):format(c:byte())
  end) .. '"'
end

local function is_array(t)
  local n = #t
  if n == 0 then return next(t) == nil and getmetatable(t) == M.array_mt end
  local count = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
    count = count + 1
  end
  return count == n
end

-- Marks a table as a JSON array even when it is empty.
M.array_mt = { __name = "json.array" }
function M.array(t) return setmetatable(t or {}, M.array_mt) end

local function encode(v, out, indent, depth)
  local tv = type(v)
  if v == nil or v == M.null then out[#out + 1] = "null"
  elseif tv == "boolean" then out[#out + 1] = tostring(v)
  elseif tv == "number" then
    if v ~= v or v == huge or v == -huge then out[#out + 1] = "null"
    elseif math.type(v) == "integer" then out[#out + 1] = ("%d"):format(v)
    else
      local s = ("%.17g"):format(v)
      local short = ("%.15g"):format(v)
      if tonumber(short) == v then s = short end
      out[#out + 1] = s
    end
  elseif tv == "string" then out[#out + 1] = json_string(v)
  elseif tv == "table" then
    local pad = indent and ("\n" .. (" "):rep(indent * (depth + 1))) or ""
    local close = indent and ("\n" .. (" "):rep(indent * depth)) or ""
    local colon = indent and ": " or ":"
    if is_array(v) then
      if #v == 0 then out[#out + 1] = "[]" return end
      -- short arrays of scalars stay on one line
      local flat = true
      for i = 1, #v do if type(v[i]) == "table" and v[i] ~= M.null then flat = false end end
      out[#out + 1] = "["
      for i = 1, #v do
        if i > 1 then out[#out + 1] = flat and (indent and ", " or ",") or "," end
        if not flat then out[#out + 1] = pad end
        encode(v[i], out, indent, depth + 1)
      end
      out[#out + 1] = flat and "]" or (close .. "]")
    else
      local keys = {}
      for k in pairs(v) do
        if type(k) ~= "string" and math.type(k) ~= "integer" then
          error("json: cannot encode a key of type " .. type(k))
        end
        keys[#keys + 1] = k
      end
      sort(keys, function(a, b)
        if type(a) == type(b) then return a < b end
        return type(a) == "number"
      end)
      if #keys == 0 then out[#out + 1] = "{}" return end
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        out[#out + 1] = pad
        out[#out + 1] = json_string(tostring(k))
        out[#out + 1] = colon
        encode(v[k], out, indent, depth + 1)
      end
      out[#out + 1] = close .. "}"
    end
  else
    error("json: cannot encode a " .. tv)
  end
end

-- JSON text of a value (tables with keys 1..n are arrays, other tables
-- objects with sorted keys; M.null is null).  indent: spaces per level.
function M.json(v, indent)
  local out = {}
  encode(v, out, indent, 0)
  return concat(out)
end

function M.csv_field(v)
  if v == nil or v == M.null then return "" end
  local s = tostring(v)
  if math.type(v) == "float" then s = ("%.9g"):format(v) end
  if s:find('[",\r\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end

-- }======

-- {====== command line

local STANDARD_OPTIONS = {
  { "runs", "N", "integer", "timed rounds per case (default %s)" },
  { "warmup", "N", "integer0", "untimed rounds first (default %s)" },
  { "json", "FILE", "string", "write every run and the summary as JSON" },
  { "csv", "FILE", "string", "write the summary as CSV, one row per case" },
  { "svg", "FILE", "string", "write the suite's chart(s) as SVG ({chart} in FILE: the chart's name)" },
  { "quick", nil, "flag", "tiny sizes: a smoke test, not a measurement" },
  { "filter", "PATTERN", "string", "run only the cases whose group or name contains PATTERN (a Lua pattern)" },
}

local function option_list(extra)
  local list = {}
  for _, o in ipairs(STANDARD_OPTIONS) do list[#list + 1] = o end
  for _, o in ipairs(extra or {}) do
    list[#list + 1] = { o[1] or o.name, o[2] or o.arg, o[3] or o.type or "string", o[4] or o.help or "" }
  end
  return list
end

-- The usage text.  defaults: {runs =, warmup =}.
function M.usage(script, extra, defaults)
  defaults = defaults or {}
  local lines, short = {}, {}
  for _, o in ipairs(option_list(extra)) do
    local flag = "--" .. o[1] .. (o[2] and (" " .. o[2]) or "")
    short[#short + 1] = "[" .. flag .. "]"
    local help = o[4]:gsub("%%s", tostring(defaults[o[1]] or "?"))
    lines[#lines + 1] = ("  %-16s %s"):format(flag, help)
  end
  return ("usage: luapool %s %s\n%s\n"):format(script or "SUITE.lua", concat(short, " "), concat(lines, "\n"))
end

-- Parses a suite's command line.  Returns a table of options (runs,
-- warmup, json, csv, svg, quick, help, and the extra ones by name) or nil
-- and a message.  extra: list of {name, ARG or nil, type, help} with type
-- "integer", "integer0" (>= 0), "number", "string" or "flag".
function M.parse_args(args, extra)
  local spec = {}
  for _, o in ipairs(option_list(extra)) do spec[o[1]] = o end
  local opts = {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "-h" or a == "--help" then
      opts.help = true
    else
      local name, inline = tostring(a):match("^%-%-([%w%-_]+)=(.*)$")
      if not name then name = tostring(a):match("^%-%-([%w%-_]+)$") end
      local o = name and spec[name]
      if not o then
        if name then return nil, "unknown option '" .. a .. "'" end
        return nil, "unexpected argument '" .. tostring(a) .. "'"
      end
      if o[3] == "flag" then
        if inline then return nil, "option --" .. name .. " takes no value" end
        opts[name] = true
      else
        local v = inline
        if v == nil then
          i = i + 1
          v = args[i]
        end
        if v == nil then return nil, "option --" .. name .. " needs " .. (o[2] or "a value") end
        if o[3] == "integer" or o[3] == "integer0" then
          local n = math.tointeger(tonumber(v))
          local lo = o[3] == "integer" and 1 or 0
          if not n or n < lo then
            return nil, ("option --%s needs an integer >= %d, got '%s'"):format(name, lo, v)
          end
          v = n
        elseif o[3] == "number" then
          local n = tonumber(v)
          if not n then return nil, ("option --%s needs a number, got '%s'"):format(name, v) end
          v = n
        end
        opts[name] = v
      end
    end
    i = i + 1
  end
  return opts
end

-- }======

-- {====== suites

local Suite = {}
Suite.__index = Suite

local function script_name()
  local a = rawget(_G, "arg")
  return type(a) == "table" and a[0] or nil
end

-- Declares a suite.  def: name, title, runs (5), warmup (1), options (extra
-- command-line options, see parse_args), args (parse the command line now,
-- so the suite can read suite.quick and suite.opts while declaring cases),
-- output (function receiving the report's text; default stdout), progress
-- (false: no progress bar), clock (wall clock in seconds; luapool.now).
function M.suite(def)
  def = def or {}
  assert(type(def.name) == "string", "bench.suite: name (a string) expected")
  local self = setmetatable({
    name = def.name, title = def.title, runs = def.runs or 5, warmup = def.warmup or 1,
    default_runs = def.runs or 5, default_warmup = def.warmup or 1,
    extra_options = def.options or {}, output = def.output, show_progress = def.progress ~= false,
    cases = {}, by_name = {}, groups = {}, group_order = {}, charts = {}, notes = {},
    opts = {}, quick = false, parsed = false, script = def.script or script_name(),
    clock = def.clock or now,
  }, Suite)
  if def.args then self:parse(def.args) end
  return self
end

function Suite:usage()
  return M.usage(self.script, self.extra_options, { runs = self.default_runs, warmup = self.default_warmup })
end

-- Parses the command line into the suite: runs, warmup, quick, output
-- files and suite.opts (every option by name).  --help prints the usage and
-- exits 0; a bad command line prints it on stderr and exits 2.
function Suite:parse(args)
  local opts, err = M.parse_args(args or {}, self.extra_options)
  if not opts then
    io.stderr:write(self.name, ": ", err, "\n", self:usage())
    os.exit(2)
  end
  if opts.help then
    io.stdout:write(self.title and (self.name .. ": " .. self.title .. "\n") or "", self:usage())
    os.exit(0)
  end
  for _, o in ipairs(self.extra_options) do
    local name, default = o[1] or o.name, o.default
    if opts[name] == nil then opts[name] = default end
  end
  self.opts = opts
  self.runs = opts.runs or self.default_runs
  self.warmup = opts.warmup or self.default_warmup
  self.quick = opts.quick or false
  self.json_file, self.csv_file, self.svg_file = opts.json, opts.csv, opts.svg
  self.filter = opts.filter
  if self.filter and not pcall(string.find, "", self.filter) then
    io.stderr:write(self.name, ": bad pattern for --filter: ", self.filter, "\n", self:usage())
    os.exit(2)
  end
  self.parsed = true
  return opts
end

local function group_of(self, name)
  local g = self.groups[name]
  if not g then
    g = { name = name, cases = {} }
    self.groups[name] = g
    self.group_order[#self.group_order + 1] = name
  end
  return g
end

-- Declares one case; returns it.  c: name (unique), group ("main"),
-- params (table, reported as is), setup(params) -> state, body(state,
-- params) (the timed part), teardown(state, params), baseline (name of a
-- case of the same group: the group's baseline when the first case naming
-- one), units and unit (the body does `units` units of work: the report
-- adds time per unit and units per second).
function Suite:case(c)
  assert(type(c) == "table", "suite:case: table expected")
  assert(type(c.name) == "string", "suite:case: name (a string) expected")
  assert(type(c.body) == "function", "suite:case '" .. c.name .. "': body (a function) expected")
  assert(not self.by_name[c.name], "suite:case: duplicate case name '" .. c.name .. "'")
  local case = {
    name = c.name, group = c.group or "main", params = c.params or {},
    setup = c.setup, body = c.body, teardown = c.teardown, baseline = c.baseline,
    units = c.units, unit = c.unit, note = c.note,
  }
  if case.units ~= nil then
    assert(type(case.units) == "number" and case.units > 0,
      "suite:case '" .. c.name .. "': units must be a positive number")
  end
  local g = group_of(self, case.group)
  if case.baseline and not g.baseline then g.baseline = case.baseline end
  g.cases[#g.cases + 1] = case
  self.cases[#self.cases + 1] = case
  self.by_name[case.name] = case
  return case
end

local function expand_name(template, params)
  if type(template) == "function" then return template(params) end
  return (template:gsub("{([%w_]+)}", function(k)
    local v = params[k]
    if v == nil then return "{" .. k .. "}" end
    return tostring(v)
  end))
end

-- Declares the cartesian product of parameter values as cases; returns the
-- list.  p: axes (a list of {name, values} pairs, in the order they vary,
-- the last fastest; or a table name -> values, taken in name order), fixed
-- (params every case gets), filter(params) -> false to skip a combination,
-- name (a template with {param} or a function(params)), group (a string
-- or a function(params)), and setup/body/teardown/baseline/unit as for
-- case; units may be a function(params).
function Suite:product(p)
  assert(type(p) == "table" and type(p.axes) == "table", "suite:product: axes expected")
  assert(p.name, "suite:product: name (template or function) expected")
  local axes = {}
  if #p.axes > 0 then
    for _, a in ipairs(p.axes) do axes[#axes + 1] = { a[1], a[2] } end
  else
    for k, v in pairs(p.axes) do axes[#axes + 1] = { k, v } end
    sort(axes, function(a, b) return a[1] < b[1] end)
  end
  local made = {}
  local params = {}
  local function rec(k)
    if k > #axes then
      local full = {}
      for key, v in pairs(p.fixed or {}) do full[key] = v end
      for key, v in pairs(params) do full[key] = v end
      if p.filter and not p.filter(full) then return end
      local function field(v) if type(v) == "function" then return v(full) end return v end
      made[#made + 1] = self:case {
        name = expand_name(p.name, full), group = field(p.group), params = full,
        setup = p.setup, body = p.body, teardown = p.teardown, baseline = field(p.baseline),
        units = field(p.units), unit = field(p.unit), note = field(p.note),
      }
      return
    end
    local name, values = axes[k][1], axes[k][2]
    for _, v in ipairs(values) do
      params[name] = v
      rec(k + 1)
    end
    params[name] = nil
  end
  rec(1)
  return made
end

-- Declares a chart that run writes when given --svg (see Suite:svg for
-- the options; `name` tells several charts apart).
function Suite:chart(opts)
  self.charts[#self.charts + 1] = opts
end

-- A line printed under the table (a caveat, how to read a column).
function Suite:note(text)
  self.notes[#self.notes + 1] = text
end

local function emit(self, text)
  if self.output then self.output(text) else io.stdout:write(text) io.stdout:flush() end
end

-- Runs one case once; returns wall seconds, CPU seconds, peak RSS (KiB or nil).
local function run_once(case, clock)
  collectgarbage("collect")
  local hwm_ok = reset_hwm()
  local state
  if case.setup then state = case.setup(case.params) end
  local c0, t0 = os.clock(), clock()
  local ok, err = pcall(case.body, state, case.params)
  local t1, c1 = clock(), os.clock()
  if case.teardown then case.teardown(state, case.params) end
  if not ok then
    error(("bench: case '%s' failed: %s"):format(case.name, tostring(err)), 0)
  end
  return t1 - t0, c1 - c0, hwm_ok and read_hwm() or nil
end

local function finish_case(case, rec, base)
  local r = {
    name = case.name, group = case.group, params = case.params, runs = rec.wall,
    cpu = rec.cpu, min = M.min(rec.wall), median = M.median(rec.wall), max = M.max(rec.wall),
    cpu_median = M.median(rec.cpu), peak_rss_kb = rec.rss, baseline = case.baseline_name,
    units = case.units, unit = case.unit, note = case.note,
  }
  if base then r.ratio = M.paired_ratio(rec.wall, base.wall) end
  if r.units then r.per_unit = r.median / r.units end
  return r
end

-- Runs the suite: parses args when given (or when nothing was parsed
-- yet), prints the machine and the table, writes the files asked for and
-- returns the results (also in suite.results).
function Suite:run(args)
  if args or not self.parsed then self:parse(args or {}) end
  local machine = M.machine()
  self.machine = machine
  local total = 0
  -- --filter: keep the matching cases, and the baselines they need
  local keep
  if self.filter then
    keep = {}
    for _, case in ipairs(self.cases) do
      if case.group:find(self.filter) or case.name:find(self.filter) then
        keep[case] = true
        local g = self.groups[case.group]
        local b = self.by_name[case.baseline or g.baseline or ""]
        if b and b.group == case.group then keep[b] = true end
      end
    end
  end
  local groups, order, cases_run = {}, {}, {}
  for _, gname in ipairs(self.group_order) do
    local g = self.groups[gname]
    local list = {}
    for _, case in ipairs(g.cases) do
      if not keep or keep[case] then list[#list + 1] = case; cases_run[#cases_run + 1] = case end
    end
    if #list > 0 then
      groups[gname] = { name = gname, cases = list, baseline = g.baseline }
      order[#order + 1] = gname
    end
  end
  for _, gname in ipairs(order) do
    local g = groups[gname]
    total = total + #g.cases
    for _, case in ipairs(g.cases) do
      local b = case.baseline or g.baseline
      if b then
        local found
        for _, c in ipairs(g.cases) do if c.name == b then found = c end end
        if not found then
          error(("bench: case '%s': no baseline case '%s' in group '%s'"):format(case.name, b, gname), 2)
        end
        case.baseline_name = b
      end
    end
  end

  emit(self, ("suite: %s%s\n"):format(self.name, self.title and (" - " .. self.title) or ""))
  emit(self, "machine: " .. M.describe_machine(machine) .. "\n")
  emit(self, ("runs: %d timed (+%d warm-up) per case, interleaved by group%s\n")
    :format(self.runs, self.warmup, self.quick and "; --quick: tiny sizes, not a measurement" or ""))
  if machine.loadavg and machine.cpus and machine.loadavg >= 0.5 then
    emit(self, ("warning: load average %.2f on %d cpus at the start: the machine is busy, "
      .. "and parallel speedups will show it\n"):format(machine.loadavg, machine.cpus))
  end
  emit(self, "\n")

  local bar
  if self.show_progress and total > 0 then
    local ok, progress = pcall(require, "luapool.progress")
    if ok then bar = progress.new { label = self.name, total = self.runs * total } end
  end
  local done = 0
  local records = {}
  local t_start = now()
  for _, gname in ipairs(order) do
    local cases = groups[gname].cases
    local n = #cases
    for _, case in ipairs(cases) do records[case] = { wall = {}, cpu = {}, rss = nil } end
    for round = 1, self.warmup + self.runs do
      local timed = round > self.warmup
      local shift = (round - 1) % n
      for k = 1, n do
        local case = cases[(k - 1 + shift) % n + 1]
        local wall, cpu, rss = run_once(case, self.clock)
        if timed then
          local rec = records[case]
          rec.wall[#rec.wall + 1] = wall
          rec.cpu[#rec.cpu + 1] = cpu
          if rss and (rec.rss == nil or rss > rec.rss) then rec.rss = rss end
          done = done + 1
          -- the last one is left to finish(), which draws the final line
          if bar and done < bar.total then bar:update(done) end
        end
      end
    end
  end
  if bar then
    bar.done = done
    bar:finish()
  end

  local results = {}
  for _, case in ipairs(cases_run) do
    local base = case.baseline_name and records[self.by_name[case.baseline_name]]
    results[#results + 1] = finish_case(case, records[case], base)
  end
  self.results = results
  self.elapsed = now() - t_start
  machine.loadavg_end = M.loadavg()

  emit(self, self:table())
  for _, n in ipairs(self.notes) do emit(self, n .. "\n") end
  if self.json_file then assert(self:write_json(self.json_file)) end
  if self.csv_file then assert(self:write_csv(self.csv_file)) end
  if self.svg_file then
    if #self.charts == 0 then
      io.stderr:write(self.name, ": this suite declares no chart; --svg ignored\n")
    end
    for k, chart in ipairs(self.charts) do
      local file = self.svg_file
      if file:find("{chart}", 1, true) then
        file = file:gsub("{chart}", chart.name or tostring(k))
      elseif k > 1 then
        file = file:gsub("%.svg$", "") .. "-" .. (chart.name or tostring(k)) .. ".svg"
      end
      local ok, err = self:svg(file, chart)
      if ok then
        emit(self, "wrote " .. file .. "\n")
      else -- e.g. --filter left the chart no data
        io.stderr:write(self.name, ": chart '", tostring(chart.name or k), "' not written: ", tostring(err), "\n")
      end
    end
  end
  return results
end

-- Looks up a result by case name.
function Suite:result(name)
  for _, r in ipairs(self.results or {}) do
    if r.name == name then return r end
  end
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

-- The report table as text.
function Suite:table()
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
    local ratio = M.format_ratio(r.ratio)
    if r.baseline == r.name then ratio = "base" end
    local row = { r.group, r.name, M.format_time(r.min), M.format_time(r.median), M.format_time(r.max),
                  M.format_time(r.cpu_median), M.format_kb(r.peak_rss_kb), ratio }
    if with_units then
      if r.units then
        row[#row + 1] = M.format_time(r.per_unit) .. "/" .. (r.unit or "unit")
        row[#row + 1] = M.format_rate(r.units / r.median, r.unit)
      else
        row[#row + 1] = "-"
        row[#row + 1] = "-"
      end
    end
    rows[#rows + 1] = row
  end
  local text = M.format_table(header, rows, align)
  return text .. "ratio: median over runs of time / baseline time in the same round (<1: faster)"
    .. "; cpu: this process's CPU time (worker processes not included)\n"
end

-- The results as a JSON-able table.
function Suite:report()
  local cases = {}
  for _, r in ipairs(assert(self.results, "suite:report: run the suite first")) do
    local params = {}
    for k, v in pairs(r.params) do params[k] = v end
    cases[#cases + 1] = {
      name = r.name, group = r.group, params = params, runs = M.array(r.runs),
      cpu = M.array(r.cpu), min = r.min, median = r.median, max = r.max,
      cpu_median = r.cpu_median, peak_rss_kb = r.peak_rss_kb or M.null,
      ratio = r.ratio or M.null, baseline = r.baseline or M.null,
      units = r.units or M.null, unit = r.unit or M.null, per_unit = r.per_unit or M.null,
    }
  end
  return {
    suite = self.name, title = self.title or M.null, machine = self.machine,
    runs = self.runs, warmup = self.warmup, quick = self.quick, cases = M.array(cases),
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

function Suite:write_json(file)
  return write_file(file, M.json(self:report(), 2) .. "\n")
end

M.CSV_HEADER = { "suite", "group", "case", "params", "runs", "min_s", "median_s", "max_s",
                 "cpu_median_s", "peak_rss_kb", "ratio", "baseline", "units", "unit", "per_unit_s" }

function Suite:write_csv(file)
  local lines = { concat(M.CSV_HEADER, ",") }
  for _, r in ipairs(assert(self.results, "suite:write_csv: run the suite first")) do
    local keys = {}
    for k in pairs(r.params) do keys[#keys + 1] = tostring(k) end
    sort(keys)
    local p = {}
    for _, k in ipairs(keys) do p[#p + 1] = k .. "=" .. tostring(r.params[k]) end
    local row = { self.name, r.group, r.name, concat(p, ";"), #r.runs, r.min, r.median, r.max,
                  r.cpu_median, r.peak_rss_kb, r.ratio, r.baseline, r.units, r.unit, r.per_unit }
    for i = 1, #M.CSV_HEADER do row[i] = M.csv_field(row[i]) end
    lines[#lines + 1] = concat(row, ",")
  end
  return write_file(file, concat(lines, "\n") .. "\n")
end

-- }======

-- {====== SVG line charts

local PALETTE = { "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                  "#17becf", "#7f7f7f", "#bcbd22" }

local function xml(s)
  return (tostring(s):gsub("[&<>\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }))
end

local function num(v) return ("%.1f"):format(v) end

-- Series i's marker at (x, y): circle, square, diamond, triangle, in turn,
-- so lines that overlap stay distinguishable.
local function marker(i, x, y, color, inner)
  local shape = (i - 1) % 4
  local open = inner ~= "" and (">" .. inner) or "/>"
  local close = inner ~= "" and "</%s>" or ""
  if shape == 0 then
    return ('<circle cx="%s" cy="%s" r="4" fill="%s"'):format(num(x), num(y), color) .. open
      .. close:format("circle")
  elseif shape == 1 then
    return ('<rect x="%s" y="%s" width="7" height="7" fill="%s"'):format(num(x - 3.5), num(y - 3.5), color)
      .. open .. close:format("rect")
  end
  local pts
  if shape == 2 then
    pts = { x, y - 5, x + 5, y, x, y + 5, x - 5, y }
  else
    pts = { x, y - 5, x + 5, y + 4, x - 5, y + 4 }
  end
  local s = {}
  for k = 1, #pts, 2 do s[#s + 1] = num(pts[k]) .. "," .. num(pts[k + 1]) end
  return ('<polygon points="%s" fill="%s"'):format(concat(s, " "), color) .. open .. close:format("polygon")
end

-- Ticks at 1, 2, 5 x 10^k covering [lo, hi] (about n of them).
local function nice_ticks(lo, hi, n)
  if hi <= lo then hi = lo + (lo == 0 and 1 or math.abs(lo)) end
  local raw = (hi - lo) / (n or 5)
  local mag = 10 ^ floor(math.log(raw, 10))
  local step = mag
  for _, m in ipairs { 1, 2, 2.5, 5, 10 } do
    if raw <= m * mag then step = m * mag break end
  end
  local first = floor(lo / step + 1e-9) * step
  local last = math.ceil(hi / step - 1e-9) * step
  local ticks = {}
  for k = 0, floor((last - first) / step + 0.5) do ticks[#ticks + 1] = first + k * step end
  return ticks, first, last
end

-- Ticks for a log axis: powers of ten (with 2 and 5 when few decades).
local function log_ticks(lo, hi)
  local ticks = {}
  local e0, e1 = floor(math.log(lo, 10) + 1e-9), math.ceil(math.log(hi, 10) - 1e-9)
  local mult = (e1 - e0 <= 2) and { 1, 2, 5 } or { 1 }
  for e = e0, e1 do
    for _, m in ipairs(mult) do
      local v = m * 10 ^ e
      if v >= lo * (1 - 1e-9) and v <= hi * (1 + 1e-9) then ticks[#ticks + 1] = v end
    end
  end
  return ticks
end

local function y_value(r, which)
  if which == "median" or which == nil then return r.median end
  if which == "min" then return r.min end
  if which == "per_unit" then return r.per_unit end
  if which == "ratio" then return r.ratio end
  if which == "rate" then return r.units and r.units / r.median end
  error("svg: unknown y '" .. tostring(which) .. "'")
end

-- Writes an SVG line chart of the results: y (median wall time by default;
-- "min", "per_unit", "ratio" or "rate") against the numeric parameter x,
-- one line with markers per value of the parameter `series` (or per value
-- of series(result) when a function).  Options: group (a group name or a
-- list of them: only their cases), title, x_label, y_label, log_x, log_y,
-- width, height, reference (default true: the cases of those groups that
-- lack x, such as a sequential baseline, become dashed horizontal lines),
-- lines (a list of {label =, fn = function(x) -> y}: dotted curves such as
-- an ideal, sampled at the x values of the data).
-- Returns true, or nil and a message.
function Suite:svg(file, o)
  local svg, err = self:svg_text(o)
  if not svg then return nil, err end
  return write_file(file, svg)
end

function Suite:svg_text(o)
  o = o or {}
  local results = self.results
  if not results then return nil, "svg: run the suite first" end
  if not o.x then return nil, "svg: option x (a parameter name) expected" end
  local groups
  if type(o.group) == "string" then groups = { [o.group] = true }
  elseif type(o.group) == "table" then
    groups = {}
    for _, g in ipairs(o.group) do groups[g] = true end
  end
  local function label_of(r)
    if type(o.series) == "function" then return tostring(o.series(r)) end
    if o.series then return tostring(r.params[o.series]) end
    return o.label or "median"
  end
  local series, order, refs, ref_color, ngroups = {}, {}, {}, {}, 0
  for _, r in ipairs(results) do
    if not groups or groups[r.group] then
      local y = y_value(r, o.y)
      local x = r.params[o.x]
      if type(x) == "number" and type(y) == "number" then
        local key = label_of(r)
        if not series[key] then
          series[key] = {}
          order[#order + 1] = key
          -- a reference line takes the colour of the first series of its group
          if not ref_color[r.group] then
            ref_color[r.group] = PALETTE[(#order - 1) % #PALETTE + 1]
            ngroups = ngroups + 1
          end
        end
        local pts = series[key]
        pts[#pts + 1] = { x, y }
      elseif x == nil and type(y) == "number" and o.reference ~= false then
        refs[#refs + 1] = { r.name, y, r.group }
      end
    end
  end
  if #order == 0 then return nil, "svg: no case has a numeric parameter '" .. tostring(o.x) .. "'" end
  for _, ref in ipairs(refs) do
    ref[3] = (ngroups > 1 and ref_color[ref[3]]) or "#555555"
  end
  for _, k in ipairs(order) do sort(series[k], function(a, b) return a[1] < b[1] end) end

  -- the legend's width follows its longest label (about 6.6 px a character)
  local longest = 0
  for _, k in ipairs(order) do longest = math.max(longest, utf8.len(k) or #k) end
  for _, ref in ipairs(refs) do longest = math.max(longest, #ref[1] + 11) end
  for _, l in ipairs(o.lines or {}) do longest = math.max(longest, #(l.label or "")) end
  local left, right, top, bottom = 78, math.max(160, 48 + math.ceil(6.6 * longest)), 44, 58
  local W, H = o.width or (left + 480 + right), o.height or 460
  local pw, ph = W - left - right, H - top - bottom

  -- x scale
  local xmin, xmax, ymin, ymax = huge, -huge, huge, -huge
  local xs = {}
  for _, k in ipairs(order) do
    for _, p in ipairs(series[k]) do
      xmin, xmax = math.min(xmin, p[1]), math.max(xmax, p[1])
      ymin, ymax = math.min(ymin, p[2]), math.max(ymax, p[2])
      xs[p[1]] = true
    end
  end
  for _, ref in ipairs(refs) do ymin, ymax = math.min(ymin, ref[2]), math.max(ymax, ref[2]) end
  -- extra curves (o.lines: {label =, fn = function(x) -> y}), sampled at the data's x values
  local curves = {}
  do
    local distinct = {}
    for v in pairs(xs) do distinct[#distinct + 1] = v end
    sort(distinct)
    for _, l in ipairs(o.lines or {}) do
      local pts = {}
      for _, x in ipairs(distinct) do
        local y = l.fn(x)
        if type(y) == "number" and y == y then
          pts[#pts + 1] = { x, y }
          ymin, ymax = math.min(ymin, y), math.max(ymax, y)
        end
      end
      if #pts > 0 then curves[#curves + 1] = { label = l.label or "", pts = pts } end
    end
  end
  local log_x = o.log_x and xmin > 0
  local log_y = o.log_y and ymin > 0
  local xticks
  local fx
  if log_x then
    local lo, hi = math.log(xmin), math.log(xmax)
    if hi <= lo then hi = lo + 1 end
    fx = function(v) return left + (math.log(v) - lo) / (hi - lo) * pw end
    local distinct = {}
    for v in pairs(xs) do distinct[#distinct + 1] = v end
    sort(distinct)
    xticks = #distinct <= 12 and distinct or log_ticks(xmin, xmax)
  else
    local t, lo, hi = nice_ticks(math.min(xmin, o.x_zero and 0 or xmin), xmax, 6)
    xticks = t
    fx = function(v) return left + (v - lo) / (hi - lo) * pw end
  end
  local yticks, fy
  if log_y then
    local lo = 10 ^ floor(math.log(ymin, 10))
    local hi = 10 ^ math.ceil(math.log(ymax, 10))
    if hi <= lo then hi = lo * 10 end
    local ll, lh = math.log(lo), math.log(hi)
    fy = function(v) return top + ph - (math.log(v) - ll) / (lh - ll) * ph end
    yticks = log_ticks(lo, hi)
  else
    local t, lo, hi = nice_ticks(0, ymax * 1.05, 5)
    yticks = t
    fy = function(v) return top + ph - (v - lo) / (hi - lo) * ph end
  end
  local which = o.y or "median"
  local function ylabel_text(v)
    if which == "ratio" then return ("%gx"):format(tonumber(("%.3g"):format(v))) end
    if which == "rate" then return M.format_count(v) end
    return M.format_time(v)
  end

  local out = {}
  local function add(s) out[#out + 1] = s end
  add(('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
    .. 'font-family="sans-serif" font-size="12">'):format(W, H, W, H))
  local title = o.title or (self.title or self.name)
  add("<title>" .. xml(title) .. "</title>")
  add(('<rect x="0" y="0" width="%d" height="%d" fill="#ffffff"/>'):format(W, H))
  add(('<text x="%s" y="24" font-size="15" font-weight="bold" text-anchor="middle">%s</text>')
    :format(num(left + pw / 2), xml(title)))
  -- grid and ticks
  add('<g stroke="#e5e5e5" stroke-width="1">')
  for _, v in ipairs(yticks) do
    local y = fy(v)
    if y >= top - 0.5 and y <= top + ph + 0.5 then
      add(('<line x1="%d" y1="%s" x2="%d" y2="%s"/>'):format(left, num(y), left + pw, num(y)))
    end
  end
  for _, v in ipairs(xticks) do
    local x = fx(v)
    add(('<line x1="%s" y1="%d" x2="%s" y2="%d"/>'):format(num(x), top, num(x), top + ph))
  end
  add("</g>")
  add(('<g stroke="#333333" stroke-width="1"><line x1="%d" y1="%d" x2="%d" y2="%d"/>'
    .. '<line x1="%d" y1="%d" x2="%d" y2="%d"/></g>'):format(left, top + ph, left + pw, top + ph,
    left, top, left, top + ph))
  add('<g fill="#333333">')
  for _, v in ipairs(yticks) do
    local y = fy(v)
    if y >= top - 0.5 and y <= top + ph + 0.5 then
      add(('<text x="%d" y="%s" text-anchor="end">%s</text>'):format(left - 6, num(y + 4), xml(ylabel_text(v))))
    end
  end
  for _, v in ipairs(xticks) do
    add(('<text x="%s" y="%d" text-anchor="middle">%s</text>'):format(num(fx(v)), top + ph + 18,
      xml(("%g"):format(v))))
  end
  add("</g>")
  add(('<text x="%s" y="%d" text-anchor="middle">%s</text>'):format(num(left + pw / 2), H - 14,
    xml(o.x_label or o.x)))
  add(('<text x="16" y="%s" text-anchor="middle" transform="rotate(-90 16 %s)">%s</text>')
    :format(num(top + ph / 2), num(top + ph / 2),
      xml(o.y_label or (which == "median" and "median wall time" or which))))
  -- extra curves: dotted grey paths
  for _, c in ipairs(curves) do
    local d = {}
    for k, p in ipairs(c.pts) do d[#d + 1] = (k == 1 and "M" or "L") .. num(fx(p[1])) .. " " .. num(fy(p[2])) end
    add(('<path d="%s" fill="none" stroke="#888888" stroke-width="1.5" stroke-dasharray="2 3"/>')
      :format(concat(d, " ")))
  end
  -- reference lines
  for _, ref in ipairs(refs) do
    local y = fy(ref[2])
    add(('<line x1="%d" y1="%s" x2="%d" y2="%s" stroke="%s" stroke-width="1.5" '
      .. 'stroke-dasharray="6 4"/>'):format(left, num(y), left + pw, num(y), ref[3]))
  end
  -- series
  for i, key in ipairs(order) do
    local color = PALETTE[(i - 1) % #PALETTE + 1]
    local pts = {}
    for _, p in ipairs(series[key]) do pts[#pts + 1] = num(fx(p[1])) .. "," .. num(fy(p[2])) end
    add(('<g class="series"><polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>')
      :format(color, concat(pts, " ")))
    for _, p in ipairs(series[key]) do
      add(marker(i, fx(p[1]), fy(p[2]), color,
        ("<title>%s: %s = %g, %s</title>"):format(xml(key), xml(o.x), p[1], xml(ylabel_text(p[2])))))
    end
    add("</g>")
  end
  -- legend
  local lx, ly = left + pw + 16, top + 8
  add('<g class="legend">')
  for i, key in ipairs(order) do
    local color = PALETTE[(i - 1) % #PALETTE + 1]
    local y = ly + (i - 1) * 20
    add(('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"/>'):format(lx, y, lx + 22, y, color))
    add(marker(i, lx + 11, y, color, ""))
    add(('<text x="%d" y="%d">%s</text>'):format(lx + 28, y + 4, xml(key)))
  end
  for j, c in ipairs(curves) do
    local y = ly + (#order + #refs + j - 1) * 20
    add(('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#888888" stroke-width="1.5" stroke-dasharray="2 3"/>')
      :format(lx, y, lx + 22, y))
    add(('<text x="%d" y="%d">%s</text>'):format(lx + 28, y + 4, xml(c.label)))
  end
  for j, ref in ipairs(refs) do
    local y = ly + (#order + j - 1) * 20
    add(('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="1.5" stroke-dasharray="6 4"/>')
      :format(lx, y, lx + 22, y, ref[3]))
    add(('<text x="%d" y="%d">%s (%s)</text>'):format(lx + 28, y + 4, xml(ref[1]), xml(ylabel_text(ref[2]))))
  end
  add("</g>")
  if o.caption then
    add(('<text x="%d" y="%d" font-size="10" fill="#666666">%s</text>'):format(lx, top + ph, xml(o.caption)))
  end
  add("</svg>")
  return concat(out, "\n") .. "\n"
end

-- }======

M.Suite = Suite
return M
