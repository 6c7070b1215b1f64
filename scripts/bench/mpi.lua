-- mpipool's costs, next to a processpool of as many workers and to
-- mpi4py.futures (docs/mpi.md has the numbers).
--
-- usage, inside one MPI job (rank 0 runs this, the other ranks serve):
--   mpiexec -n N luapool --mpi scripts/bench/mpi.lua [--tasks T] [--runs R] [--slots S]
-- measures, on an mpipool of every serving rank and on a processpool of
-- as many workers (N-1 times S), R rounds each, interleaved:
--   submit+result  T no-op tasks submitted, then every result (us per task)
--   map            100,000 no-ops with automatic chunking (us per item)
--   cpu            the seed CPU job: luapool.kernels.sum_squares on the five
--                  numbers of seed_cpu.py (seconds; the sums checked exactly)
-- and prints the medians, and the ratios mpipool / processpool.
--   mpiexec -n N luapool --mpi scripts/bench/mpi.lua --switches 1 [--tasks T] [--runs R]
-- counts instead, for submit+result on the mpipool, the context switches per
-- task (voluntary and not, from /proc) of rank 0, of the serving ranks' loops,
-- of their other threads (the local processpool's proxies) and of their
-- workers: on a loaded machine a deterministic-ish count where times vary.
--
-- usage, as the driver (no --mpi): one job per rank count, beside
-- mpi4py.futures (Debian python3-mpi4py) running ../shared/peers/mpi_futures.py:
--   luapool scripts/bench/mpi.lua [--ranks 1,2,4] [--runs R] [--tasks T] [--peer FILE]
-- Each round runs `mpiexec -n K+1 luapool --mpi mpi.lua` and then
-- `mpiexec -n K+1 python3 -m mpi4py.futures mpi_futures.py T` for K serving
-- ranks; the table has the medians and mpi4py / mpipool.  As root it sets
-- Open MPI's opt-in (OMPI_ALLOW_RUN_AS_ROOT...), and oversubscribes when
-- there are more ranks than CPUs; the ranks share memory (btl self,vader).
local args = { ... }
local opt = { tasks = 20000, runs = 3, slots = 1, ranks = "1,2,4", switches = 0 }
do
  local i = 1
  while i <= #args do
    local k = args[i]:match("^%-%-(%w+)$")
    if not k or opt[k] == nil and k ~= "peer" then
      io.stderr:write("usage: see the head of scripts/bench/mpi.lua\n")
      os.exit(2)
    end
    opt[k] = tonumber(args[i + 1]) or args[i + 1]
    i = i + 2
  end
end

local NUMBERS = { 10000000, 12000000, 11000000, 9000000, 13000000 }
local SUMS = { "333333283333335000000", "575999928000002000000", "443666606166668500000",
               "242999959500001500000", "732333248833335500000" }
local MAP_ITEMS = 100000

local function median(t)
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  local n = #s
  return n % 2 == 1 and s[(n + 1) // 2] or (s[n // 2] + s[n // 2 + 1]) / 2
end

-- {====== inside the job: measure
-- Context switches per submit+result task, by where they happen.
local function switches()
  local mp <close> = luapool.mpipool.new { slots = opt.slots }
  local noop = function(x) return x end
  local who = mp:map(function()
    luapool.sleep(0.05)
    local stat = io.open("/proc/self/stat"):read("a")
    return tonumber(stat:match("^%d+ %b() %a (%d+)")) .. " " .. luapool.current_worker().pid
  end, { 1, 2, 3, 4, 5, 6, 7, 8 }, { chunksize = 1 })
  local pids = { [luapool.current_worker().pid] = "rank0" }
  for _, w in ipairs(who) do
    local r, p = w:match("(%d+) (%d+)")
    pids[tonumber(r)], pids[tonumber(p)] = "ranks", "workers"
  end
  local function count()
    local c = { rank0 = 0, ranks = 0, workers = 0, loops = 0 }
    for pid, k in pairs(pids) do
      local f = io.popen("cat /proc/" .. pid .. "/task/*/status 2>/dev/null")
      for n in f:read("a"):gmatch("ctxt_switches:%s*(%d+)") do c[k] = c[k] + tonumber(n) end
      f:close()
      if k == "ranks" then -- (the serve loop is the rank's first thread)
        local s = io.open("/proc/" .. pid .. "/task/" .. pid .. "/status"):read("a")
        for n in s:gmatch("ctxt_switches:%s*(%d+)") do c.loops = c.loops + tonumber(n) end
      end
    end
    c.ranks = c.ranks - c.loops
    return c
  end
  local T = opt.tasks
  for _ = 1, opt.runs do
    local c0, t = count(), luapool.now()
    local fs = {}
    for i = 1, T do fs[i] = mp:submit(noop, i) end
    for i = 1, T do assert(fs[i]:result() == i) end
    local us, c1 = (luapool.now() - t) / T * 1e6, count()
    print(("RESULT submit+result %.2f us/task; switches per task: rank 0 %.2f, rank loops %.2f, "
      .. "their other threads %.2f, workers %.2f"):format(us, (c1.rank0 - c0.rank0) / T,
      (c1.loops - c0.loops) / T, (c1.ranks - c0.ranks) / T, (c1.workers - c0.workers) / T))
  end
end

local function measure()
  local mp <close> = luapool.mpipool.new { slots = opt.slots }
  local workers = mp.max_workers * opt.slots
  local pp <close> = processpool.new { max_workers = workers }
  local noop = function(x) return x end
  local items = {}
  for i = 1, MAP_ITEMS do items[i] = i end
  for _, pool in ipairs { mp, pp } do pool:map(noop, { 1, 2, 3, 4 }, { chunksize = 1 }) end -- workers up
  local res = { mpipool = { submit = {}, map = {}, cpu = {} }, processpool = { submit = {}, map = {}, cpu = {} } }
  for _ = 1, opt.runs do
    for _, pool in ipairs { mp, pp } do
      local r = res[pool.kind]
      local t = luapool.now()
      local fs = {}
      for i = 1, opt.tasks do fs[i] = pool:submit(noop, i) end
      for i = 1, opt.tasks do assert(fs[i]:result() == i) end
      r.submit[#r.submit + 1] = (luapool.now() - t) / opt.tasks * 1e6
      t = luapool.now()
      local out = pool:map(noop, items)
      assert(#out == MAP_ITEMS and out[MAP_ITEMS] == MAP_ITEMS)
      r.map[#r.map + 1] = (luapool.now() - t) / MAP_ITEMS * 1e6
      t = luapool.now()
      local sums = pool:map(luapool.kernels.sum_squares, NUMBERS)
      r.cpu[#r.cpu + 1] = luapool.now() - t
      for i, s in ipairs(sums) do assert(tostring(s) == SUMS[i], "inexact sum for " .. NUMBERS[i]) end
    end
  end
  local m, p = res.mpipool, res.processpool
  print(("mpipool of %d rank(s) x %d slot(s), processpool of %d, %d rounds, medians:"):format(
    mp.max_workers, opt.slots, workers, opt.runs))
  print(("RESULT mpipool submit+result %.2f us/task  processpool %.2f  ratio %.2f"):format(
    median(m.submit), median(p.submit), median(m.submit) / median(p.submit)))
  print(("RESULT mpipool map %.3f us/item  processpool %.3f  ratio %.2f"):format(
    median(m.map), median(p.map), median(m.map) / median(p.map)))
  print(("RESULT mpipool cpu %.4f s  processpool %.4f  ratio %.2f  (exact)"):format(
    median(m.cpu), median(p.cpu), median(m.cpu) / median(p.cpu)))
end
-- }======

-- {====== the driver: one job per rank count, mpi4py beside it
local function q(s) return "'" .. tostring(s):gsub("'", [['\'']]) .. "'" end

local function capture(cmd)
  local f = assert(io.popen(cmd .. " 2>&1"))
  local s = f:read("a")
  f:close()
  return s
end

local function drive()
  local src = debug.getinfo(1, "S").source:sub(2)
  local root = src:match("^(.*)/scripts/bench/mpi%.lua$") or "."
  local peer = opt.peer or root .. "/../shared/peers/mpi_futures.py"
  if not io.open(peer) then peer = nil end
  local bin = arg[-1] or "luapool"
  local env = { "OMPI_MCA_btl=self,vader", "OMPI_MCA_btl_vader_single_copy_mechanism=none",
                "OMPI_MCA_mpi_yield_when_idle=true" }
  if capture("id -u"):match("^0") then
    env[#env + 1] = "OMPI_ALLOW_RUN_AS_ROOT=1"
    env[#env + 1] = "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
  end
  local envs = table.concat(env, " ")
  print(("luapool %s, %d CPUs, %s"):format(luapool.info().luapool, luapool.cpu_count(), luapool.info().os))
  print("| serving ranks | mpipool submit+result | mpi4py submit+result | mpi4py / mpipool "
    .. "| mpipool map (auto) | mpi4py map chunk 1000 | mpipool cpu | processpool cpu "
    .. "| mpipool / processpool | mpi4py cpu |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for k in tostring(opt.ranks):gmatch("%d+") do
    local n = tonumber(k) + 1
    local over = n > luapool.cpu_count() and "OMPI_MCA_rmaps_base_oversubscribe=true " or ""
    local got = { ms = {}, mm = {}, mc = {}, pc = {}, ps = {}, pm = {}, pcpu = {} }
    for _ = 1, opt.runs do
      local out = capture(("env %s%s mpiexec -n %d %s --mpi %s --runs 1 --tasks %d --slots %d"):format(
        over, envs, n, q(bin), q(src), opt.tasks, opt.slots))
      local s = out:match("RESULT mpipool submit%+result ([%d.]+)")
      local m = out:match("RESULT mpipool map ([%d.]+)")
      local c, pc = out:match("RESULT mpipool cpu ([%d.]+) s  processpool ([%d.]+)")
      if not (s and m and c) then error("the luapool job failed:\n" .. out) end
      got.ms[#got.ms + 1], got.mm[#got.mm + 1] = tonumber(s), tonumber(m)
      got.mc[#got.mc + 1], got.pc[#got.pc + 1] = tonumber(c), tonumber(pc)
      if peer then
        local po = capture(("env %s%s mpiexec -n %d /usr/bin/python3 -m mpi4py.futures %s %d"):format(
          over, envs, n, q(peer), opt.tasks))
        local ps = po:match("mpi4py submit%+result: ([%d.]+)")
        local pm = po:match("mpi4py map chunksize=1000: ([%d.]+)")
        local pcpu = po:match("mpi4py cpu job: ([%d.]+)")
        if ps then
          got.ps[#got.ps + 1], got.pm[#got.pm + 1] = tonumber(ps), tonumber(pm)
          got.pcpu[#got.pcpu + 1] = tonumber(pcpu)
        end
      end
    end
    local function med(t, fmt) return #t > 0 and fmt:format(median(t)) or "-" end
    local ratio = #got.ps > 0 and ("%.1fx"):format(median(got.ps) / median(got.ms)) or "-"
    print(("| %s | %s | %s | %s | %s | %s | %s | %s | %.2f | %s |"):format(k,
      med(got.ms, "%.2f us"), med(got.ps, "%.2f us"), ratio, med(got.mm, "%.3f us"), med(got.pm, "%.2f us"),
      med(got.mc, "%.4f s"), med(got.pc, "%.4f s"), median(got.mc) / median(got.pc), med(got.pcpu, "%.3f s")))
  end
  if not peer then print("(mpi4py.futures not run: no ../shared/peers/mpi_futures.py; give --peer FILE)") end
end
-- }======

if os.getenv("OMPI_COMM_WORLD_SIZE") or os.getenv("PMI_SIZE") or os.getenv("PMIX_RANK") then
  if opt.switches ~= 0 then switches() else measure() end -- rank 0 of a job (mpipool.new says what is wrong with it)
else
  drive()
end
