-- Validation of pool and map options, and the error paths around worker
-- lifetimes that only unusual situations reach.
local luapool = require "luapool"
local h = require "helper"

local function error_of(f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  return (tostring(err):gsub("^[^:\n]*:%d+: ", "", 1))
end

describe("pool options", function()
  it("refuses bad values of the failure options", function()
    local T, P = luapool.threadpool.new, luapool.processpool.new
    assert.are.equal("bad option 'task_timeout' to 'new' (positive number of seconds expected, got -1)",
      error_of(function() return T { task_timeout = -1 } end))
    assert.are.equal("bad option 'task_timeout' to 'new' (positive number of seconds expected, got x)",
      error_of(function() return P { task_timeout = "x" } end))
    assert.are.equal("bad option 'on_crash' to 'new' ('replace' or 'break' expected, got stop)",
      error_of(function() return P { on_crash = "stop" } end))
    assert.are.equal("bad option 'max_tasks_per_child' to 'new' (positive integer expected, got 0)",
      error_of(function() return P { max_tasks_per_child = 0 } end))
    assert.are.equal("bad option 'max_memory_mb' to 'new' (positive integer expected, got 1.5)",
      error_of(function() return P { max_memory_mb = 1.5 } end))
  end)

  it("says which options only a processpool has", function()
    for _, k in ipairs { "on_crash", "max_tasks_per_child", "max_memory_mb" } do
      assert.are.equal("bad option '" .. k .. "' to 'new' (a processpool option: threads share one process)",
        error_of(function() return luapool.threadpool.new { [k] = 1 } end))
    end
  end)

  it("reports its task_timeout", function()
    local p <close> = luapool.threadpool.new { task_timeout = 2.5 }
    assert.are.equal(2.5, p.task_timeout)
    local q <close> = luapool.threadpool.new {}
    assert.is_nil(q.task_timeout)
  end)
end)

describe("map and imap options", function()
  local pool
  setup(function() pool = luapool.threadpool.new { max_workers = 1 } end)
  teardown(function() pool:shutdown() end)

  it("refuses a bad task_timeout or timeout", function()
    assert.are.equal("bad option 'task_timeout' to 'map' (positive number of seconds expected, got 0)",
      error_of(function() return pool:map(print, {}, { task_timeout = 0 }) end))
    assert.are.equal("bad option 'task_timeout' to 'imap' (positive number of seconds expected, got -2)",
      error_of(function() return pool:imap(print, {}, { task_timeout = -2 }) end))
    assert.are.equal("bad option 'timeout' to 'map' (non-negative number expected, got -1)",
      error_of(function() return pool:map(print, {}, { timeout = -1 }) end))
    assert.are.equal("bad option 'buffersize' to 'imap' (positive integer expected, got 0)",
      error_of(function() return pool:imap(print, {}, { buffersize = 0 }) end))
  end)
end)

describe("worker lifetimes", function()
  it("fails a task with kind broken when the worker process cannot start", function()
    local out, _, code = h.run({ "-e", [[
      local p <close> = processpool.new { max_workers = 1 }
      local e = p:submit(print):exception()
      print(e.kind, e.message)]] }, nil, { LUAPOOL_WORKER_EXE = "/nonexistent/luapool" })
    assert.are.equal(0, code)
    assert.are.equal("broken\tcannot start worker process /nonexistent/luapool: No such file or directory\n", out)
  end)

  it("says so and leaves a thread it cannot stop, instead of hanging at exit", function()
    -- a blocking C call that is not luapool's: no stop reaches it (a loop
    -- in an xpcall handler is another such place, but it would burn a
    -- core for the whole grace period, next to other specs running)
    local out, err, code = h.run({ "-e", [[
      local p = threadpool.new { max_workers = 1, task_timeout = 0.2 }
      p:submit(function() os.execute("sleep 8") end)
      luapool.sleep(0.1)
      print("end of script")]] })
    assert.are.equal(0, code)
    assert.are.equal("end of script\n", out)
    assert.are.equal("luapool: 1 worker thread(s) of pool 'threadpool' did not stop within 5 seconds " ..
      "and were left running\n", err)
  end)

  it("refuses to use a pool whose finalizer already ran", function()
    local out, _, code = h.run({ "-e", [[
      local kept
      do
        local p = threadpool.new { max_workers = 1 }
        -- a finalizer that keeps the pool: the pool's own may run first
        setmetatable({}, { __gc = function() kept = p end })
      end
      collectgarbage()
      collectgarbage()
      print(pcall(function() return kept:submit(print) end))]] })
    assert.are.equal(0, code)
    assert.matches("^false\t.*attempt to use a closed pool\n$", out)
  end)
end)
