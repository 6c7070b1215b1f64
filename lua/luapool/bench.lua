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
-- This file is the library's face: it gathers what the modules under
-- lua/luapool/bench/ export, one concern each (how runs are measured is
-- told in runner.lua):
--   stats.lua    median, min, max, mean, paired_ratio
--   format.lua   sig3, format_time, format_kb, format_ratio, format_count,
--                format_rate, format_table
--   machine.lua  machine, loadavg, describe_machine (and the peak RSS probe)
--   json.lua     json, null, array, array_mt, csv_field
--   cli.lua      usage, parse_args
--   runner.lua   suite, Suite (suites, cases, product, run)
--   report.lua   CSV_HEADER; suite:table, report, write_json, write_csv, svg
--   svg.lua      suite:svg_text (the chart)
--
-- Plain Lua 5.4 plus luapool.now: runs in the luapool host and under stock
-- lua5.4 with require "luapool".
local cli = require "luapool.bench.cli"
local format = require "luapool.bench.format"
local json = require "luapool.bench.json"
local machine = require "luapool.bench.machine"
local report = require "luapool.bench.report"
local runner = require "luapool.bench.runner"
local stats = require "luapool.bench.stats"
local ipairs = ipairs

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

-- Exactly these names, no module's internals (spec/bench_spec.lua checks).
local function export(from, names)
  for _, name in ipairs(names) do M[name] = from[name] end
end
export(stats, { "median", "min", "max", "mean", "paired_ratio" })
export(format, { "sig3", "format_time", "format_kb", "format_ratio", "format_count", "format_rate",
                 "format_table" })
export(machine, { "machine", "loadavg", "describe_machine" })
export(json, { "null", "array_mt", "array", "json", "csv_field" })
export(cli, { "usage", "parse_args" })
export(runner, { "suite", "Suite" })
export(report, { "CSV_HEADER" })

return M
