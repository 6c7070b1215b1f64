-- luapool.bench.runner: suites and their cases, running them, and the
-- results (luapool.bench.report turns them into a table, JSON, CSV and
-- charts).
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
local luapool = rawget(_G, "luapool") or package.loaded.luapool or require "luapool"
local cli = require "luapool.bench.cli"
local host = require "luapool.bench.machine" -- the machine measured on
local report = require "luapool.bench.report"
local stats = require "luapool.bench.stats"
local svg = require "luapool.bench.svg"
local assert, error, ipairs, pairs, pcall = assert, error, ipairs, pairs, pcall
local rawget, require, setmetatable, tostring, type = rawget, require, setmetatable, tostring, type
local collectgarbage, _G = collectgarbage, _G
local io, os, string = io, os, string
local sort = table.sort
local now = luapool.now

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

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
  return cli.usage(self.script, self.extra_options, { runs = self.default_runs, warmup = self.default_warmup })
end

-- Parses the command line into the suite: runs, warmup, quick, output
-- files and suite.opts (every option by name).  --help prints the usage and
-- exits 0; a bad command line prints it on stderr and exits 2.
function Suite:parse(args)
  local opts, err = cli.parse_args(args or {}, self.extra_options)
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
  -- an output file that cannot be written is said now, not after the runs
  for _, o in ipairs { "json", "csv" } do
    local file = opts[o]
    if file then
      local existed = io.open(file, "rb")
      if existed then existed:close() end
      local f, why = io.open(file, "ab")
      if not f then
        io.stderr:write(self.name, ": cannot write --", o, ": ", tostring(why), "\n")
        os.exit(2)
      end
      f:close()
      if not existed then os.remove(file) end
    end
  end
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
  local hwm_ok = host.reset_hwm()
  local state
  if case.setup then state = case.setup(case.params) end
  local c0, t0 = os.clock(), clock()
  local ok, err = pcall(case.body, state, case.params)
  local t1, c1 = clock(), os.clock()
  if case.teardown then case.teardown(state, case.params) end
  if not ok then
    -- Ctrl-C / SIGTERM stays the host's interruption (exit 130 / 143)
    if type(err) == "table" and err.kind == "interrupted" then error(err, 0) end
    error(("bench: case '%s' failed: %s"):format(case.name, tostring(err)), 0)
  end
  return t1 - t0, c1 - c0, hwm_ok and host.read_hwm() or nil
end

local function finish_case(case, rec, base)
  local r = {
    name = case.name, group = case.group, params = case.params, runs = rec.wall,
    cpu = rec.cpu, min = stats.min(rec.wall), median = stats.median(rec.wall), max = stats.max(rec.wall),
    cpu_median = stats.median(rec.cpu), peak_rss_kb = rec.rss, baseline = case.baseline_name,
    units = case.units, unit = case.unit, note = case.note,
  }
  if base then r.ratio = stats.paired_ratio(rec.wall, base.wall) end
  if r.units then r.per_unit = r.median / r.units end
  return r
end

-- Runs the suite: parses args when given (or when nothing was parsed
-- yet), prints the machine and the table, writes the files asked for and
-- returns the results (also in suite.results).
function Suite:run(args)
  if args or not self.parsed then self:parse(args or {}) end
  local machine = host.machine()
  self.machine = machine
  local total = 0
  -- --filter: keep the matching cases, and the baselines they need
  local keep
  if self.filter then
    keep = {}
    local function matches(text)
      -- a pattern can be malformed past what parse's check on "" reached
      local ok, hit = pcall(string.find, text, self.filter)
      if not ok then
        io.stderr:write(self.name, ": bad pattern for --filter: ", self.filter, " (", tostring(hit), ")\n")
        os.exit(2)
      end
      return hit
    end
    for _, case in ipairs(self.cases) do
      if matches(case.group) or matches(case.name) then
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
  emit(self, "machine: " .. host.describe_machine(machine) .. "\n")
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
  machine.loadavg_end = host.loadavg()

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

-- The reports are methods of a suite too (see luapool.bench.report and
-- luapool.bench.svg for what they take).
Suite.table, Suite.report = report.table, report.report
Suite.write_json, Suite.write_csv, Suite.svg = report.write_json, report.write_csv, report.svg
Suite.svg_text = svg.text

M.Suite = Suite
return M
