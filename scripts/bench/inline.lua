-- An inline function against the same function made once: what a fresh
-- closure of an already-sent prototype costs per task.
--
-- usage: luapool scripts/bench/inline.lua [--tasks N] [--quick] [--runs N] [--warmup N]
--                                          [--json FILE] [--csv FILE]
--
-- Each job submits N tasks to a pool of 2 workers (started before the
-- timing, closed after it) and reads every result:
--   hoisted  the function is made once, before the loop
--   inline   pool:submit(function(x) ... end, i): a new closure per task
-- for two functions: one whose only upvalue is _ENV (function(x) return x
-- end; a worker reuses the function it loaded) and one with a real upvalue
-- (function(x) return x + k end; a worker makes a fresh closure per task,
-- since its upvalue travels with each message).  The ratio is inline over
-- hoisted for the same function on the same pool, in the same round.
local bench = require "luapool.bench"

local suite = bench.suite {
  name = "inline", title = "a fresh closure per submit against one made once",
  runs = 5, args = { ... },
  options = { { "tasks", "N", "integer", "tasks per job (default 20000; 500 with --quick)" } },
}
local N = suite.opts.tasks or (suite.quick and 500 or 20000)
local WORKERS = 2

local JOBS = {}
function JOBS.hoisted_noup(pool)
  local fs = {}
  local f = function(x) return x end
  for i = 1, N do fs[i] = pool:submit(f, i) end
  for i = 1, N do assert(fs[i]:result() == i) end
end
function JOBS.inline_noup(pool)
  local fs = {}
  for i = 1, N do fs[i] = pool:submit(function(x) return x end, i) end
  for i = 1, N do assert(fs[i]:result() == i) end
end
function JOBS.hoisted_upval(pool)
  local fs = {}
  local k = 1
  local f = function(x) return x + k end
  for i = 1, N do fs[i] = pool:submit(f, i) end
  for i = 1, N do assert(fs[i]:result() == i + 1) end
end
function JOBS.inline_upval(pool)
  local fs = {}
  local k = 1
  for i = 1, N do fs[i] = pool:submit(function(x) return x + k end, i) end
  for i = 1, N do assert(fs[i]:result() == i + 1) end
end

suite:product {
  group = function(p) return p.pool end,
  name = function(p) return ("%s %s %s"):format(p.pool, p.form, p.fn) end,
  axes = {
    { "pool", { "threadpool", "processpool" } },
    { "fn", { "noup", "upval" } },
    { "form", { "hoisted", "inline" } },
  },
  fixed = { tasks = N, workers = WORKERS },
  baseline = function(p) return ("%s hoisted %s"):format(p.pool, p.fn) end,
  units = N, unit = "task",
  setup = function(p)
    if p.pool == "threadpool" then return threadpool.new { max_workers = WORKERS } end
    return processpool.new { max_workers = WORKERS }
  end,
  body = function(pool, p) JOBS[p.form .. "_" .. p.fn](pool) end,
  teardown = function(pool) pool:shutdown() end,
}
suite:note(("%d tasks per job, %d workers; per unit = median wall time / tasks"):format(N, WORKERS))
suite:run()
