-- Per-task overhead of the executors on no-op tasks (median of runs), the
-- same jobs as Python's ../shared/peers/overhead.py measures.
-- usage: luapool scripts/bench/overhead.lua [--tasks N] [--runs N]
local tasks, runs = 100000, 5
local args = { ... }
for i = 1, #args, 2 do
  local v = math.tointeger(tonumber(args[i + 1]))
  if args[i] == "--tasks" and v then tasks = v
  elseif args[i] == "--runs" and v then runs = v
  else error("usage: overhead.lua [--tasks N] [--runs N]") end
end

local function noop(x) return x end
local items = {}
for i = 1, tasks do items[i] = i end

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

-- Each job builds its pool inside the timing, as the Python peer does.
local jobs = {
  { "threads submit+result (Lua fn)", function()
    local pool <close> = threadpool.new { max_workers = 2 }
    local fs = {}
    for i = 1, tasks do fs[i] = pool:submit(noop, i) end
    for i = 1, tasks do assert(fs[i]:result() == i) end
  end },
  { "threads submit+result (kernel)", function()
    local pool <close> = threadpool.new { max_workers = 2 }
    local k, fs = luapool.kernels.sum_squares, {}
    for i = 1, tasks do fs[i] = pool:submit(k, 1) end
    for i = 1, tasks do fs[i]:result() end
  end },
  { "threads map", function()
    local pool <close> = threadpool.new { max_workers = 2 }
    assert(#pool:map(noop, items) == tasks)
  end },
  { "processes map chunksize=1", function()
    local pool <close> = processpool.new { max_workers = 2 }
    assert(#pool:map(noop, items, { chunksize = 1 }) == tasks)
  end },
  { "processes map chunksize=1000", function()
    local pool <close> = processpool.new { max_workers = 2 }
    assert(#pool:map(noop, items, { chunksize = 1000 }) == tasks)
  end },
  { "processes map (automatic batching)", function()
    local pool <close> = processpool.new { max_workers = 2 }
    assert(#pool:map(noop, items) == tasks)
  end },
}

print(("%d no-op tasks per job, median of %d runs"):format(tasks, runs))
for _, job in ipairs(jobs) do
  local t = {}
  for r = 1, runs do
    collectgarbage()
    local t0 = luapool.now()
    job[2]()
    t[r] = luapool.now() - t0
  end
  print(("%-38s %8.2f us/task"):format(job[1], median(t) / tasks * 1e6))
end
