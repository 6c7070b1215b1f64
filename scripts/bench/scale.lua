-- Costs that must stay flat as a script grows: many outstanding futures,
-- and as_completed over futures with big results.
--
-- usage: luapool scripts/bench/scale.lua [--quick] [--runs N] [--warmup N]
--                                         [--json FILE] [--csv FILE] [--filter PATTERN]
--                                         [--peer] [--python PATH] [--job N]
--
-- Parts:
--   outstanding   N no-op tasks submitted to a threadpool of 2 workers, all
--                 of them outstanding at once (the script holds every
--                 future), then each result read (and checked): N = 10k,
--                 100k and 1M (1k, 2k, 5k with --quick).  Two ways to pass
--                 the function: made once outside the loop (hoisted, the
--                 baseline) or a new closure per submit (inline, the way
--                 most Lua is written).  Each size is a group, run smallest
--                 first: the peak RSS column (VmHWM, reset before each
--                 run) of a size is then not the leftover of a bigger one.
--                 Under the table: time per task against the smallest size.
--   as_completed  200 futures (40 with --quick) whose results are 100 KB
--                 strings, through luapool.as_completed; the script drops
--                 each future after reading it.  Every 50 (10) futures it
--                 prints how many futures are still alive (a weak table),
--                 the Lua heap (collectgarbage "count") and the RSS, after
--                 a full collection.  Flat memory means the loop holds only
--                 what it has not handed out yet.
--   --peer        the million-future job (10k with --quick) as whole
--                 commands under /usr/bin/time: luapool's (this script with
--                 --job N) and Python's ThreadPoolExecutor
--                 (scripts/bench/peers/overhead.py threads-submit N, the
--                 same job: submit noop(1) N times, then result() each),
--                 interleaved, --runs times each; medians of µs per task
--                 (wall time, interpreter and pool start included) and of
--                 peak RSS.
--   --job N       runs that one job and prints its time and peak RSS.
local bench = require "luapool.bench"

local suite = bench.suite {
  name = "scale", title = "outstanding futures (10k to 1M) and as_completed memory",
  runs = 3, warmup = 1, args = { ... },
  options = {
    { "peer", nil, "flag", "also time the million-future job as a command beside Python's (see the header)" },
    { "python", "PATH", "string", "Python interpreter for --peer (default python3)" },
    { "job", "N", "integer", "run only the peer job with N futures, print µs/task and peak RSS" },
  },
}
local quick, opts = suite.quick, suite.opts
local WORKERS = 2

local function noop(x) return x end

local function status_kb(field)
  local f = io.open("/proc/self/status")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  local kb = s:match(field .. ":%s*(%d+)%s*kB")
  return kb and tonumber(kb)
end

-- {====== --job N: the peer job alone (run as a command by --peer)

if opts.job then
  local n = opts.job
  local t0 = luapool.now()
  do
    local pool <close> = threadpool.new { max_workers = WORKERS }
    local fs = {}
    for i = 1, n do fs[i] = pool:submit(noop, 1) end
    for i = 1, n do assert(fs[i]:result() == 1) end
  end
  local t = luapool.now() - t0
  print(("job: %d tasks, %.2f µs/task, peak RSS %d KB"):format(n, t / n * 1e6, status_kb("VmHWM") or -1))
  return
end

-- }======

-- {====== outstanding futures

local SIZES = quick and { { "1k", 1000 }, { "2k", 2000 }, { "5k", 5000 } }
  or { { "10k", 10000 }, { "100k", 100000 }, { "1M", 1000000 } }

local JOBS = {}
function JOBS.hoisted(pool, n)
  local fs = {}
  for i = 1, n do fs[i] = pool:submit(noop, i) end
  for i = 1, n do
    if fs[i]:result() ~= i then error("wrong result for task " .. i) end
  end
end
function JOBS.inline(pool, n)
  local fs = {}
  for i = 1, n do fs[i] = pool:submit(function(x) return x end, i) end
  for i = 1, n do
    if fs[i]:result() ~= i then error("wrong result for task " .. i) end
  end
end

for _, size in ipairs(SIZES) do
  local label, n = size[1], size[2]
  for _, how in ipairs { "hoisted", "inline" } do
    suite:case {
      group = label, name = ("%s futures %s"):format(label, how), baseline = label .. " futures hoisted",
      params = { futures = n, fn = how, workers = WORKERS }, units = n, unit = "task",
      setup = function()
        -- The runner collected once, which ran the last run's finalizers:
        -- a second collection frees those futures, so that this run does
        -- not sweep a million of them.
        collectgarbage("collect")
        return threadpool.new { max_workers = WORKERS }
      end,
      body = function(pool) JOBS[how](pool, n) end,
      teardown = function(pool) pool:shutdown() end,
    }
  end
end
suite:note(("threadpool of %d workers; every future outstanding until all are submitted; "
  .. "per unit = median wall time / futures; peak rss = VmHWM of the process"):format(WORKERS))
local results = suite:run()

-- Per-task time of each size against the smallest, for each way.
do
  local per = {}
  for _, r in ipairs(results) do
    per[r.params.fn] = per[r.params.fn] or {}
    per[r.params.fn][r.params.futures] = r
  end
  local small = SIZES[1][2]
  io.write("\nper-task time against ", SIZES[1][1], " (same run):\n")
  for _, how in ipairs { "hoisted", "inline" } do
    local row, base = {}, per[how] and per[how][small]
    for _, size in ipairs(SIZES) do
      local r = per[how] and per[how][size[2]]
      if r and base then
        row[#row + 1] = ("%s %s (%.2fx)"):format(size[1], bench.format_time(r.per_unit), r.per_unit / base.per_unit)
      end
    end
    if #row > 0 then io.write(("  %-8s %s\n"):format(how, table.concat(row, "   "))) end
  end
end

-- }======

-- {====== as_completed memory over time

local function as_completed_memory()
  local n, every, size = quick and 40 or 200, quick and 10 or 50, 100 * 1024
  local pool <close> = threadpool.new { max_workers = WORKERS }
  local alive = setmetatable({}, { __mode = "k" })
  local function submit_all() -- the script keeps no list of the futures
    local fs = {}
    for i = 1, n do
      fs[i] = pool:submit(function(k, len) return string.rep(string.char(65 + k % 26), len) end, i, size)
      alive[fs[i]] = true
    end
    return fs
  end
  local function count()
    local c = 0
    for _ in pairs(alive) do c = c + 1 end
    return c
  end
  local rows = {}
  local function sample(yielded)
    collectgarbage("collect")
    collectgarbage("collect") -- a second cycle frees what the first one's finalizers released
    rows[#rows + 1] = { tostring(yielded), tostring(count()), ("%.0f"):format(collectgarbage("count")),
                        ("%.1f"):format((status_kb("VmRSS") or 0) / 1024) }
  end
  local yielded = 0
  for f in luapool.as_completed(submit_all()) do
    if yielded == 0 then sample(0) end
    assert(#f:result() == size)
    yielded = yielded + 1
    f = nil -- luacheck: ignore 311 (the script drops it)
    if yielded % every == 0 then sample(yielded) end
  end
  io.write(("\nas_completed over %d futures of %d KB results (threadpool of %d), sampled after "
    .. "a full collection:\n"):format(n, size // 1024, WORKERS))
  io.write(bench.format_table({ "yielded", "futures alive", "Lua KB", "RSS MB" }, rows, { "r", "r", "r", "r" }), "\n")
end

if not opts.filter or ("as_completed"):find(opts.filter) then as_completed_memory() end

-- }======

-- {====== --peer: the million-future job beside Python's

local function q(s) return "'" .. tostring(s):gsub("'", [['\'']]) .. "'" end

-- Runs cmd under /usr/bin/time; returns wall seconds and peak RSS in KB.
local function timed(cmd)
  local out = os.tmpname()
  local ok = os.execute(("/usr/bin/time -f '%%e %%M' -o %s %s >/dev/null 2>&1"):format(q(out), cmd))
  local f = io.open(out)
  local text = f and f:read("a") or ""
  if f then f:close() end
  os.remove(out)
  local wall, rss = text:match("([%d.]+) (%d+)%s*$")
  if not ok or not wall then return nil end
  return tonumber(wall), tonumber(rss)
end

if opts.peer then
  local n = quick and 10000 or 1000000
  local here = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")) or "."
  local self_path = debug.getinfo(1, "S").source:sub(2)
  local python = opts.python or "python3"
  local cmds = {
    { "luapool threadpool submit+result", ("%s %s --job %d"):format(q(arg[-1] or "luapool"), q(self_path), n) },
    { "python ThreadPoolExecutor submit+result",
      ("%s %s threads-submit %d"):format(q(python), q(here .. "/peers/overhead.py"), n) },
  }
  local walls, rsss = {}, {}
  for _ = 1, suite.runs do
    for k, c in ipairs(cmds) do
      local wall, rss = timed(c[2])
      if wall then
        walls[k] = walls[k] or {}
        rsss[k] = rsss[k] or {}
        table.insert(walls[k], wall)
        table.insert(rsss[k], rss)
      end
    end
  end
  local rows = {}
  for k, c in ipairs(cmds) do
    if walls[k] then
      rows[#rows + 1] = { c[1], ("%.2f µs"):format(bench.median(walls[k]) / n * 1e6),
                          ("%.0f MB"):format(bench.median(rsss[k]) / 1024), tostring(#walls[k]) }
    else
      rows[#rows + 1] = { c[1], "-", "-", "0 (failed or missing)" }
    end
  end
  io.write(("\n%d no-op futures outstanding, whole commands under /usr/bin/time (medians):\n"):format(n))
  io.write(bench.format_table({ "job", "per task", "peak RSS", "runs" }, rows, {}), "\n")
end

-- }======
