-- Soak: the overhead jobs run hundreds of times next to a CPU hog, looking
-- for stalls (a lost wakeup shows as a run whose wall time is far above
-- its CPU time and far above the other runs of the same job).
--
-- usage: luapool scripts/bench/soak.lua [--rounds N] [--hogs N] [--quick]
--                                        [--json FILE]
--   --rounds N   rounds; each runs every job once (default 200; 5 with --quick)
--   --hogs N     busy-looping processes started beside it (default 2 * cpus)
--   --json FILE  every run's wall and CPU time, per job
--
-- CPU time is the whole process's (os.clock: every thread) plus the reaped
-- worker processes' (/proc/self/stat cutime + cstime, read after the pool
-- closed).  Under a hog the fair ratio wall/CPU is a few; a stall is a run
-- with wall > 5 x the job's median wall and wall/CPU > 10.
local bench = require "luapool.bench"

local args, opts = { ... }, { rounds = nil, hogs = nil, quick = false }
local i = 1
while i <= #args do
  local a = args[i]
  if a == "--rounds" or a == "--hogs" then
    local n = math.tointeger(tonumber(args[i + 1]))
    local lo = a == "--rounds" and 1 or 0 -- no rounds: nothing to report
    if not n or n < lo then
      io.stderr:write("soak: ", a, lo == 1 and " needs a positive integer\n" or " needs a non-negative integer\n")
      os.exit(2)
    end
    opts[a:sub(3)] = n
    i = i + 1
  elseif a == "--json" then
    opts.json = args[i + 1]
    if not opts.json then
      io.stderr:write("soak: --json needs a file\n")
      os.exit(2)
    end
    i = i + 1
  elseif a == "--quick" then
    opts.quick = true
  else
    io.stderr:write("soak: unknown argument ", a, "\n",
      "usage: luapool scripts/bench/soak.lua [--rounds N] [--hogs N] [--quick] [--json FILE]\n")
    os.exit(2)
  end
  i = i + 1
end
local ROUNDS = opts.rounds or (opts.quick and 5 or 200)
local HOGS = opts.hogs or 2 * luapool.cpu_count()
local SCALE = opts.quick and 0.1 or 1

local function noop(x) return x end
local function n_of(k) return math.max(1, math.floor(k * SCALE)) end

local function ones(n)
  local t = {}
  for k = 1, n do t[k] = 1 end
  return t
end

local JOBS = {
  { name = "threadpool submit", n = n_of(20000), run = function(n)
    local pool <close> = threadpool.new { max_workers = 2 }
    local fs = {}
    for k = 1, n do fs[k] = pool:submit(noop, k) end
    for k = 1, n do assert(fs[k]:result() == k) end
  end },
  { name = "threadpool map", n = n_of(20000), run = function(n)
    local pool <close> = threadpool.new { max_workers = 2 }
    assert(#pool:map(noop, ones(n)) == n)
  end },
  { name = "threadpool imap", n = n_of(5000), run = function(n)
    local pool <close> = threadpool.new { max_workers = 2 }
    local c = 0
    for _ in pool:imap(noop, ones(n)) do c = c + 1 end
    assert(c == n)
  end },
  { name = "processpool submit", n = n_of(2000), run = function(n)
    local pool <close> = processpool.new { max_workers = 2 }
    local fs = {}
    for k = 1, n do fs[k] = pool:submit(noop, k) end
    for k = 1, n do assert(fs[k]:result() == k) end
  end },
  { name = "processpool map chunk=1", n = n_of(2000), run = function(n)
    local pool <close> = processpool.new { max_workers = 2 }
    assert(#pool:map(noop, ones(n), { chunksize = 1 }) == n)
  end },
}

-- CPU seconds of reaped children (worker processes), from /proc/self/stat.
local TICKS = 100 -- USER_HZ on Linux
local function children_cpu()
  local f = io.open("/proc/self/stat")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  local rest = s:match("%) (.*)$") or ""
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  -- after "(comm)": state is field 3 of stat; cutime and cstime are 16, 17
  return ((tonumber(fields[14]) or 0) + (tonumber(fields[15]) or 0)) / TICKS
end

-- The hogs: shell loops that end once this script's process is gone (they
-- look every few thousand turns), even after a kill -9; `timeout` as well.
local hog_pids = {}
local function start_hogs()
  local me = luapool.current_worker().pid
  for _ = 1, HOGS do
    local p = io.popen(("timeout 7200 sh -c 'while kill -0 %d 2>/dev/null; do i=0; "
      .. "while [ $i -lt 5000 ]; do i=$((i+1)); done; done' >/dev/null 2>&1 & echo $!"):format(me))
    local pid = p and tonumber(p:read("l"))
    if p then p:close() end
    if pid then hog_pids[#hog_pids + 1] = pid end
  end
end
local function stop_hogs()
  for _, pid in ipairs(hog_pids) do os.execute("kill " .. pid .. " 2>/dev/null") end
  hog_pids = {}
end

local hogs <close> = setmetatable({}, { __close = stop_hogs }) -- luacheck: ignore hogs
start_hogs()
io.stderr:write(("soak: %d rounds x %d jobs beside %d hog(s); load %s\n")
  :format(ROUNDS, #JOBS, #hog_pids, tostring(bench.loadavg())))

local records = {}
for _, job in ipairs(JOBS) do records[job.name] = { wall = {}, cpu = {} } end
local start = luapool.now()
for round = 1, ROUNDS do
  for _, job in ipairs(JOBS) do
    collectgarbage("collect")
    local c0, k0, t0 = os.clock(), children_cpu(), luapool.now()
    job.run(job.n)
    local t1, c1, k1 = luapool.now(), os.clock(), children_cpu()
    local rec = records[job.name]
    rec.wall[#rec.wall + 1] = t1 - t0
    rec.cpu[#rec.cpu + 1] = (c1 - c0) + (k1 - k0)
  end
  if round % 10 == 0 then
    io.stderr:write(("soak: round %d/%d, %.0f s\n"):format(round, ROUNDS, luapool.now() - start))
  end
end
local load = bench.loadavg()
stop_hogs()

local rows, stalls_total = {}, 0
for _, job in ipairs(JOBS) do
  local rec = records[job.name]
  local med = bench.median(rec.wall)
  local worst_ratio, worst_at, stalls = 0, 0, 0
  local ratios = {}
  for k, w in ipairs(rec.wall) do
    local r = w / math.max(rec.cpu[k], 1e-3)
    ratios[k] = r
    if r > worst_ratio then worst_ratio, worst_at = r, k end
    if w > 5 * med and r > 10 then stalls = stalls + 1 end
  end
  stalls_total = stalls_total + stalls
  rows[#rows + 1] = {
    job.name, tostring(job.n), bench.format_time(med), bench.format_time(bench.max(rec.wall)),
    ("%.2f"):format(bench.median(ratios)),
    ("%.2f (%s wall, %s cpu)"):format(worst_ratio, bench.format_time(rec.wall[worst_at]),
      bench.format_time(rec.cpu[worst_at])),
    tostring(stalls),
  }
  rec.median_wall, rec.worst_ratio, rec.stalls, rec.tasks = med, worst_ratio, stalls, job.n
end
io.stdout:write(bench.format_table(
  { "job", "tasks", "median wall", "max wall", "median wall/cpu", "worst wall/cpu", "stalls" },
  rows, { "l", "r", "r", "r", "r", "r", "r" }))
io.stdout:write(("%d rounds in %.0f s beside %d hogs (load at the end %s); stalls: %d\n")
  :format(ROUNDS, luapool.now() - start, HOGS, tostring(load), stalls_total))
if opts.json then
  local f = assert(io.open(opts.json, "w"))
  f:write(bench.json({ rounds = ROUNDS, hogs = HOGS, jobs = records }, 2), "\n")
  f:close()
end
