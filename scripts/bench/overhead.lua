-- Per-task overhead of the executors on no-op tasks: what a task costs
-- when the task itself costs nothing.
--
-- usage: luapool scripts/bench/overhead.lua [--tasks N] [--quick] [--runs N] [--warmup N]
--                                            [--json FILE] [--csv FILE]
--
-- Each job starts a pool of 2 workers, runs N no-op tasks and closes the
-- pool, all inside the timing (as Python's peer does: scripts/bench/peers.lua
-- runs the two side by side).  Jobs, on both pools:
--   submit   N x pool:submit, then f:result() on each future
--   map      pool:map over N items with chunksize 1, 100, 1000 or auto
--            (auto: 1 on a threadpool, about 4 chunks per worker, at most
--            1024 items, on a processpool)
--   imap     for i, r in pool:imap(...) with chunksize 1, 100, 1000 or auto
--            (auto: no options, imap's own window and adaptive chunks)
-- and two tasks: a Lua function (function(x) return x end, sent as bytecode)
-- and a native kernel (sum_squares(1): no Lua state at all).
-- The table shows time per task; the ratio is against submit of the Lua
-- function on the same pool.
--
-- Big values (group "<pool> big"): --big-tasks tasks (default 200; 20 with
-- --quick), submit + result, each returning a value made in the worker: a
-- 1 MiB string, or a table of 10,000 integers; each result is checked and
-- dropped.  Per task, against the same job with a no-op task.
local bench = require "luapool.bench"

local suite = bench.suite {
  name = "overhead", title = "per-task cost of submit, map and imap on no-op tasks",
  runs = 3, args = { ... },
  options = {
    { "tasks", "N", "integer", "tasks per job (default 100000; 2000 with --quick)" },
    { "big-tasks", "N", "integer", "tasks per big-value job (default 200; 20 with --quick)" },
  },
}
local N = suite.opts.tasks or (suite.quick and 2000 or 100000)
local BIG_N = suite.opts["big-tasks"] or (suite.quick and 20 or 200)
local WORKERS = 2

local function noop(x) return x end
local FNS = { lua = noop, kernel = luapool.kernels.sum_squares }

local ones = {}
for i = 1, N do ones[i] = 1 end

local function new_pool(kind)
  if kind == "threadpool" then return threadpool.new { max_workers = WORKERS } end
  return processpool.new { max_workers = WORKERS }
end

local JOBS = {}
function JOBS.submit(pool, fn)
  local fs = {}
  for i = 1, N do fs[i] = pool:submit(fn, 1) end
  for i = 1, N do fs[i]:result() end
end
function JOBS.map(pool, fn, chunk)
  local opts = chunk ~= "auto" and { chunksize = chunk } or nil
  assert(#pool:map(fn, ones, opts) == N)
end
function JOBS.imap(pool, fn, chunk)
  local n = 0
  local opts = chunk ~= "auto" and { chunksize = chunk } or nil
  for _ in pool:imap(fn, ones, opts) do n = n + 1 end
  assert(n == N)
end

suite:product {
  group = function(p) return p.pool end, name = function(p)
    local name = ("%s %s %s"):format(p.pool, p.method, p.fn)
    if p.chunk ~= "-" then name = name .. " chunk=" .. p.chunk end
    return name
  end,
  axes = {
    { "pool", { "threadpool", "processpool" } },
    { "method", { "submit", "map", "imap" } },
    { "fn", { "lua", "kernel" } },
    { "chunk", { "-", 1, 100, 1000, "auto" } },
  },
  fixed = { tasks = N, workers = WORKERS },
  -- submit has no chunks
  filter = function(p)
    if p.method == "submit" then return p.chunk == "-" end
    return p.chunk ~= "-"
  end,
  baseline = function(p) return p.pool .. " submit lua" end,
  units = N, unit = "task",
  body = function(_, p)
    local pool <close> = new_pool(p.pool)
    JOBS[p.method](pool, FNS[p.fn], p.chunk)
  end,
}
-- big values ------------------------------------------------------------------
local BIG = {
  ["no-op"] = { function(len) return len end, function(r) return r == 1 << 20 end },
  -- (from a 1 KiB piece: string.rep of one byte is a memcpy call a byte, 3.5 ms
  -- a MiB, which would hide what moving the string costs)
  ["1 MiB string"] = {
    function(len) return string.rep(string.rep("x", 1024), len // 1024) end,
    function(r) return #r == 1 << 20 end,
  },
  ["table of 10,000"] = {
    function(_)
      local t = {}
      for i = 1, 10000 do t[i] = i end
      return t
    end,
    function(r) return #r == 10000 and r[10000] == 10000 end,
  },
}
for _, kind in ipairs { "threadpool", "processpool" } do
  for _, what in ipairs { "no-op", "1 MiB string", "table of 10,000" } do
    local make, check = BIG[what][1], BIG[what][2]
    suite:case {
      group = kind .. " big", name = ("%s submit %s"):format(kind, what), baseline = kind .. " submit no-op",
      params = { pool = kind, value = what, tasks = BIG_N, workers = WORKERS }, units = BIG_N, unit = "task",
      body = function()
        local pool <close> = new_pool(kind)
        local fs = {}
        for i = 1, BIG_N do fs[i] = pool:submit(make, 1 << 20) end
        for i = 1, BIG_N do
          assert(check(fs[i]:result()))
          fs[i] = nil
        end
      end,
    }
  end
end
suite:note(("big values: %d tasks per job"):format(BIG_N))
suite:note(("%d no-op tasks per job, %d workers; per unit = median wall time / tasks"):format(N, WORKERS))
suite:run()
