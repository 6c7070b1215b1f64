-- HTTP fetch jobs on a threadpool, against the local nginx fixture.
--
-- usage: luapool scripts/bench/http.lua [--quick] [--runs N] [--warmup N]
--                                        [--json FILE] [--csv FILE]
--
-- latency     2000 fetches of /sleep?s=0.05 (each answer takes 50 ms) on 100
--             worker threads.  The baseline "ideal" sleeps 2000 / 100 x 50 ms
--             = 1 s: the ratio column reads "times the ideal" (target: at
--             most 1.05x; Python threads + requests: about 1.5x).
-- throughput  3000 fetches of /bytes?n=100 (100-byte bodies, no wait) on 16
--             worker threads; the rate column gives requests per second.
--             Baseline: the same fetches one after the other in the main
--             thread (one connection, kept alive).
-- Each job uses the native kernel luapool.kernels.fetch_length, and the same
-- fetches as a Lua function around luapool.http.get (a Lua state per task),
-- for comparison.  Pools start and stop inside the timing.
local bench = require "luapool.bench"
local fixture = require "luapool.fixture"

local suite = bench.suite { name = "http", title = "latency- and throughput-bound fetches", args = { ... } }
local quick = suite.quick

local LAT_N, LAT_W, SLEEP = quick and 200 or 2000, 100, 0.05
local THR_N, THR_W, BYTES = quick and 300 or 3000, 16, 100

local srv <close> = assert(fixture.start { workers = 2 })
local sleep_urls, bytes_urls = {}, {}
for i = 1, LAT_N do sleep_urls[i] = srv:url(("/sleep?s=%g&i=%d"):format(SLEEP, i)) end
for i = 1, THR_N do bytes_urls[i] = srv:url(("/bytes?n=%d&i=%d"):format(BYTES, i)) end

local fetch_length = luapool.kernels.fetch_length
local function http_get_length(url) -- the Lua-function variant of the task
  local r = assert(luapool.http.get(url))
  return #r.body, r.status
end

local function fetch_all(fn, urls, workers, expect)
  local pool <close> = threadpool.new { max_workers = workers, name = "http" }
  local lengths = pool:map(fn, urls)
  assert(#lengths == #urls and lengths[#urls] == expect)
end

-- latency ------------------------------------------------------------------
local ideal = math.ceil(LAT_N / LAT_W) * SLEEP
suite:case {
  group = "latency", name = ("ideal (%d rounds x %g s)"):format(math.ceil(LAT_N / LAT_W), SLEEP),
  baseline = nil, params = { fetches = LAT_N, workers = LAT_W },
  body = function() luapool.sleep(ideal) end, units = LAT_N, unit = "req",
}
local ideal_name = suite.cases[#suite.cases].name
suite:case {
  group = "latency", name = ("threadpool x%d fetch_length"):format(LAT_W), baseline = ideal_name,
  params = { fetches = LAT_N, workers = LAT_W, task = "kernel" }, units = LAT_N, unit = "req",
  body = function() fetch_all(fetch_length, sleep_urls, LAT_W, 3) end,
}
suite:case {
  group = "latency", name = ("threadpool x%d http.get (Lua)"):format(LAT_W), baseline = ideal_name,
  params = { fetches = LAT_N, workers = LAT_W, task = "lua" }, units = LAT_N, unit = "req",
  body = function() fetch_all(http_get_length, sleep_urls, LAT_W, 3) end,
}

-- throughput ---------------------------------------------------------------
suite:case {
  group = "throughput", name = "sequential fetch_length", baseline = "sequential fetch_length",
  params = { fetches = THR_N, workers = 0, task = "kernel" }, units = THR_N, unit = "req",
  body = function()
    for _, url in ipairs(bytes_urls) do assert(fetch_length(url) == BYTES) end
  end,
}
suite:case {
  group = "throughput", name = ("threadpool x%d fetch_length"):format(THR_W),
  params = { fetches = THR_N, workers = THR_W, task = "kernel" }, units = THR_N, unit = "req",
  body = function() fetch_all(fetch_length, bytes_urls, THR_W, BYTES) end,
}
suite:case {
  group = "throughput", name = ("threadpool x%d http.get (Lua)"):format(THR_W),
  params = { fetches = THR_N, workers = THR_W, task = "lua" }, units = THR_N, unit = "req",
  body = function() fetch_all(http_get_length, bytes_urls, THR_W, BYTES) end,
}

suite:note(("latency: ratio = times the ideal %s (%d fetches / %d workers x %g s); target <= 1.05x")
  :format(bench.format_time(ideal), LAT_N, LAT_W, SLEEP))
suite:note("throughput: rate = requests per second of the whole job, pool start and stop included; "
  .. "scripts/bench/peers.lua puts curl --parallel beside it")
suite:run()
