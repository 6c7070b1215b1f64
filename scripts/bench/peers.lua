-- luapool beside its peers: the same jobs through Python's
-- concurrent.futures (scripts/bench/peers/*.py), luv (libuv's thread pool,
-- scripts/bench/peers/luv_tasks.lua, run by stock lua5.4), asyncio +
-- aiohttp (aio_io.py, outside the project: --aiohttp), `curl --parallel`
-- and `wrk` (the server's limit), each
-- timed as a whole command (wall time around os.execute: interpreter start,
-- pool start and stop included on every side), interleaved run by run with
-- luapool's own command for the same job.
--
-- usage: luapool scripts/bench/peers.lua [--python PATH] [--curl PATH] [--lua PATH]
--                                         [--aiohttp SCRIPT] [--aio-python PATH] [--wrk PATH]
--                                         [--before BIN] [--tasks N] [--quick] [--runs N] [--warmup N]
--                                         [--json FILE] [--csv FILE] [--filter PATTERN]
--
-- Jobs (each a group; luapool's command is the baseline, so a peer's ratio
-- is its time over luapool's: 3.00x means luapool took a third of the time):
--   cpu                 the CPU reference job: sum of i*i for i < n for five
--                       numbers (10M..13M) on a process pool of one worker
--                       per CPU (luapool: the native kernel; Python: a loop)
--   io-latency          2000 fetches of /sleep?s=0.05 with 100 workers (ideal 1 s);
--                       also on an iopool of 1 loop at concurrency 100
--   io-throughput       3000 fetches of /bytes?n=100 with 16 workers; also on an
--                       iopool of 2 loops at concurrency 16
--   small-20k           20,000 fetches of /bytes?n=100, 100 in flight: luapool's
--                       iopool (2 loops, concurrency 100, the baseline) and
--                       threadpool x100, aiohttp --concurrency 100, curl
--                       --parallel-max 100
--   server-limit        wrk -t2 -c100 -d3s on the same URL: the nginx fixture's
--                       own limit on this machine (wrk's Requests/sec, not its
--                       fixed 3 s, is what counts: printed under the table)
--   sleep-2k            2,000 fetches of /sleep?s=0.5 all in flight (ideal
--                       0.5 s): iopool (2 loops) and aiohttp --concurrency 2000
--   many-10k            10,000 fetches of /sleep?s=1 all in flight (ideal 1 s):
--                       iopool (2 loops) and aiohttp --concurrency 10000
--                       (the whole command's peak RSS, from /usr/bin/time, is
--                       printed under the table for sleep-2k and many-10k)
--   floor               in io-latency, small-20k, sleep-2k and many-10k: the
--                       same requests from luapool-http-floor (--floor; built
--                       beside luapool from scripts/bench/http_floor.c), a
--                       client of bare epoll and sockets in C: what this
--                       machine and server allow any client.  In sleep-2k and
--                       many-10k each client that closes with a FIN (aiohttp,
--                       --before) has a server of its own: its 10,000 ports
--                       in TIME_WAIT would collide with the next client's
--                       connects (luapool and the floor reset theirs)
--   overhead-threads    100k no-op tasks, submit + result, 2 threads (and on an
--                       iopool of 2 loops: each task a coroutine)
--   overhead-processes  100k no-op tasks, map on 2 processes
--   tasks-20k           20k no-op tasks, submit + result, 2 threads (luv:
--                       uv.queue_work with UV_THREADPOOL_SIZE=2; iopool: 2 loops);
--                       "floor" is luapool-task-floor (--task-floor; built
--                       beside luapool from scripts/bench/task_floor.c), a
--                       pool of 2 Lua states in C that hands integers over
--                       and nothing else: what this machine allows any pool
--   big-string          200 tasks each returning a 1 MiB string made in the
--                       worker from a 1 KiB piece, 2 threads (each result
--                       checked and dropped); "floor" makes the 200 strings in
--                       one plain lua5.4 state
--   big-table           200 tasks each returning a table of 10,000 numbers,
--                       2 threads; luv cannot carry tables: its line says
--                       "cannot" (what luv answers), never a number
-- The fetches go to the local nginx fixture, never the internet.  Python's
-- fetches use requests (as the reference job does) when it is importable,
-- else urllib.  A peer whose tool is missing is skipped with a note.
-- aio_io.py is not part of the project: --aiohttp names it (default
-- ../shared/peers/aio_io.py beside the source tree), run by --aio-python
-- (default /usr/bin/python3, Debian's, which has python3-aiohttp).
local bench = require "luapool.bench"
local fixture = require "luapool.fixture"

local suite = bench.suite {
  name = "peers", title = "luapool beside Python's concurrent.futures and curl --parallel", args = { ... },
  options = {
    { "python", "PATH", "string", "Python interpreter (default: python3 with requests, else /usr/bin/python3)" },
    { "curl", "PATH", "string", "curl command (default: curl)" },
    { "lua", "PATH", "string", "stock Lua 5.4 with luv for the luv peers (default: lua5.4)" },
    { "aiohttp", "SCRIPT", "string", "the asyncio + aiohttp peer (default: ../shared/peers/aio_io.py "
      .. "beside the source tree)" },
    { "aio-python", "PATH", "string", "Python with aiohttp to run it (default: /usr/bin/python3)" },
    { "wrk", "PATH", "string", "wrk command, the server's limit (default: wrk)" },
    { "floor", "PATH", "string", "the bare epoll client (default: luapool-http-floor beside the luapool binary)" },
    { "task-floor", "PATH", "string", "the bare pool of Lua states (default: luapool-task-floor beside the "
      .. "luapool binary)" },
    { "before", "BIN", "string", "an earlier luapool binary: each iopool fetch case and the big-string and "
      .. "big-table jobs run with it too, interleaved (before and after in the same run)" },
    { "tasks", "N", "integer", "no-op tasks in the overhead jobs (default 100000; 2000 with --quick)" },
  },
}
local quick, opts = suite.quick, suite.opts

local CPU_NUMBERS = quick and { 100000, 120000, 110000, 90000, 130000 }
  or { 10000000, 12000000, 11000000, 9000000, 13000000 }
local LAT_N, LAT_W, SLEEP = quick and 200 or 2000, 100, 0.05
local THR_N, THR_W, BYTES = quick and 300 or 3000, 16, 100
local TASKS = opts.tasks or (quick and 2000 or 100000)
local LUV_TASKS = quick and 2000 or 20000
local BIG_N, BIG_STRING, BIG_TABLE = quick and 20 or 200, 1 << 20, 10000
local SMALL_N, SMALL_CONC, IO_LOOPS = quick and 2000 or 20000, 100, 2
local WRK_SECONDS = quick and 1 or 3
local S2K_N, S2K_SLEEP = quick and 200 or 2000, quick and 0.1 or 0.5
local MANY_N, MANY_SLEEP = quick and 500 or 10000, quick and 0.1 or 1

-- {====== commands, temporary files

local function q(s) return "'" .. tostring(s):gsub("'", [['\'']]) .. "'" end

local function succeeds(cmd) return os.execute(cmd .. " >/dev/null 2>&1") == true end

local function capture(cmd)
  local p = io.popen(cmd .. " 2>/dev/null")
  if not p then return "" end
  local s = p:read("a") or ""
  p:close()
  return s
end

-- removed when the script ends (a to-be-closed list of paths)
local temps <close> = setmetatable({}, { __close = function(t) for _, f in ipairs(t) do os.remove(f) end end })
local function tempfile(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  temps[#temps + 1] = path
  return path
end

local errlog = tempfile("")
-- A body that runs cmd (its output discarded) and fails with its stderr.
local function command(cmd)
  return function()
    local ok, how, code = os.execute(cmd .. " >/dev/null 2>" .. q(errlog))
    if not ok then
      local f = io.open(errlog)
      local err = f and f:read("a") or ""
      if f then f:close() end
      error(("command failed (%s %s): %s\n%s"):format(how, tostring(code), cmd, err:sub(-2000)), 0)
    end
  end
end

-- The same, under /usr/bin/time when it is there: each run's peak RSS of the
-- whole command (KiB) goes into rss[name].
local rss, rss_file = {}, tempfile("")
local function command_rss(name, cmd, time_ok)
  if not time_ok then return command(cmd) end
  local run = command(("/usr/bin/time -f %%M -o %s %s"):format(q(rss_file), cmd))
  return function()
    run()
    local f = io.open(rss_file)
    local kb = f and tonumber(f:read("a"):match("(%d+)%s*$"))
    if f then f:close() end
    rss[name] = rss[name] or {}
    table.insert(rss[name], kb)
  end
end

-- }======

-- {====== the tools

local here = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "."
local peers_dir = here .. "/peers"
local luapool_bin = (arg and arg[-1]) or "luapool"

local python, python_client
do
  local candidates = opts.python and { opts.python } or { "python3", "/usr/bin/python3" }
  local first
  for _, py in ipairs(candidates) do
    if succeeds(q(py) .. " -c 'import concurrent.futures'") then
      first = first or py
      if succeeds(q(py) .. " -c 'import requests'") then python, python_client = py, "requests" break end
    end
  end
  if not python and first then python, python_client = first, "urllib" end
end
local curl = opts.curl or "curl"
local curl_ok = succeeds(q(curl) .. " --version") and capture(q(curl) .. " --help all"):find("--parallel-max", 1, true)

local skipped = {}
local python_version = python and capture(q(python) .. " --version"):match("Python [%d.]+")
if not python then
  skipped[#skipped + 1] = "python3 not found (or without concurrent.futures): Python peers skipped"
end
if not curl_ok then
  skipped[#skipped + 1] = "curl with --parallel (7.66 or later) not found: curl peers skipped"
end
local curl_version = curl_ok and capture(q(curl) .. " --version"):match("^curl [%d.]+")
local lua = opts.lua or "lua5.4"
local luv_version = succeeds(q(lua) .. [[ -e 'require "luv"']]) and
  capture(q(lua) .. [[ -e 'print(require("luv").version_string())']]):match("[%d.]+")
if not luv_version then
  skipped[#skipped + 1] = ("%s with luv (Debian: lua-luv) not found: luv peers skipped"):format(lua)
end

local aio_script = opts.aiohttp or (here .. "/../../../shared/peers/aio_io.py")
local aio_python = opts["aio-python"] or "/usr/bin/python3"
local aio_ok = io.open(aio_script) ~= nil
local aio_version
if not aio_ok then
  skipped[#skipped + 1] = ("%s not found (--aiohttp SCRIPT): aiohttp peers skipped"):format(aio_script)
else
  aio_version = capture(q(aio_python) .. [[ -c 'import aiohttp; print(aiohttp.__version__)']]):match("[%d.]+")
  if not aio_version then
    aio_ok = false
    skipped[#skipped + 1] = ("%s without aiohttp (Debian: python3-aiohttp): aiohttp peers skipped"):format(aio_python)
  end
end
local wrk = opts.wrk or "wrk"
local wrk_version = capture(q(wrk) .. " -v 2>&1"):match("wrk ([^%s]+)")
if not wrk_version then
  skipped[#skipped + 1] = ("%s not found (Debian: wrk): the server-limit job skipped"):format(wrk)
end
local time_ok = succeeds("/usr/bin/time -f %M true")
local floor_bin = opts.floor or ((luapool_bin:match("^(.*)/[^/]*$") or ".") .. "/luapool-http-floor")
local floor_ok = succeeds(q(floor_bin) .. " 2>&1 | grep -q usage")
if not floor_ok then
  skipped[#skipped + 1] = ("%s not found (--floor PATH; built by CMake with the specs): the floor cases skipped")
    :format(floor_bin)
end
local task_floor_bin = opts["task-floor"] or ((luapool_bin:match("^(.*)/[^/]*$") or ".") .. "/luapool-task-floor")
local task_floor_ok = succeeds(q(task_floor_bin) .. " 2>&1 | grep -q usage")
if not task_floor_ok then
  skipped[#skipped + 1] = ("%s not found (--task-floor PATH; built by CMake with the specs): the tasks-20k floor "
    .. "skipped"):format(task_floor_bin)
end

-- }======

-- {====== luapool's side: small scripts mirroring the Python ones

local LP_CPU = tempfile([[
local numbers = {}
for i, a in ipairs { ... } do numbers[i] = math.tointeger(tonumber(a)) end
local pool <close> = processpool.new { max_workers = luapool.cpu_count() }
local results = pool:map(luapool.kernels.sum_squares, numbers)
for i, n in ipairs(numbers) do print(("Calculation for %d: %s"):format(n, tostring(results[i]))) end
]])
local LP_IO = tempfile([[
local workers, file, kind, conc = ...
local urls = {}
for line in io.lines(file) do if line ~= "" then urls[#urls + 1] = line end end
local pool <close> = kind == "iopool"
  and iopool.new { max_workers = math.tointeger(tonumber(workers)), concurrency = math.tointeger(tonumber(conc)) }
  or threadpool.new { max_workers = math.tointeger(tonumber(workers)) }
local lengths = pool:map(luapool.kernels.fetch_length, urls)
local total = 0
for _, n in ipairs(lengths) do total = total + n end
print(("luapool: %d urls, %d bytes"):format(#lengths, total))
]])
local LP_OVERHEAD = tempfile([[
local mode, n, chunk = ...
n = math.tointeger(tonumber(n))
local function noop(x) return x end
if mode == "threads-submit" or mode == "io-submit" then
  local pool <close> = mode == "io-submit" and iopool.new { max_workers = 2 } or threadpool.new { max_workers = 2 }
  local fs = {}
  for i = 1, n do fs[i] = pool:submit(noop, 1) end
  for i = 1, n do fs[i]:result() end
elseif mode == "threads-string" or mode == "threads-table" then
  -- big values: each result made in the worker, checked here, dropped
  local size = math.tointeger(tonumber(chunk))
  -- (a string from a 1 KiB piece: string.rep of one byte is a memcpy call a
  -- byte, 3.5 ms a MiB, which would hide what moving it costs)
  local make = mode == "threads-string" and function(len) return string.rep(string.rep("x", 1024), len // 1024) end
    or function(len)
      local t = {}
      for i = 1, len do t[i] = i end
      return t
    end
  local pool <close> = threadpool.new { max_workers = 2 }
  local fs = {}
  for i = 1, n do fs[i] = pool:submit(make, size) end
  for i = 1, n do
    assert(#fs[i]:result() == size)
    fs[i] = nil
  end
elseif mode == "processes-map" then
  local ones = {}
  for i = 1, n do ones[i] = 1 end
  local pool <close> = processpool.new { max_workers = 2 }
  local o = chunk ~= "auto" and { chunksize = math.tointeger(tonumber(chunk)) } or nil
  assert(#pool:map(noop, ones, o) == n)
else
  error("unknown mode " .. tostring(mode))
end
print(("%s: %d tasks"):format(mode, n))
]])

local function lp_with(bin, script, ...)
  local parts = { q(bin), q(script) }
  for _, a in ipairs { ... } do parts[#parts + 1] = q(a) end
  return table.concat(parts, " ")
end
local function lp(script, ...) return lp_with(luapool_bin, script, ...) end
-- --before BIN: the same iopool case with an earlier binary, named "... (before)"
local before = opts.before
if before and not succeeds(q(before) .. " -v") then -- said now, not when its first case runs
  io.stderr:write("peers: --before ", before, ": not a luapool binary that runs (", q(before), " -v failed)\n")
  os.exit(2)
end
local function before_case(c, rss_name)
  if not before then return end
  local cmd = lp_with(before, LP_IO, table.unpack(c.args))
  suite:case { group = c.group, name = c.name .. " (before)", params = c.params, units = c.units, unit = c.unit,
               body = rss_name and command_rss(rss_name .. " (before)", cmd, time_ok) or command(cmd) }
end
local function luv(...)
  local parts = { "UV_THREADPOOL_SIZE=2", q(lua), q(peers_dir .. "/luv_tasks.lua") }
  for _, a in ipairs { ... } do parts[#parts + 1] = q(a) end
  return table.concat(parts, " ")
end
local function py(script, ...)
  local parts = { q(python), q(peers_dir .. "/" .. script) }
  for _, a in ipairs { ... } do parts[#parts + 1] = q(a) end
  return table.concat(parts, " ")
end

-- }======

local srv <close> = assert(fixture.start { workers = 2 })
-- (sleep-2k and many-10k: a server of its own for each client that leaves
-- its ports in TIME_WAIT; see the head)
local srv_aio <close> = aio_ok and assert(fixture.start { workers = 2 }) or nil
local srv_before <close> = opts.before and assert(fixture.start { workers = 2 }) or nil

local function url_files(path_fmt, n, server)
  local urls, conf = {}, {}
  for i = 1, n do
    local url = (server or srv):url(path_fmt:format(i))
    urls[#urls + 1] = url
    conf[#conf + 1] = ('url = "%s"\noutput = "/dev/null"'):format(url)
  end
  return tempfile(table.concat(urls, "\n") .. "\n"), tempfile(table.concat(conf, "\n") .. "\n")
end
local lat_list, lat_conf = url_files("/sleep?s=" .. SLEEP .. "&i=%d", LAT_N)
local thr_list, thr_conf = url_files("/bytes?n=" .. BYTES .. "&i=%d", THR_N)
local small_list, small_conf = url_files("/bytes?n=" .. BYTES .. "&i=%d", SMALL_N)
local s2k_list = url_files("/sleep?s=" .. S2K_SLEEP .. "&i=%d", S2K_N)
local many_list = url_files("/sleep?s=" .. MANY_SLEEP .. "&i=%d", MANY_N)
local own_lists = {} -- [server] = { [path_fmt] = list }
local function list_on(server, path_fmt, n)
  if server == nil then return nil end
  own_lists[server] = own_lists[server] or {}
  own_lists[server][path_fmt] = own_lists[server][path_fmt] or url_files(path_fmt, n, server)
  return own_lists[server][path_fmt]
end
-- The floor's command: MODE PATH N ... against srv
local srv_port = srv.base:match(":(%d+)$")
local function floor_cmd(mode, path, ...)
  local parts = { q(floor_bin), mode, "127.0.0.1", srv_port, q(path) }
  for _, a in ipairs { ... } do parts[#parts + 1] = tostring(a) end
  return table.concat(parts, " ")
end
local function curl_cmd(conf, parallel)
  return ("%s -s -S --fail --parallel --parallel-max %d -K %s"):format(q(curl), parallel, q(conf))
end

-- cpu ------------------------------------------------------------------------
local cpu_args = {}
for i, n in ipairs(CPU_NUMBERS) do cpu_args[i] = tostring(n) end
suite:case {
  group = "cpu", name = "luapool processpool (native kernel)", baseline = "luapool processpool (native kernel)",
  params = { numbers = #CPU_NUMBERS }, body = command(lp(LP_CPU, table.unpack(cpu_args))),
}
if python then
  suite:case {
    group = "cpu", name = "python ProcessPoolExecutor", params = { numbers = #CPU_NUMBERS },
    body = command(py("cpu.py", table.unpack(cpu_args))),
  }
end

-- fetches --------------------------------------------------------------------
for _, job in ipairs {
  { "io-latency", LAT_N, LAT_W, lat_list, lat_conf },
  { "io-throughput", THR_N, THR_W, thr_list, thr_conf },
} do
  local group, n, w, list, conf = table.unpack(job)
  local base = ("luapool threadpool x%d"):format(w)
  local params = { fetches = n, workers = w }
  suite:case { group = group, name = base, baseline = base, params = params, units = n, unit = "req",
               body = command(lp(LP_IO, w, list)) }
  local loops = group == "io-latency" and 1 or IO_LOOPS
  local io_name = ("luapool iopool %d loop%s c=%d"):format(loops, loops > 1 and "s" or "", w)
  local io_params = { fetches = n, loops = loops, concurrency = w }
  suite:case { group = group, name = io_name, params = io_params, units = n, unit = "req",
               body = command(lp(LP_IO, loops, list, "iopool", w)) }
  before_case { group = group, name = io_name, params = io_params, units = n, unit = "req",
                args = { loops, list, "iopool", w } }
  if python then
    suite:case { group = group, name = ("python threads x%d (%s)"):format(w, python_client), params = params,
                 units = n, unit = "req", body = command(py("io.py", "--workers", w, "--urls", list)) }
  end
  if curl_ok then
    suite:case { group = group, name = ("curl --parallel-max %d"):format(w), params = params,
                 units = n, unit = "req", body = command(curl_cmd(conf, w)) }
  end
  if floor_ok and group == "io-latency" then
    suite:case { group = group, name = ("floor: bare epoll client, %d kept alive"):format(w), params = params,
                 units = n, unit = "req", body = command(floor_cmd("chain", "/sleep?s=" .. SLEEP, n, w, 1)) }
  end
end

-- many in flight: iopool against aiohttp, curl and wrk -------------------------
-- What a body records itself (wrk's rate, a command's peak RSS) is recorded on
-- warm-up rounds too, which come first in a group: timed() drops them.
local function timed(list) return { table.unpack(list or {}, suite.warmup + 1) } end
local small_base = ("luapool iopool %d loops c=%d, 20k"):format(IO_LOOPS, SMALL_CONC)
suite:case { group = "small-20k", name = small_base, baseline = small_base,
             params = { fetches = SMALL_N, loops = IO_LOOPS, concurrency = SMALL_CONC }, units = SMALL_N, unit = "req",
             body = command(lp(LP_IO, IO_LOOPS, small_list, "iopool", SMALL_CONC)) }
before_case { group = "small-20k", name = small_base,
              params = { fetches = SMALL_N, loops = IO_LOOPS, concurrency = SMALL_CONC },
              units = SMALL_N, unit = "req", args = { IO_LOOPS, small_list, "iopool", SMALL_CONC } }
suite:case { group = "small-20k", name = ("luapool threadpool x%d, 20k"):format(SMALL_CONC),
             params = { fetches = SMALL_N, workers = SMALL_CONC }, units = SMALL_N, unit = "req",
             body = command(lp(LP_IO, SMALL_CONC, small_list)) }
if aio_ok then
  suite:case { group = "small-20k", name = ("aiohttp --concurrency %d, 20k"):format(SMALL_CONC),
               params = { fetches = SMALL_N, concurrency = SMALL_CONC }, units = SMALL_N, unit = "req",
               body = command(("%s %s --concurrency %d --urls %s"):format(q(aio_python), q(aio_script), SMALL_CONC,
                 q(small_list))) }
end
if curl_ok then
  suite:case { group = "small-20k", name = ("curl --parallel-max %d, 20k"):format(SMALL_CONC),
               params = { fetches = SMALL_N, parallel = SMALL_CONC }, units = SMALL_N, unit = "req",
               body = command(curl_cmd(small_conf, SMALL_CONC)) }
end
if floor_ok then
  suite:case { group = "small-20k",
               name = ("floor: bare epoll client, %d kept alive, %d threads"):format(SMALL_CONC, IO_LOOPS),
               params = { fetches = SMALL_N, concurrency = SMALL_CONC }, units = SMALL_N, unit = "req",
               body = command(floor_cmd("chain", "/bytes?n=" .. BYTES, SMALL_N, SMALL_CONC, IO_LOOPS)) }
end
-- wrk runs for a fixed time: its Requests/sec (each run's, in wrk_rates) is the number
local wrk_rates = {}
local wrk_name = ("wrk -t2 -c%d -d%ds"):format(SMALL_CONC, WRK_SECONDS)
if wrk_version then
  local wrk_url = srv:url("/bytes?n=" .. BYTES)
  suite:case {
    group = "server-limit", name = wrk_name .. " (fixed time: see req/s below)", params = { connections = SMALL_CONC },
    body = function()
      local out = capture(("%s -t2 -c%d -d%ds %s"):format(q(wrk), SMALL_CONC, WRK_SECONDS, q(wrk_url)))
      local rate = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
      if not rate then error("wrk printed no Requests/sec:\n" .. out, 0) end
      wrk_rates[#wrk_rates + 1] = rate
    end,
  }
end
for _, job in ipairs {
  { "sleep-2k", S2K_N, S2K_SLEEP, s2k_list },
  { "many-10k", MANY_N, MANY_SLEEP, many_list },
} do
  local group, n, secs, list = table.unpack(job)
  local base = ("luapool iopool %d loops %d in flight"):format(IO_LOOPS, n)
  local params = { fetches = n, sleep = secs, concurrency = n }
  suite:case { group = group, name = base, baseline = base, params = params, units = n, unit = "req",
               body = command_rss(base, lp(LP_IO, IO_LOOPS, list, "iopool", n), time_ok) }
  local path_fmt = "/sleep?s=" .. secs .. "&i=%d"
  before_case({ group = group, name = base, params = params, units = n, unit = "req",
                args = { IO_LOOPS, list_on(srv_before, path_fmt, n), "iopool", n } }, base)
  if aio_ok then
    local name = ("aiohttp --concurrency %d"):format(n)
    suite:case { group = group, name = name, params = params, units = n, unit = "req",
                 body = command_rss(group .. " " .. name, ("%s %s --concurrency %d --urls %s"):format(
                   q(aio_python), q(aio_script), n, q(list_on(srv_aio, path_fmt, n))), time_ok) }
  end
  if floor_ok then
    local name = ("floor: bare epoll client, %d threads, %d in flight"):format(IO_LOOPS, n)
    suite:case { group = group, name = name, params = params, units = n, unit = "req",
                 body = command_rss(group .. " " .. name, floor_cmd("many", "/sleep?s=" .. secs, n, IO_LOOPS),
                   time_ok) }
  end
end

-- overhead -------------------------------------------------------------------
suite:case {
  group = "overhead-threads", name = "luapool threadpool submit+result", baseline = "luapool threadpool submit+result",
  params = { tasks = TASKS }, units = TASKS, unit = "task", body = command(lp(LP_OVERHEAD, "threads-submit", TASKS)),
}
if python then
  suite:case {
    group = "overhead-threads", name = "python ThreadPoolExecutor submit+result", params = { tasks = TASKS },
    units = TASKS, unit = "task", body = command(py("overhead.py", "threads-submit", TASKS)),
  }
end
suite:case {
  group = "overhead-threads", name = "luapool iopool submit+result (2 loops)", params = { tasks = TASKS },
  units = TASKS, unit = "task", body = command(lp(LP_OVERHEAD, "io-submit", TASKS)),
}
suite:case {
  group = "overhead-processes", name = "luapool processpool map (auto chunks)",
  baseline = "luapool processpool map (auto chunks)", params = { tasks = TASKS, chunk = "auto" },
  units = TASKS, unit = "task", body = command(lp(LP_OVERHEAD, "processes-map", TASKS, "auto")),
}
suite:case {
  group = "overhead-processes", name = "luapool processpool map chunksize=1", params = { tasks = TASKS, chunk = 1 },
  units = TASKS, unit = "task", body = command(lp(LP_OVERHEAD, "processes-map", TASKS, 1)),
}
if python then
  for _, chunk in ipairs { 1, 1000 } do
    suite:case {
      group = "overhead-processes", name = ("python ProcessPoolExecutor map chunksize=%d"):format(chunk),
      params = { tasks = TASKS, chunk = chunk }, units = TASKS, unit = "task",
      body = command(py("overhead.py", "processes-map", TASKS, chunk)),
    }
  end
end

-- luv: per task and big values ---------------------------------------------
suite:case {
  group = "tasks-20k", name = "luapool threadpool submit+result x2", baseline = "luapool threadpool submit+result x2",
  params = { tasks = LUV_TASKS }, units = LUV_TASKS, unit = "task",
  body = command(lp(LP_OVERHEAD, "threads-submit", LUV_TASKS)),
}
suite:case {
  group = "tasks-20k", name = "luapool iopool submit+result x2 loops", params = { tasks = LUV_TASKS },
  units = LUV_TASKS, unit = "task", body = command(lp(LP_OVERHEAD, "io-submit", LUV_TASKS)),
}
if luv_version then
  suite:case {
    group = "tasks-20k", name = "luv queue_work x2", params = { tasks = LUV_TASKS }, units = LUV_TASKS,
    unit = "task", body = command(luv("noop", LUV_TASKS)),
  }
end
-- the floor: a pool of 2 Lua states in C that only hands integers over
-- (scripts/bench/task_floor.c: no function moved, no codec, no checks)
if task_floor_ok then
  suite:case {
    group = "tasks-20k", name = "floor: bare pool of Lua states x2", params = { tasks = LUV_TASKS },
    units = LUV_TASKS, unit = "task", body = command(q(task_floor_bin) .. " " .. LUV_TASKS .. " 2"),
  }
end
suite:case {
  group = "big-string", name = "luapool threadpool 1 MiB strings x2", baseline = "luapool threadpool 1 MiB strings x2",
  params = { tasks = BIG_N, bytes = BIG_STRING }, units = BIG_N, unit = "task",
  body = command(lp(LP_OVERHEAD, "threads-string", BIG_N, BIG_STRING)),
}
-- --before BIN: the big-value jobs with an earlier binary too, interleaved
local function before_overhead(c, mode, ...)
  if not before then return end
  suite:case { group = c.group, name = c.name .. " (before)", params = c.params, units = c.units, unit = c.unit,
               body = command(lp_with(before, LP_OVERHEAD, mode, ...)) }
end
before_overhead({ group = "big-string", name = "luapool threadpool 1 MiB strings x2",
                  params = { tasks = BIG_N, bytes = BIG_STRING }, units = BIG_N, unit = "task" },
  "threads-string", BIG_N, BIG_STRING)
if luv_version then
  suite:case {
    group = "big-string", name = "luv queue_work 1 MiB strings x2", params = { tasks = BIG_N, bytes = BIG_STRING },
    units = BIG_N, unit = "task", body = command(luv("string", BIG_N, BIG_STRING)),
  }
end
-- the floor: the same strings made in one plain state, nothing moved
suite:case {
  group = "big-string", name = "floor: lua5.4 makes them in one state",
  params = { tasks = BIG_N, bytes = BIG_STRING }, units = BIG_N, unit = "task",
  body = command(("%s -e %s"):format(q(lua), q(("for _ = 1, %d do "
    .. "local s = string.rep(string.rep('x', 1024), %d // 1024) assert(#s == %d) end"):format(BIG_N, BIG_STRING,
      BIG_STRING)))),
}
suite:case {
  group = "big-table", name = "luapool threadpool tables of 10,000 x2",
  baseline = "luapool threadpool tables of 10,000 x2", params = { tasks = BIG_N, numbers = BIG_TABLE },
  units = BIG_N, unit = "task", body = command(lp(LP_OVERHEAD, "threads-table", BIG_N, BIG_TABLE)),
}
before_overhead({ group = "big-table", name = "luapool threadpool tables of 10,000 x2",
                  params = { tasks = BIG_N, numbers = BIG_TABLE }, units = BIG_N, unit = "task" },
  "threads-table", BIG_N, BIG_TABLE)
-- luv cannot: ask it (its answer, a line starting "cannot:", goes in the report)
local luv_table_answer
if luv_version then
  local pipe = io.popen(luv("table", 1, BIG_TABLE) .. " 2>&1")
  local text = pipe and pipe:read("a") or ""
  if pipe then pipe:close() end
  local refusal = text:match("thread arg not support[^\n]*")
  luv_table_answer = (text:match("cannot: [^\n]*") or "cannot: (no answer)") ..
    (refusal and (": luv says \"" .. refusal .. "\"") or "")
end

suite:note("every case is a whole command: cpu and peak rss are this (waiting) process's only")

-- run ------------------------------------------------------------------------
print("peers: " .. table.concat({ python and (python .. " (" .. (python_version or "?") .. ", "
  .. python_client .. ")") or "no python", curl_version or "no curl",
  luv_version and (lua .. " with luv " .. luv_version) or "no luv",
  aio_ok and ("aiohttp " .. aio_version .. " (" .. aio_python .. " " .. aio_script .. ")") or "no aiohttp",
  wrk_version and ("wrk " .. wrk_version) or "no wrk" }, "; "))
for _, s in ipairs(skipped) do print("note: " .. s) end
suite:run()

-- The comparison, against "Numbers we hold ourselves to" (DESIGN.md).
local function r(name) return suite:result(name) end
print()
print("luapool against its peers (ratio: peer time / luapool time, paired run by run):")
for _, res in ipairs(suite.results) do
  if res.baseline and res.baseline ~= res.name and res.ratio and not res.name:find("^luapool") then
    print(("  %-20s %-46s %6s  (luapool %s)"):format(res.group, res.name, bench.format_ratio(res.ratio),
      res.ratio >= 1 and ("%.2fx faster"):format(res.ratio) or ("%.2fx slower"):format(1 / res.ratio)))
  end
end
if luv_table_answer and (not suite.filter or ("big-table"):find(suite.filter)) then
  print(("  %-20s %-46s %6s  (%s)"):format("big-table", "luv queue_work tables of 10,000 x2", "cannot",
    luv_table_answer:gsub("^cannot: ", "")))
end
-- per task against the floor (issue 14's target: threads <= 1.0 us a task)
local task_floor = r("floor: bare pool of Lua states x2")
local lp_tasks = r("luapool threadpool submit+result x2")
if task_floor and lp_tasks then
  print(("tasks-20k: luapool threadpool %s/task, %.2fx the floor's %s/task (whole commands; target <= 1.0 us)")
    :format(bench.format_time(lp_tasks.median / LUV_TASKS), lp_tasks.median / task_floor.median,
      bench.format_time(task_floor.median / LUV_TASKS)))
end
-- big values against the floor (issue 14: within 2.5x of it)
local floor = r("floor: lua5.4 makes them in one state")
if floor then
  for _, name in ipairs { "luapool threadpool 1 MiB strings x2", "luapool threadpool 1 MiB strings x2 (before)" } do
    local res = r(name)
    if res then
      print(("big-string: %-48s %s/task, %.2fx the floor's %s/task (target <= 2.5x)"):format(name,
        bench.format_time(res.median / BIG_N), res.median / floor.median, bench.format_time(floor.median / BIG_N)))
    end
  end
end
local ideal = math.ceil(LAT_N / LAT_W) * SLEEP
print(("io-latency against the ideal %s (target: luapool <= 1.05x):"):format(bench.format_time(ideal)))
for _, res in ipairs(suite.results) do
  if res.group == "io-latency" then
    print(("  %-46s %6s ideal"):format(res.name, bench.format_ratio(res.median / ideal)))
  end
end
local lp_thr = r(("luapool threadpool x%d"):format(THR_W))
local curl_thr = r(("curl --parallel-max %d"):format(THR_W))
if lp_thr and curl_thr then
  print(("io-throughput: luapool %s, curl %s (target: luapool >= curl)"):format(
    bench.format_rate(THR_N / lp_thr.median, "req"), bench.format_rate(THR_N / curl_thr.median, "req")))
end

-- iopool against its peers (issue 12's numbers to reach)
local small = r(small_base)
if small then
  local lp_rate = SMALL_N / small.median
  print(("small-20k: luapool iopool %s"):format(bench.format_rate(lp_rate, "req")))
  for _, peer in ipairs { { ("curl --parallel-max %d, 20k"):format(SMALL_CONC), 2.5 },
                          { ("aiohttp --concurrency %d, 20k"):format(SMALL_CONC), 10 } } do
    local res = r(peer[1])
    if res then
      print(("  %-30s %s: luapool %.2fx its rate (target >= %gx)"):format(peer[1],
        bench.format_rate(SMALL_N / res.median, "req"), lp_rate / (SMALL_N / res.median), peer[2]))
    end
  end
  local b = r(small_base .. " (before)")
  if b then print(("  %-30s %s"):format("--before", bench.format_rate(SMALL_N / b.median, "req"))) end
  local fl = r(("floor: bare epoll client, %d kept alive, %d threads"):format(SMALL_CONC, IO_LOOPS))
  if fl then
    print(("  %-30s %s: luapool %.2fx its rate"):format("floor (bare epoll client)",
      bench.format_rate(SMALL_N / fl.median, "req"), lp_rate / (SMALL_N / fl.median)))
  end
  local rates = timed(wrk_rates)
  if #rates > 0 then
    local w = bench.median(rates)
    print(("  %-30s %s (median of %d): luapool %.2fx its rate (target >= 0.6x)"):format(wrk_name,
      bench.format_rate(w, "req"), #rates, lp_rate / w))
  end
end
for _, job in ipairs { { "sleep-2k", S2K_N, S2K_SLEEP }, { "many-10k", MANY_N, MANY_SLEEP } } do
  local group, n, secs = table.unpack(job)
  local base = ("luapool iopool %d loops %d in flight"):format(IO_LOOPS, n)
  local lp_res = r(base)
  if lp_res then
    local function mb(key)
      local kbs = timed(rss[key])
      return #kbs > 0 and ("peak RSS %.0f MB"):format(bench.median(kbs) / 1024) or "peak RSS ?"
    end
    print(("%s (ideal %s): luapool iopool %s (%.2fx ideal), %s"):format(group, bench.format_time(secs),
      bench.format_time(lp_res.median), lp_res.median / secs, mb(base)))
    local name = ("aiohttp --concurrency %d"):format(n)
    local res = r(name)
    if res then
      print(("  %-30s %s (%.2fx ideal), %s"):format(name, bench.format_time(res.median), res.median / secs,
        mb(group .. " " .. name)))
    end
    local b = r(base .. " (before)")
    if b then
      print(("  %-30s %s (%.2fx ideal), %s"):format("--before", bench.format_time(b.median), b.median / secs,
        mb(base .. " (before)")))
    end
    local fname = ("floor: bare epoll client, %d threads, %d in flight"):format(IO_LOOPS, n)
    local fl = r(fname)
    if fl then
      print(("  %-30s %s (%.2fx ideal), %s: luapool %.2fx the floor's time"):format("floor (bare epoll client)",
        bench.format_time(fl.median), fl.median / secs, mb(group .. " " .. fname), lp_res.median / fl.median))
    end
  end
end
