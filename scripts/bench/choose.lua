-- Threads for I/O, processes for CPU?  The lesson, measured.
--
-- usage: luapool scripts/bench/choose.lua [--quick] [--runs N] [--warmup N] [--filter PATTERN]
--                                          [--json FILE] [--csv FILE] [--svg FILE]
--   --svg 'docs/choose-{chart}.svg' writes docs/choose-io.svg and docs/choose-cpu.svg
--
-- I/O job: fetch K URLs that each take 50 ms (the local nginx fixture's
-- /sleep) one after the other in the main thread (the baseline), then on a
-- threadpool and on a processpool of 1, 2, 4, 8, 16 and 32 workers.
-- CPU jobs: four numbers of about five million, each reduced by a loop, one
-- after the other (the baseline) and on both pools with 1, 2 and 4 workers:
--   native  luapool.kernels.sum_squares (C, exact 128-bit; no Lua state)
--   large   the same kernel on four numbers of about 2e8 (work that lasts)
--   lua     a pure-Lua loop: sum of i*i modulo a prime, integers only
-- Every pool job starts its pool, runs the job and closes the pool inside
-- the timing: the cost of starting workers is part of the answer.
local bench = require "luapool.bench"
local fixture = require "luapool.fixture"

local suite = bench.suite {
  name = "choose", title = "threadpool or processpool, for I/O and for CPU", args = { ... },
}
local quick = suite.quick

local K = quick and 8 or 64                         -- fetches in the I/O job
local SLEEP = 0.05                                  -- seconds each fetch waits
local IO_WORKERS = quick and { 1, 4, 8 } or { 1, 2, 4, 8, 16, 32 }
local CPU_WORKERS = { 1, 2, 4 }
local NUMBERS = quick and { 50000, 52000, 48000, 51000 } or { 5000000, 5200000, 4800000, 5100000 }
local LARGE = quick and { 500000, 520000, 480000, 510000 }
  or { 200000000, 208000000, 192000000, 204000000 }
local POOLS = { "threadpool", "processpool" }

local srv <close> = assert(fixture.start { workers = 2 })
local urls = {}
for i = 1, K do urls[i] = srv:url(("/sleep?s=%g&i=%d"):format(SLEEP, i)) end

local fetch_length = luapool.kernels.fetch_length
local sum_squares = luapool.kernels.sum_squares

-- The pure-Lua CPU task: travels to the workers as bytecode.
local function lua_squares(n)
  local s = 0
  for i = 0, n - 1 do s = (s + i * i) % 1000000007 end
  return s
end

local function new_pool(kind, workers)
  if kind == "threadpool" then return threadpool.new { max_workers = workers, name = "choose" } end
  return processpool.new { max_workers = workers }
end

-- I/O --------------------------------------------------------------------
suite:case {
  group = "io", name = "io sequential", baseline = "io sequential", params = { fetches = K },
  body = function()
    for _, url in ipairs(urls) do assert(fetch_length(url) == 3) end
  end,
}
suite:product {
  group = "io", name = "io {pool} x{workers}", baseline = "io sequential", fixed = { fetches = K },
  axes = { { "pool", POOLS }, { "workers", IO_WORKERS } },
  body = function(_, p)
    local pool <close> = new_pool(p.pool, p.workers)
    local lengths = pool:map(fetch_length, urls)
    assert(#lengths == K and lengths[K] == 3)
  end,
}

-- CPU --------------------------------------------------------------------
local CPU_JOBS = {
  { "native", sum_squares, NUMBERS },
  { "large", sum_squares, LARGE },
  { "lua", lua_squares, NUMBERS },
}
for _, job in ipairs(CPU_JOBS) do
  local fn_name, fn, numbers = job[1], job[2], job[3]
  local group, base = "cpu-" .. fn_name, fn_name .. " sequential"
  local expect = {}
  for i, n in ipairs(numbers) do expect[i] = tostring(fn(n)) end
  suite:case {
    group = group, name = base, baseline = base, params = { fn = fn_name },
    body = function()
      for i, n in ipairs(numbers) do assert(tostring(fn(n)) == expect[i]) end
    end,
  }
  suite:product {
    group = group, name = fn_name .. " {pool} x{workers}", baseline = base, fixed = { fn = fn_name },
    axes = { { "pool", POOLS }, { "workers", CPU_WORKERS } },
    body = function(_, p)
      local pool <close> = new_pool(p.pool, p.workers)
      local results = pool:map(fn, numbers)
      for i = 1, #numbers do assert(tostring(results[i]) == expect[i]) end
    end,
  }
end

suite:chart {
  name = "io", group = "io", x = "workers", series = "pool", log_x = true, log_y = true,
  title = ("Fetching %d URLs of %g s each: time against workers"):format(K, SLEEP),
  y_label = "median wall time (log scale)", x_label = "workers (log scale)",
  lines = { { label = "ideal", fn = function(w) return math.ceil(K / w) * SLEEP end } },
}
suite:chart {
  name = "cpu", group = { "cpu-lua", "cpu-large", "cpu-native" }, x = "workers", log_x = true, log_y = true,
  series = function(r) return r.params.fn .. " " .. r.params.pool end,
  title = "CPU jobs (4 numbers): time against workers",
  y_label = "median wall time (log scale)", x_label = "workers",
}

suite:run()

-- The lesson in three lines: the best of each pool per job.
local function best(group, pool)
  local b
  for _, r in ipairs(suite.results) do
    if r.group == group and r.params.pool == pool and (not b or r.median < b.median) then b = r end
  end
  return b
end
print()
for _, group in ipairs { "io", "cpu-native", "cpu-large", "cpu-lua" } do
  local line = {}
  for _, pool in ipairs(POOLS) do
    local b = best(group, pool)
    if b then
      line[#line + 1] = ("%s best at x%d: %s (%.2fx %s)"):format(pool, b.params.workers,
        bench.format_time(b.median), b.ratio or 0, "of sequential")
    end
  end
  if #line > 0 then print(("%-11s %s"):format(group .. ":", table.concat(line, "; "))) end
end
