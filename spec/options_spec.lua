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
    assert.are.equal("bad option 'task_timeout' to 'new' (positive number of seconds expected, got string)",
      error_of(function() return P { task_timeout = "x" } end))
    assert.are.equal("bad option 'on_crash' to 'new' ('replace' or 'break' expected, got stop)",
      error_of(function() return P { on_crash = "stop" } end))
    assert.are.equal("bad option 'max_tasks_per_child' to 'new' (integer from 1 to 2147483647 expected, got 0)",
      error_of(function() return P { max_tasks_per_child = 0 } end))
    assert.are.equal("bad option 'max_memory_mb' to 'new' (integer from 1 to 2147483647 expected, got 1.5)",
      error_of(function() return P { max_memory_mb = 1.5 } end))
  end)

  it("reads every option with Lua's rules: integral floats are integers, strings are not numbers",
    function()
      local T, P = luapool.threadpool.new, luapool.processpool.new
      local half = T { max_workers = 4 / 2 } -- a float with an integral value
      assert.are.equal(2, half.max_workers)
      assert.are.equal("integer", math.type(half.max_workers))
      half:shutdown()
      local p <close> = P { max_workers = 1.0, max_tasks_per_child = 3.0, max_memory_mb = 64.0 }
      assert.are.equal(1, p.max_workers)
      assert.are.equal("bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got 2.5)",
        error_of(function() return T { max_workers = 2.5 } end))
      assert.are.equal("bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got string)",
        error_of(function() return T { max_workers = "2" } end))
      assert.are.equal("bad option 'task_timeout' to 'new' (positive number of seconds expected, got string)",
        error_of(function() return T { task_timeout = "1" } end))
      assert.are.equal("bad option 'task_timeout' to 'new' (positive number of seconds expected, got nan)",
        error_of(function() return T { task_timeout = 0 / 0 } end):gsub("%-nan", "nan"))
      assert.are.equal("bad option 'max_memory_mb' to 'new' (integer from 1 to 2147483647 expected, got string)",
        error_of(function() return P { max_memory_mb = "64" } end))
      assert.are.equal("bad option 'on_crash' to 'new' ('replace' or 'break' expected, got boolean)",
        error_of(function() return P { on_crash = true } end))
      assert.are.equal("bad option 'on_crash' to 'new' ('replace' or 'break' expected, got 1)",
        error_of(function() return P { on_crash = 1 } end))
      assert.are.equal("bad option 'name' to 'new' (non-empty string of at most 39 bytes expected, got 5)",
        error_of(function() return T { name = 5 } end))
      assert.are.equal("unknown option '1' to 'new'", error_of(function() return T { 5 } end))
      assert.are.equal("unknown option 'max_worker' to 'new'",
        error_of(function() return T { max_worker = 2 } end))
      -- the colon slip: it said "unknown option 'new' to 'new'" (helper-52)
      for _, kind in ipairs { "threadpool", "processpool", "iopool" } do
        assert.are.equal(("bad argument #1 to 'new' (options table expected, got the %s module: " ..
          "write %s.new{...}, with a dot)"):format(kind, kind),
          error_of(function() return luapool[kind]:new { max_workers = 1 } end))
      end
    end)

  it("says which options only a processpool has", function()
    for _, k in ipairs { "on_crash", "max_tasks_per_child", "max_memory_mb" } do
      assert.are.equal("bad option '" .. k .. "' to 'new' (a processpool/mpipool option: threads share one process)",
        error_of(function() return luapool.threadpool.new { [k] = 1 } end))
    end
  end)

  it("names another kind's own option without the note about processes", function()
    -- (before: "(an iopool option: threads share one process)", "a mpipool")
    assert.are.equal("bad option 'retries' to 'new' (an iopool option)",
      error_of(function() return luapool.threadpool.new { retries = 1 } end))
    assert.are.equal("bad option 'slots' to 'new' (an mpipool option)",
      error_of(function() return luapool.threadpool.new { slots = 1 } end))
    assert.are.equal("bad option 'prefetch' to 'new' (an mpipool option)",
      error_of(function() return luapool.iopool.new { prefetch = 1 } end))
  end)

  -- An integer option names its range: "positive integer expected, got
  -- 1000000000000.0" named no bound the value broke (helper-52).
  it("names the range of every integer option", function()
    local cases = {
      { "threadpool", "max_workers", 1e12, "integer from 1 to 4096 expected, got 1000000000000.0" },
      { "iopool", "concurrency", 1e12, "integer from 1 to 1000000 expected, got 1000000000000.0" },
      { "iopool", "concurrency", 0, "integer from 1 to 1000000 expected, got 0" },
      { "iopool", "per_host", 1000001, "integer from 0 to 1000000 expected, got 1000001" },
      { "iopool", "max_connections", -1, "integer from 0 to 1000000 expected, got -1" },
      { "iopool", "retries", 101, "integer from 0 to 100 expected, got 101" },
      { "processpool", "max_tasks_per_child", 2 ^ 31, "integer from 1 to 2147483647 expected, got 2147483648.0" },
      { "processpool", "max_memory_mb", 1e12, "integer from 1 to 2147483647 expected, got 1000000000000.0" },
    }
    for _, c in ipairs(cases) do
      assert.are.equal(("bad option '%s' to 'new' (%s)"):format(c[2], c[4]),
        error_of(function() return luapool[c[1]].new { [c[2]] = c[3] } end))
    end
  end)

  -- (the C string stops at the NUL: "a\0b" was silently cut to "a": helper-52)
  it("refuses a name with a NUL byte", function()
    for _, kind in ipairs(h.engines) do
      assert.are.equal("bad option 'name' to 'new' (string without NUL bytes expected)",
        error_of(function() return luapool[kind].new { name = "a\0b" } end))
    end
  end)

  it("says 1 worker, not 1 workers, in its tostring", function()
    for _, kind in ipairs(h.engines) do
      local one <close> = luapool[kind].new { max_workers = 1 }
      assert.are.equal(("%s '%s' (1 worker max)"):format(kind, kind), tostring(one))
      one:shutdown()
      assert.are.equal(("%s '%s' (1 worker max) (shut down)"):format(kind, kind), tostring(one))
    end
    local two <close> = luapool.threadpool.new { max_workers = 2, name = "t" }
    assert.are.equal("threadpool 't' (2 workers max)", tostring(two))
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
    assert.are.equal("broken\tcannot start worker process /nonexistent/luapool: No such file or directory "
      .. "(LUAPOOL_WORKER_EXE names the luapool binary workers run)\n", out)
  end)

  -- (LUAPOOL_TEST_HELLO_PAUSE: the other build refused at HELLO and exited
  -- before the start message went, whose send then failed: the refusal was
  -- still there to read, and the report said "it did not take its start
  -- message" instead, once in CI on a loaded machine)
  for _, pause in ipairs { false, "0.5" } do
    it("refuses a worker binary of another luapool build, naming both" ..
      (pause and ", gone before its start message" or ""), function()
      local other = h.bin:gsub("luapool$", "luapool-otherwire") -- built with wire version 0
      local out, _, code = h.run({ "-e", [[
        local p <close> = processpool.new { max_workers = 1 }
        local e = p:submit(print):exception()
        print(e.kind, e.message)
        print(p:submit(print):exception().message == e.message)]] }, nil,
        { LUAPOOL_WORKER_EXE = other, LUAPOOL_TEST_HELLO_PAUSE = pause or nil })
      assert.are.equal(0, code)
      local build = "luapool %d+%.%d+%.%d+ %(wire %d, Lua 5%.4%.%d+, little%-endian, 8%-byte integers " ..
        "and floats, kernels %x+%)"
      assert.matches("^broken\tcannot start worker process " .. other:gsub("%p", "%%%0") .. ": it is " ..
        build:gsub("wire %%d", "wire 0") .. ", and this is " .. build:gsub("wire %%d", "wire 1") ..
        ": a worker must be the same luapool build %(LUAPOOL_WORKER_EXE names the binary workers run%)\n" ..
        "true\n$", out)
    end)
  end

  it("refuses a worker binary that is no luapool at all", function()
    local out, _, code = h.run({ "-e", [[
      local p <close> = processpool.new { max_workers = 1 }
      local e = p:submit(print):exception()
      print(e.kind, e.message)]] }, nil, { LUAPOOL_WORKER_EXE = "/bin/true" })
    assert.are.equal(0, code)
    assert.matches("^broken\tcannot start worker process /bin/true: it did not take its start message " ..
      "%(exited with status 0%); a worker must be the same luapool build, luapool [%d.]+ %(wire 1, .*%)\n$",
      out)
  end)

  it("says so and leaves a thread it cannot stop, instead of hanging at exit", function()
    -- a blocking C call that is not luapool's: no stop reaches it (a loop
    -- in an xpcall handler is another such place, but it would burn a
    -- core for the whole grace period, next to other specs running)
    -- The script ends once the task is inside system() (its shell touched
    -- the file), not after a fixed time: before it, the task would still be
    -- queued, or in Lua where the stop reaches it.  Its deadline (2 s: well
    -- after the call starts on a busy machine, well within the 5 s grace)
    -- passes while it is in there.
    local started = os.tmpname()
    os.remove(started)
    finally(function() os.remove(started) end)
    local out, err, code = h.run({ "-e", ([[
      local started = %q
      local p = threadpool.new { max_workers = 1, task_timeout = 2 }
      p:submit(function() os.execute("touch '" .. started .. "'; sleep 8") end)
      local deadline = luapool.now() + 60
      while not io.open(started) and luapool.now() < deadline do luapool.sleep(0.01) end
      print("end of script")]]):format(started) })
    assert.are.equal(0, code)
    assert.are.equal("end of script\n", out)
    assert.are.equal("luapool: pool 'threadpool' was collected while still open: 0 queued tasks " ..
      "cancelled, 1 running task interrupted (close it, or call shutdown(), to wait for its work)\n" ..
      "luapool: 1 worker thread(s) of pool 'threadpool' did not stop within 5 seconds " ..
      "and were left running\n", err)
  end)

  it("says how many tasks a pool left open at exit cancelled and interrupted", function()
    local out, err, code = h.run({ "-e", [[
      local p = threadpool.new { max_workers = 1, name = "left" }
      local fs = {}
      for i = 1, 4 do fs[i] = p:submit(function() luapool.sleep(10) return i end) end
      while not fs[1]:running() do luapool.sleep(0.01) end
      print("end of script")]] })
    assert.are.equal(0, code)
    assert.are.equal("end of script\n", out)
    assert.are.equal("luapool: pool 'left' was collected while still open: 3 queued tasks " ..
      "cancelled, 1 running task interrupted (close it, or call shutdown(), to wait for its work)\n", err)
  end)

  for _, kind in ipairs(h.engines) do
    it("runs the work of a " .. kind .. " shut down with wait = false to its end before exit", function()
      -- the tasks wait for a file the script creates after its print: none
      -- can be done before the stats however slowly the script gets there
      -- (one at a time on an iopool too, so they still end in order)
      local go = os.tmpname()
      os.remove(go)
      finally(function() os.remove(go) end)
      local out, err, code = h.run({ "-e", ([[
        local go = %q
        local p = %s.new { max_workers = 1%s }
        for i = 1, 4 do
          p:submit(function()
            local deadline = luapool.now() + 60
            repeat
              local f = io.open(go)
              if f then f:close() break end
              luapool.sleep(0.01)
            until luapool.now() >= deadline
            io.stdout:write("task ", i, "\n")
          end)
        end
        p:shutdown { wait = false }
        local s = p:stats() -- (one snapshot: a task moving from pending to running between
                            -- two calls would count twice)
        print("shut down, " .. s.pending + s.running .. " still to run")
        io.stdout:flush()
        assert(io.open(go, "w")):close()]]):format(go, kind, h.serial_opt[kind] or "") }, nil, nil, kind)
      assert.are.equal(0, code)
      assert.are.equal("", err)
      assert.are.equal("shut down, 4 still to run\ntask 1\ntask 2\ntask 3\ntask 4\n", out)
    end)

    it("drops only the queued work of a " .. kind .. " shut down with cancel_futures", function()
      local out, err, code = h.run({ "-e", ([[
        local p = %s.new { max_workers = 1%s }
        local fs = {}
        for i = 1, 4 do
          fs[i] = p:submit(function() luapool.sleep(0.2) io.stdout:write("task ", i, "\n") end)
        end
        while not fs[1]:running() do luapool.sleep(0.01) end
        p:shutdown { wait = false, cancel_futures = true }
        print(fs[2]:cancelled(), fs[4]:cancelled())]]):format(kind, h.serial_opt[kind] or "") }, nil, nil, kind)
      assert.are.equal(0, code)
      assert.are.equal("", err)
      assert.are.equal("true\ttrue\ntask 1\n", out)
    end)
  end

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
