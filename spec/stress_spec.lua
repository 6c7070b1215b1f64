-- Stress: many tasks, many pools, many futures.  Counts, not timings: the
-- point is that nothing leaks (fds, threads, processes) and nothing is lost.
local luapool = require "luapool"
local h = require "helper"

local function count_dir(path)
  local p = assert(io.popen("ls -1 " .. path .. " 2>/dev/null | wc -l"))
  local n = tonumber(p:read("a"))
  p:close()
  return n
end

-- Worker processes whose parent is this one (zombies count: one is a leak).
local function children()
  local me = h.slurp("/proc/self/stat"):match("^(%d+)")
  local p = assert(io.popen("cat /proc/[0-9]*/stat 2>/dev/null"))
  local n = 0
  for line in p:lines() do
    local pid, ppid = line:match("^(%d+) %b() %a (%d+)")
    if ppid == me and (h.slurp("/proc/" .. pid .. "/cmdline") or ""):find("--worker", 1, true) then
      n = n + 1
    end
  end
  p:close()
  return n
end

local function resources()
  collectgarbage()
  collectgarbage()
  return { fds = count_dir("/proc/self/fd"), threads = count_dir("/proc/self/task"), workers = children() }
end

describe("stress", function()
  for _, kind in ipairs(h.engines) do
    it("runs 100,000 tasks through a " .. kind .. " and loses none", function()
      local pool <close> = luapool[kind].new { max_workers = 2 }
      local function f(x) return x * 2 end
      local fs, sum = {}, 0
      for i = 1, 100000 do fs[i] = pool:submit(f, i) end
      for i = 1, 100000 do sum = sum + fs[i]:result() end
      assert.are.equal(100000 * 100001, sum)
      local s = pool:stats()
      assert.are.equal(100000, s.done)
      assert.are.equal(0, s.failed + s.pending + s.running + s.cancelled)
    end)
  end

  it("creates and closes 1,000 pools without fd, thread or process growth", function()
    local before = resources()
    for i = 1, 1000 do
      local kind = i % 2 == 0 and "threadpool" or "processpool"
      local pool <close> = luapool[kind].new { max_workers = 2 }
      assert.are.equal(i, pool:submit(function(x) return x end, i):result())
    end
    local after = resources()
    assert.are.same(before, after)
  end)

  it("leaves nothing behind from pools that are only garbage collected", function()
    local before = resources()
    for i = 1, 200 do
      local pool = luapool.processpool.new { max_workers = 1 }
      pool:submit(function() return 1 end):result()
      pool:submit(luapool.sleep, 10) -- still running when collected
      if i % 50 == 0 then collectgarbage() end
    end
    assert.are.same(before, resources())
  end)

  it("waits on many futures from inside callbacks", function()
    local pool <close> = luapool.threadpool.new { max_workers = 4 }
    local inner, results = {}, {}
    for i = 1, 2000 do inner[i] = pool:submit(function(x) return x end, i) end
    local outer = {}
    for k = 1, 50 do
      outer[k] = pool:submit(function() return k end)
      outer[k]:add_done_callback(function(f)
        local sum = 0
        for i = k, 2000, 50 do sum = sum + inner[i]:result() end
        for _ in luapool.as_completed { inner[k], inner[k + 50] } do end
        results[f:result()] = sum
      end)
    end
    luapool.wait(outer)
    pool:shutdown()
    local total = 0
    for k = 1, 50 do total = total + results[k] end
    assert.are.equal(2000 * 2001 // 2, total)
  end)
end)
