-- Failures: workers that die (killed, exit, segfault), broken pools, task
-- deadlines (Lua loops, sleeps, native kernels), recycled and memory-capped
-- workers, results that cannot travel back, and SIGINT/SIGTERM in the host.
local luapool = require "luapool"
local h = require "helper"
local result_error, wait_until = h.result_error, h.wait_until
local K = luapool.kernels

local function pid_of_worker() return luapool.current_worker().pid end

local function pid_in(message) return tonumber(message:match("%(pid (%d+)%)")) end

-- A task for submit(fn, i): the k-th kills its own worker process with
-- SIGKILL, the others take a moment and return their index.
local function kill_self_at(k)
  return function(i)
    if i == k then os.execute("kill -9 " .. luapool.current_worker().pid) end
    luapool.sleep(0.01)
    return i
  end
end

-- kill_self_at(k) for a pool that breaks at the crash: the tasks after the
-- k-th also wait (60 s at most) until the file `gate` exists, which the
-- spec creates once it has seen the break.  Only the task the other worker
-- was running then can finish, however slowly the kill, the worker's death
-- and its proxy's wake-up come on a busy machine.
local function kill_self_at_gated(k, gate)
  return function(i)
    if i == k then os.execute("kill -9 " .. luapool.current_worker().pid) end
    if i > k then
      local deadline = luapool.now() + 60
      while luapool.now() < deadline do
        local f = io.open(gate)
        if f then f:close() break end
        luapool.sleep(0.005)
      end
    end
    luapool.sleep(0.01)
    return i
  end
end

describe("a process worker that dies", function()
  it("fails only its own task, kind crashed, and is replaced", function()
    local pool <close> = luapool.processpool.new { max_workers = 2, name = "crash" }
    local fs = {}
    for i = 1, 100 do fs[i] = pool:submit(kill_self_at(50), i) end
    local failed = {}
    for i, f in ipairs(fs) do
      local ok, r = pcall(f.result, f, 20)
      assert.is_true(f:done())
      assert.is_false(f:cancelled())
      if ok then
        assert.are.equal(i, r)
      else
        failed[#failed + 1] = { i, r }
      end
    end
    assert.are.equal(1, #failed)
    local i, e = failed[1][1], failed[1][2]
    assert.are.equal(50, i)
    assert.are.equal("crashed", e.kind)
    assert.matches("^worker crash%-[12] %(pid %d+%) killed by signal 9 %(KILL%) while running task #50$", e.message)
    assert.are.equal("crashed: " .. e.message, tostring(e))
    assert.are.equal(e.message:match("^worker (%S+)"), e.worker)
    local dead = pid_in(e.message)
    assert.is_false(h.alive(dead))
    local pids = pool:map(pid_of_worker, { 1, 2, 3, 4 }, { chunksize = 1 })
    for _, pid in ipairs(pids) do assert.are_not.equal(dead, pid) end
    local s = pool:stats()
    assert.are.same({ 103, 1, 0, 0, 0 }, { s.done, s.failed, s.pending, s.running, s.cancelled })
  end)

  -- The OOM killer picks the biggest process, busy or not.  The next task
  -- was once failed as crashed "while running" it, having never started.
  it("while idle is replaced: the next task runs on a new worker", function()
    local pool <close> = luapool.processpool.new { max_workers = 1, name = "idle" }
    for _ = 1, 3 do
      local pid = pool:submit(pid_of_worker):result(20)
      os.execute("kill -9 " .. pid)
      wait_until(function() return not h.alive(pid) end, "the worker to die", 10)
      local new = pool:submit(pid_of_worker):result(20)
      assert.are_not.equal(pid, new)
    end
    local s = pool:stats()
    assert.are.same({ 6, 0 }, { s.done, s.failed })
  end)

  it("while idle breaks a pool with on_crash = 'break', naming the death", function()
    local pool <close> = luapool.processpool.new { max_workers = 1, name = "idlebrk", on_crash = "break" }
    local pid = pool:submit(pid_of_worker):result(20)
    os.execute("kill -9 " .. pid)
    wait_until(function() return not h.alive(pid) end, "the worker to die", 10)
    local want = ("the pool is broken: worker idlebrk-1 (pid %d) killed by signal 9 (KILL) while idle"):format(pid)
    for _ = 1, 2 do
      local e = result_error(pool:submit(pid_of_worker), 20)
      assert.are.equal("broken", e.kind)
      assert.are.equal(want, e.message)
    end
  end)

  it("with on_crash = 'break' fails every unfinished task 'broken', losing none", function()
    local pool <close> = luapool.processpool.new { max_workers = 2, name = "brk", on_crash = "break" }
    local gate = os.tmpname()
    os.remove(gate)
    finally(function() os.remove(gate) end)
    local fs = {}
    for i = 1, 100 do fs[i] = pool:submit(kill_self_at_gated(50, gate), i) end
    -- the break seen: every task after the crash failed, but the one the
    -- other worker is running (held by the gate); without a break this
    -- gives up, the queued tasks neither done nor running.  The gate opens
    -- either way (or each task behind it would wait out its 60 s).
    local broke, why = pcall(wait_until, function()
      for i = 51, 100 do
        if not (fs[i]:done() or fs[i]:running()) then return false end
      end
      return true
    end, "the pool to break", 60)
    assert(io.open(gate, "w")):close()
    assert(broke, why)
    local states, crash_message = {}, nil
    for i, f in ipairs(fs) do
      local ok, r = pcall(f.result, f, 20)
      assert.is_true(f:done(), "future " .. i .. " is not done")
      assert.is_false(f:cancelled())
      assert.is_false(f:running())
      if ok then
        assert.are.equal(i, r)
        assert.is_nil(f:exception())
        states[i] = "ok"
      else
        states[i] = r.kind
        if r.kind == "crashed" then crash_message = r.message end
      end
    end
    assert.are.equal("crashed", states[50])
    assert.matches("^worker brk%-[12] %(pid %d+%) killed by signal 9 %(KILL%) while running task #50$", crash_message)
    -- Before the crash (the queue is FIFO, 2 workers): values kept, but for
    -- at most one task the other worker had been sent ahead (pipelined,
    -- processpool.c) and not started, which is unfinished and so broken
    -- like the rest (seen on a clean clone's README run: task 49)
    local early_broken = 0
    for i = 1, 49 do
      if states[i] == "broken" then
        early_broken = early_broken + 1
        assert.are.equal("the pool is broken: " .. crash_message, fs[i]:exception().message)
      else
        assert.are.equal("ok", states[i], "task " .. i)
      end
    end
    assert.is_true(early_broken <= 1, early_broken .. " tasks before the crash broken")
    -- After it: at most the task the other worker was running finishes
    -- (held by the gate until the break was seen, it cannot be followed by
    -- another): 51, or 52 when 51 had been sent ahead to the worker that
    -- crashed (and failed with what it held); every other one fails
    -- "broken" with the crash in its message.
    local late_ok = {}
    for i = 51, 100 do
      if states[i] == "ok" then
        late_ok[#late_ok + 1] = i
      else
        assert.are.equal("broken", states[i], "task " .. i)
        assert.are.equal("the pool is broken: " .. crash_message, fs[i]:exception().message)
      end
    end
    assert.is_true(#late_ok <= 1 and (late_ok[1] or 51) <= 52,
      "tasks " .. table.concat(late_ok, ", ") .. " ran after the crash")
    -- and so does everything submitted later
    local late = pool:submit(function() return 1 end)
    assert.is_true(late:done())
    local e = result_error(late, 5)
    assert.are.equal("broken", e.kind)
    assert.are.equal("the pool is broken: " .. crash_message, e.message)
    assert.are.equal("broken: the pool is broken: " .. crash_message, tostring(e))
    local s = pool:stats()
    assert.are.equal(101, s.done + s.failed)
    assert.are.equal(49 - early_broken + #late_ok, s.done)
    assert.are.same({ 0, 0, 0 }, { s.pending, s.running, s.cancelled })
  end)

  it("reports an exit status and a segfault, then runs the next task", function()
    local pool <close> = luapool.processpool.new { max_workers = 1, name = "die" }
    local pid1 = pool:submit(pid_of_worker):result(20)
    local e = result_error(pool:submit(function() os.exit(3) end), 20)
    assert.are.equal("crashed", e.kind)
    assert.are.equal(("worker die-1 (pid %d) exited with status 3 while running task #2"):format(pid1), e.message)
    assert.are.equal("die-1", e.worker)
    local pid2 = pool:submit(pid_of_worker):result(20)
    assert.are_not.equal(pid1, pid2)
    e = result_error(pool:submit(function()
      os.execute("kill -SEGV " .. luapool.current_worker().pid)
      luapool.sleep(10)
    end), 20)
    assert.are.equal("crashed", e.kind)
    assert.are.equal(("worker die-1 (pid %d) killed by signal 11 (SEGV) while running task #4"):format(pid2),
      e.message)
    assert.are.equal("after", pool:submit(function() return "after" end):result(20))
    assert.are_not.equal(pid2, pool:submit(pid_of_worker):result(20))
    assert.is_false(h.alive(pid1))
    assert.is_false(h.alive(pid2))
  end)
end)

-- {====== task deadlines

local RUNAWAY = {
  ["an infinite loop"] = function() while true do end end,
  ["a loop inside pcall, then another loop"] = function()
    pcall(function() while true do end end)
    while true do end
  end,
  ["a loop of pcalls"] = function()
    while true do pcall(function() for _ = 1, 100 do end end) end
  end,
  ["a loop of pcalls that raise"] = function()
    while true do pcall(error, "again") end
  end,
  ["a loop inside a coroutine"] = function()
    coroutine.wrap(function() while true do end end)()
  end,
  ["a loop resuming a looping coroutine"] = function()
    local co = coroutine.create(function() while true do end end)
    while true do coroutine.resume(co) end
  end,
  ["a pcall around a loop, then a return"] = function()
    pcall(function() while true do end end)
    return "escaped"
  end,
}
local RUNAWAY_NAMES = {}
for name in pairs(RUNAWAY) do RUNAWAY_NAMES[#RUNAWAY_NAMES + 1] = name end
table.sort(RUNAWAY_NAMES)

describe("task_timeout on a threadpool", function()
  for _, name in ipairs(RUNAWAY_NAMES) do
    it("stops " .. name .. " and the pool goes on", function()
      local pool <close> = luapool.threadpool.new { max_workers = 1, task_timeout = 0.3, name = "dl" }
      assert.are.equal(0.3, pool.task_timeout)
      local e = result_error(pool:submit(RUNAWAY[name]), 10)
      assert.are.equal("timeout", e.kind)
      assert.are.equal("task #1 exceeded its deadline of 0.3 seconds in worker dl-1", e.message)
      assert.are.equal("timeout: " .. e.message, tostring(e))
      assert.are.equal(42, pool:submit(function(x) return x * 2 end, 21):result(10))
    end)
  end

  it("stops a task sleeping in luapool.sleep", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1, task_timeout = 0.3, name = "dl" }
    local e = result_error(pool:submit(function() luapool.sleep(30) return "woke" end), 10)
    assert.are.equal("timeout", e.kind)
    assert.are.equal("task #1 exceeded its deadline of 0.3 seconds in worker dl-1", e.message)
    assert.are.equal("ok", pool:submit(function() return "ok" end):result(10))
  end)

  it("stops sum_squares of a huge n, called directly and from Lua", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1, task_timeout = 0.3, name = "sq" }
    local e = result_error(pool:submit(K.sum_squares, 7000000000000), 10)
    assert.are.equal("timeout", e.kind)
    assert.are.equal("task #1 exceeded its deadline of 0.3 seconds in worker sq-1", e.message)
    e = result_error(pool:submit(function(n) return K.sum_squares(n) end, 7000000000000), 10)
    assert.are.equal("timeout", e.kind)
    assert.are.equal("task #2 exceeded its deadline of 0.3 seconds in worker sq-1", e.message)
    assert.are.equal("285", tostring(pool:submit(K.sum_squares, 10):result(10)))
  end)
end)

describe("task_timeout on a processpool", function()
  for _, name in ipairs(RUNAWAY_NAMES) do
    it("kills the worker running " .. name .. " and replaces it", function()
      local pool <close> = luapool.processpool.new { max_workers = 1, task_timeout = 0.3, name = "dl" }
      local pid = pool:submit(pid_of_worker):result(10)
      local e = result_error(pool:submit(RUNAWAY[name]), 10)
      assert.are.equal("timeout", e.kind)
      assert.are.equal(("task #2 exceeded its deadline of 0.3 seconds in worker dl-1; " ..
        "the worker (pid %d) was killed and will be replaced"):format(pid), e.message)
      assert.is_false(h.alive(pid))
      assert.are.equal(42, pool:submit(function(x) return x * 2 end, 21):result(10))
      assert.are_not.equal(pid, pool:submit(pid_of_worker):result(10))
    end)
  end

  it("kills a worker sleeping in luapool.sleep", function()
    local pool <close> = luapool.processpool.new { max_workers = 1, task_timeout = 0.3, name = "dl" }
    local pid = pool:submit(pid_of_worker):result(10)
    local e = result_error(pool:submit(function() luapool.sleep(30) end), 10)
    assert.are.equal(("task #2 exceeded its deadline of 0.3 seconds in worker dl-1; " ..
      "the worker (pid %d) was killed and will be replaced"):format(pid), e.message)
    assert.are.equal("ok", pool:submit(function() return "ok" end):result(10))
  end)
end)

for _, kind in ipairs(h.engines) do
  local tail = h.traits[kind].kills and "; the worker %(pid %d+%) was killed and will be replaced$" or "$"
  local at = h.at(kind) -- ("rank 1 of 3 on host: " on an mpipool)

  describe(kind .. " map/imap with the task_timeout option", function()
    local function loop_at_3(x)
      if x == 3 then while true do end end
      return x * 10
    end

    it("map raises the timeout naming the item", function()
      local pool <close> = luapool[kind].new { max_workers = 2, name = "mp" }
      local ok, e = pcall(pool.map, pool, loop_at_3, { 1, 2, 3, 4, 5 }, { task_timeout = 0.3 })
      assert.is_false(ok)
      assert.are.equal("table", type(e), tostring(e))
      assert.are.equal("timeout", e.kind)
      assert.matches("^" .. at .. "item #3 exceeded its deadline of 0%.3 seconds in worker mp%-[12]" .. tail, e.message)
      assert.are.same({ 10, 20, 40 }, pool:map(loop_at_3, { 1, 2, 4 }))
    end)

    it("starmap raises the timeout naming the item", function()
      local pool <close> = luapool[kind].new { max_workers = 2, name = "mp" }
      local ok, e = pcall(pool.starmap, pool, function(a, b) return loop_at_3(a + b) end,
        { { 1, 0 }, { 1, 1 }, { 2, 1 } }, { task_timeout = 0.3 })
      assert.is_false(ok)
      assert.are.equal("timeout", e.kind)
      assert.matches("^" .. at .. "item #3 exceeded its deadline of 0%.3 seconds in worker mp%-[12]" .. tail, e.message)
    end)

    it("imap raises the timeout at the item, naming it by its input index", function()
      local pool <close> = luapool[kind].new { max_workers = 2, name = "mp" }
      local got = {}
      local ok, e = pcall(function()
        for i, r in pool:imap(loop_at_3, { 1, 2, 3, 4 }, { task_timeout = 0.3 }) do got[i] = r end
      end)
      assert.is_false(ok)
      assert.are.equal("table", type(e), tostring(e))
      assert.are.equal("timeout", e.kind)
      assert.are.same({ 10, 20 }, got)
      assert.matches("^" .. at .. "item #3 exceeded its deadline of 0%.3 seconds in worker mp%-[12]" .. tail, e.message)
    end)

    it("gives each item of an explicit chunk its own deadline", function()
      -- six items of 0.25 s in one chunk take 1.5 s: each is within 1 s (a
      -- margin a loaded machine keeps)
      local pool <close> = luapool[kind].new { max_workers = 1, name = "ck" }
      local function slow(x) luapool.sleep(0.25) return x * 10 end
      assert.are.same({ 10, 20, 30, 40, 50, 60 },
        pool:map(slow, { 1, 2, 3, 4, 5, 6 }, { chunksize = 6, task_timeout = 1 }))
      local got = {}
      for i, r in pool:imap(slow, { 1, 2, 3, 4, 5 }, { chunksize = 5, task_timeout = 1 }) do got[i] = r end
      assert.are.same({ 10, 20, 30, 40, 50 }, got)
    end)

    it("names the item of a chunk that outlives its own deadline", function()
      local pool <close> = luapool[kind].new { max_workers = 1, name = "ck" }
      local ok, e = pcall(pool.map, pool, loop_at_3, { 1, 2, 3, 4, 5 }, { chunksize = 5, task_timeout = 0.3 })
      assert.is_false(ok)
      assert.are.equal("timeout", e.kind)
      assert.matches("^" .. at .. "item #3 exceeded its deadline of 0%.3 seconds in worker ck%-1" .. tail, e.message)
      -- err.item on every engine: a killed process fails the chunk as a whole, but at item 3's deadline
      assert.are.equal(3, e.item)
      local s = pool:stats()
      if not h.traits[kind].kills then
        -- the thread (or the loop) stopped item 3 alone: items 4 and 5 of the chunk still ran
        assert.are.same({ 4, 1 }, { s.done, s.failed })
      else
        -- the process was killed: the chunk failed as a whole
        assert.are.same({ 0, 5 }, { s.done, s.failed })
      end
      -- imap, a chunk of 3 from item 4: item #5 is the one
      local got = {}
      local ok2, e2 = pcall(function()
        for i, r in pool:imap(function(x) if x == 5 then while true do end end return x end,
                              { 1, 2, 3, 4, 5, 6 }, { chunksize = 3, task_timeout = 0.3 }) do
          got[i] = r
        end
      end)
      assert.is_false(ok2)
      assert.are.equal("timeout", e2.kind)
      assert.are.equal(5, e2.item)
      assert.matches("^" .. at .. "item #5 exceeded its deadline of 0%.3 seconds in worker ck%-1" .. tail, e2.message)
      assert.are.same({ 1, 2, 3 }, got)
    end)
  end)
end

for _, kind in ipairs(h.engines) do
  describe(kind .. " package paths", function()
    it("gives each task the package.path and cpath the script had when it submitted it", function()
      local old_path, old_cpath = package.path, package.cpath
      finally(function() package.path, package.cpath = old_path, old_cpath end)
      local pool <close> = luapool[kind].new { max_workers = 1 }
      local function paths()
        luapool.sleep(0.05)
        return package.path, package.cpath
      end
      local before = { pool:submit(paths), pool:submit(paths) } -- queued, not yet run
      package.path = "/tmp/luapool-spec/?.lua;" .. old_path
      package.cpath = "/tmp/luapool-spec/?.so"
      local after = pool:submit(paths)
      for _, f in ipairs(before) do
        assert.are.same({ old_path, old_cpath }, { f:result(30) })
      end
      assert.are.same({ package.path, package.cpath }, { after:result(30) })
      -- a worker started after the change (a new process, a new thread) too
      local fresh <close> = luapool[kind].new { max_workers = 2 }
      package.path = "/tmp/luapool-spec2/?.lua"
      assert.are.same({ "/tmp/luapool-spec2/?.lua", package.cpath }, { fresh:submit(paths):result(30) })
      package.path = old_path
      assert.are.same({ old_path, package.cpath }, { fresh:map(function() return package.path end, { 1 })[1],
        package.cpath })
    end)
  end)
end

describe("processpool package paths", function()
  it("are not sent ahead while the worker writes a big reply (a long package.path: no deadlock)", function()
    -- (helper-55: the next task and its new paths went ahead in one frame of
    -- any size; with the socket full both sides waited for the other)
    local old_path = package.path
    finally(function() package.path = old_path end)
    local pool <close> = luapool.processpool.new { max_workers = 1 }
    pool:submit(function() end):result(30)
    local slow = pool:submit(function() luapool.sleep(0.2) return 1 end)
    local big = pool:submit(function() luapool.sleep(0.3) return string.rep("r", 16 << 20) end)
    luapool.sleep(0.1)
    package.path = "./?.lua;" .. string.rep("/nonexistent/dir", 1 << 16) .. "/?.lua"
    local after = pool:submit(function() return #package.path end)
    assert.are.equal(1, slow:result(30))
    assert.are.equal(16 << 20, #big:result(30))
    assert.are.equal(#package.path, after:result(30))
  end)
end)

describe("task_timeout and a slow fetch", function()
  local srv
  setup(function() srv = h.fixture() end)
  teardown(function() if srv then srv:stop() end end)

  it("stops fetch_length on a threadpool", function()
    -- Ten in a row: curl's own timeout (capped at the time left) may end a
    -- transfer a little early; the outcome must still be the timeout.
    local pool <close> = luapool.threadpool.new { max_workers = 1, task_timeout = 0.3, name = "net" }
    for i = 1, 10 do
      local t0 = luapool.now()
      local e = pool:submit(K.fetch_length, srv:url("/sleep?s=5&i=" .. i)):exception(4)
      assert.is_true(luapool.now() - t0 < 4)
      assert.is_truthy(e, "fetch #" .. i .. " succeeded")
      assert.are.equal("timeout", e.kind, "fetch #" .. i .. ": " .. e.message)
      assert.are.equal("task #" .. i .. " exceeded its deadline of 0.3 seconds in worker net-1", e.message)
    end
    assert.are.same({ 7, 200 }, { pool:submit(K.fetch_length, srv:url("/bytes?n=7")):result(4) })
  end)

  it("stops fetch_length called from Lua on a threadpool", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1, task_timeout = 0.3, name = "net" }
    local e = pool:submit(function(u) return K.fetch_length(u) end, srv:url("/sleep?s=5")):exception(4)
    assert.is_truthy(e)
    assert.are.equal("task #1 exceeded its deadline of 0.3 seconds in worker net-1", e.message)
  end)

  it("kills the worker running fetch_length on a processpool", function()
    local pool <close> = luapool.processpool.new { max_workers = 1, task_timeout = 0.3, name = "net" }
    local pid = pool:submit(pid_of_worker):result(10)
    local t0 = luapool.now()
    local e = pool:submit(K.fetch_length, srv:url("/sleep?s=5")):exception(4)
    assert.is_true(luapool.now() - t0 < 4)
    assert.is_truthy(e)
    assert.are.equal("timeout", e.kind)
    assert.are.equal(("task #2 exceeded its deadline of 0.3 seconds in worker net-1; " ..
      "the worker (pid %d) was killed and will be replaced"):format(pid), e.message)
    assert.are.same({ 7, 200 }, { pool:submit(K.fetch_length, srv:url("/bytes?n=7")):result(4) })
  end)
end)

-- }======

describe("processpool worker limits", function()
  it("replaces a worker after max_tasks_per_child tasks", function()
    local pool <close> = luapool.processpool.new { max_workers = 1, max_tasks_per_child = 2 }
    local pids = {}
    for i = 1, 6 do pids[i] = pool:submit(pid_of_worker):result(20) end
    assert.are.equal(pids[1], pids[2])
    assert.are.equal(pids[3], pids[4])
    assert.are.equal(pids[5], pids[6])
    assert.are_not.equal(pids[1], pids[3])
    assert.are_not.equal(pids[3], pids[5])
    assert.are_not.equal(pids[1], pids[5])
  end)

  it("fails a task past max_memory_mb as crashed and replaces the worker", function()
    local pool <close> = luapool.processpool.new { max_workers = 1, max_memory_mb = 64, name = "mem" }
    local pid = pool:submit(pid_of_worker):result(20)
    local e = result_error(pool:submit(function()
      local t = {}
      for i = 1, 5000000 do t[i] = ("x"):rep(10) .. i end
      return #t
    end), 20)
    assert.are.equal("crashed", e.kind)
    assert.are.equal(("worker mem-1 (pid %d) ran out of memory (max_memory_mb = 64) while running task #2")
      :format(pid), e.message)
    assert.are.equal("crashed: " .. e.message, tostring(e))
    assert.is_false(h.alive(pid))
    local pid2, n = pool:submit(function() return luapool.current_worker().pid, #("y"):rep(1000000) end):result(20)
    assert.are.equal(1000000, n)
    assert.are_not.equal(pid, pid2)
  end)
end)

for _, kind in ipairs(h.engines) do
  describe(kind .. " result that cannot travel back", function()
    it("fails kind transfer and the pool goes on", function()
      local pool <close> = luapool[kind].new { max_workers = 1, name = "tr" }
      local e = result_error(pool:submit(function() return coroutine.create(print) end), 20)
      assert.are.equal("transfer", e.kind)
      assert.are.equal("cannot send result #1: a coroutine", e.message)
      assert.are.equal("transfer: cannot send result #1: a coroutine", tostring(e))
      assert.are.equal(h.worker_name(kind, "tr", 1), e.worker)
      e = result_error(pool:submit(function() return 1, coroutine.running() end), 20)
      assert.are.equal("cannot send result #2: a coroutine", e.message)
      assert.are.equal("ok", pool:submit(function() return "ok" end):result(20))
    end)
  end)

  describe(kind .. " task whose error object's __tostring raises", function()
    -- Its text was taken unprotected: the raise read as "could not receive
    -- the task" (kind transfer) and the value was lost.
    it("fails kind task, keeps the value and says what __tostring did", function()
      local pool <close> = luapool[kind].new { max_workers = 1, name = "ts" }
      local e = result_error(pool:submit(function()
        error(setmetatable({ code = 7 }, { __tostring = function() error("tostring boom", 0) end }))
      end), 20)
      assert.are.equal("task", e.kind)
      assert.are.equal("(error object is a table value whose __tostring raised: tostring boom)", e.message)
      assert.are.equal(7, e.value.code)
      e = result_error(pool:submit(function() error(setmetatable({}, { __tostring = function() return {} end })) end),
        20)
      assert.are.equal("(error object is a table value whose __tostring raised: '__tostring' must return a string)",
        e.message)
      assert.are.equal("ok", pool:submit(function() return "ok" end):result(20))
    end)
  end)
end

-- {====== SIGINT and SIGTERM in the host

-- Run as `luapool SCRIPT NOTES MODE`: notes its pid, starts tasks that
-- note theirs (process workers) or that they run (threads), and waits.
local SIGNAL_SCRIPT = [==[
local notes, mode = arg[1], arg[2]
local function note(line)
  local f = assert(io.open(notes, "a"))
  f:write(line, "\n")
  f:close()
end
note("main " .. luapool.current_worker().pid)
if mode == "callback" then -- the signal comes while a done callback runs
  local p <close> = threadpool.new { max_workers = 1 }
  local f = p:submit(function() luapool.sleep(0.1) return 1 end)
  f:add_done_callback(function()
    note("waiting")
    luapool.sleep(30)
  end)
  f:result()
  print("not reached")
  return
end
if mode == "callback caught" then -- and caught: the callbacks still owed run later, once
  local p <close> = threadpool.new { max_workers = 2 }
  local gate = os.tmpname()
  os.remove(gate)
  local function gated(v)
    while true do
      local g = io.open(gate)
      if g then
        g:close()
        luapool.sleep(v == 2 and 0.05 or 0) -- (b ends after a: a's callback first)
        return v
      end
      luapool.sleep(0.005)
    end
  end
  local a, b = p:submit(gated, 1), p:submit(gated, 2)
  local ran = {}
  a:add_done_callback(function()
    ran[#ran + 1] = "a"
    note("waiting")
    luapool.sleep(30)
  end)
  b:add_done_callback(function() ran[#ran + 1] = "b" end)
  -- both end before the first poll (luapool.sleep polls nothing), so that
  -- poll takes a's and b's callbacks at once and gives b's back
  assert(io.open(gate, "w")):close()
  luapool.sleep(0.5)
  os.remove(gate)
  local ok, e = pcall(a.exception, a)
  print(ok, e.kind, table.concat(ran, ","))
  b:exception(10)
  a:done()
  print(table.concat(ran, ","))
  return
end
if mode == "command" then -- a process task runs a command, and waits for it
  local p <close> = processpool.new { max_workers = 1 }
  local f = p:submit(function(path)
    return os.execute("sh -c 'echo $$ > " .. path .. ".cmd; exec sleep 60'")
  end, notes)
  f:result()
  return
end
if mode == "interrupted future" then -- a callback re-raising a task's interruption
  local p <close> = threadpool.new { max_workers = 1 }
  local f = p:submit(function() luapool.sleep(30) end)
  local ran = {}
  f:add_done_callback(function(fut) fut:result() end)
  f:add_done_callback(function() ran[#ran + 1] = "second" end)
  local ok, e = pcall(function()
    note("waiting")
    return f:result()
  end)
  print(ok, e.kind, e.message)
  print(p:submit(function() return 5 end):result(10), table.concat(ran, ","))
  return
end
local pp = processpool.new { max_workers = 2, name = "pp" }
local tp = threadpool.new { max_workers = 2, name = "tp" }
local function proc_task(path)
  local f = io.open(path, "a")
  f:write("worker ", luapool.current_worker().pid, "\n")
  f:close()
  luapool.sleep(30)
  return "finished"
end
local function thread_sleep(path)
  local f = io.open(path, "a")
  f:write("thread\n")
  f:close()
  luapool.sleep(30)
  return "finished"
end
local function thread_loop(path)
  local f = io.open(path, "a")
  f:write("thread\n")
  f:close()
  while true do end
end
local fs = {
  pp:submit(proc_task, notes), pp:submit(proc_task, notes), pp:submit(proc_task, notes),
  tp:submit(thread_sleep, notes), tp:submit(thread_loop, notes), tp:submit(thread_sleep, notes),
}
-- "waiting": the test's signal may come now (it came during the last
-- submit above, outside the pcall, when the test waited for the tasks only)
if mode == "uncaught" then
  note("waiting")
  fs[1]:result()
  print("not reached")
  return
end
local ok, err = pcall(function()
  note("waiting")
  return fs[1]:result()
end)
print(ok, err.kind, err.message)
for i, f in ipairs(fs) do
  local e = f:exception(10)
  print(i, f:done(), f:cancelled(), e and e.kind, e and e.message)
end
print(pp:submit(function(x) return x * 2 end, 21):result(20), tp:submit(function(x) return x + 1 end, 41):result(20))
if mode == "twice" then
  note("again")
  pp:submit(proc_task, notes)
  pp:submit(proc_task, notes)
  while true do end
end
]==]

local q = h.shell_quote

-- Starts the script in the background; returns a handle with the paths.
-- group: in a process group of its own (setsid), for signals to the group.
local function start_host(mode, group)
  local run = {
    script = h.tempfile(SIGNAL_SCRIPT), notes = h.tempfile(""), status = os.tmpname(),
    out = os.tmpname(), err = os.tmpname(),
  }
  os.remove(run.status) -- it appears when luapool has ended
  local line = ("%s%s %s %s %s; echo $? >%s"):format(group and "setsid -w " or "", q(h.bin), q(run.script),
    q(run.notes), q(mode), q(run.status))
  os.execute(("sh -c %s >%s 2>%s </dev/null &"):format(q(line), q(run.out), q(run.err)))
  return run
end

-- The notes: main pid, worker pids, how many threads started, and lines.
local function read_notes(run)
  local n = { workers = {}, threads = 0, lines = {} }
  for line in (h.slurp(run.notes) or ""):gmatch("[^\n]+") do
    n.lines[#n.lines + 1] = line
    local what, pid = line:match("^(%a+) (%d+)$")
    if what == "main" then n.main = tonumber(pid) end
    if what == "worker" then n.workers[#n.workers + 1] = tonumber(pid) end
    if line == "thread" then n.threads = n.threads + 1 end
    if line == "waiting" then n.waiting = true end
  end
  return n
end

local function wait_workers(run, nworkers)
  local n
  wait_until(function()
    n = read_notes(run)
    return n.main and #n.workers >= nworkers and n.threads >= 2 and n.waiting
  end, nworkers .. " workers and 2 threads to start and the script to wait", 20)
  return n
end

-- Waits for luapool to end; returns its exit status, stdout, stderr.
local function wait_end(run)
  local status
  wait_until(function()
    status = tonumber((h.slurp(run.status) or ""):match("^(%d+)\n"))
    return status ~= nil
  end, "luapool to end", 10)
  return status, h.slurp(run.out), h.slurp(run.err)
end

-- The notes once the script noted "waiting" (what: what that means, for
-- the message if it never does).
local function wait_waiting(run, what)
  local n
  wait_until(function()
    n = read_notes(run)
    return n.waiting
  end, what, 20)
  return n
end

local function cleanup(run)
  local n = read_notes(run)
  if n.main and h.alive(n.main) then os.execute("kill -9 " .. n.main) end
  for _, path in ipairs { run.script, run.notes, run.status, run.out, run.err } do os.remove(path) end
end

-- A killed process is not gone at the very instant its parent ends (a
-- sanitizer's big mappings take a moment to tear down): allow a bound.
local function assert_all_dead(n)
  local pids = { n.main }
  for _, pid in ipairs(n.workers) do pids[#pids + 1] = pid end
  local deadline = luapool.now() + 5
  for _, pid in ipairs(pids) do
    while h.alive(pid) and luapool.now() < deadline do luapool.sleep(0.02) end
    assert.is_false(h.alive(pid), (pid == n.main and "luapool " or "worker ") .. pid .. " is still alive")
  end
end

describe("a signal to the luapool host", function()
  for _, c in ipairs { { "INT", 130 }, { "TERM", 143 } } do
    local sig, code = c[1], c[2]
    it("SIG" .. sig .. " uncaught ends the script with status " .. code .. " and no worker left", function()
      local run = start_host("uncaught")
      finally(function() cleanup(run) end)
      local n = wait_workers(run, 2)
      assert.are.equal(2, #n.workers)
      os.execute("kill -" .. sig .. " " .. n.main)
      local status, out, err = wait_end(run)
      assert.are.equal(code, status, err)
      assert.are.equal("", out)
      local prefix = "luapool: interrupted: the script received SIG" .. sig .. "\nstack traceback:\n"
      assert.are.equal(prefix, err:sub(1, #prefix))
      assert_all_dead(read_notes(run))
    end)
  end

  -- To the whole group (kill -- -PGID, timeout(1), a batch system's stop),
  -- SIGTERM reached the process workers too, and their tasks read as
  -- crashed instead of interrupted.
  for _, c in ipairs { { "INT", "the host" }, { "TERM", "the whole process group" } } do
    local sig, to = c[1], c[2]
    it("SIG" .. sig .. " to " .. to .. " caught: running tasks interrupted, queued ones cancelled, the pools go on",
      function()
    local group = sig == "TERM"
    local run = start_host("caught", group)
    finally(function() cleanup(run) end)
    local n = wait_workers(run, 2)
    if group then
      local pgid = tonumber((h.slurp("/proc/" .. n.main .. "/stat") or ""):match("^%d+ %b() %a %d+ (%d+)"))
      assert.are.equal(n.main, pgid) -- (never the spec's own group)
      os.execute("bash -c 'kill -TERM -- -" .. pgid .. "'") -- (bash: sh's kill takes no group)
    else
      os.execute("kill -INT " .. n.main)
    end
    local status, out, err = wait_end(run)
    assert.are.equal(0, status, err)
    assert.are.equal("", err)
    local lines = {}
    for line in out:gmatch("[^\n]*\n") do lines[#lines + 1] = line end
    assert.are.equal(8, #lines, out)
    assert.are.equal("false\tinterrupted\tthe script received SIG" .. sig .. "\n", lines[1])
    local seen = {}
    for i = 1, 2 do
      local pid = tonumber(lines[i + 1]:match(("^%d\ttrue\tfalse\tinterrupted\ttask #%d was interrupted: " ..
        "worker pp%%-[12] %%(pid (%%d+)%%) was stopped\n$"):format(i, i)))
      assert.is_truthy(pid, lines[i + 1])
      assert.is_true(pid == n.workers[1] or pid == n.workers[2], lines[i + 1])
      assert.is_nil(seen[pid])
      seen[pid] = true
    end
    assert.are.equal("3\ttrue\ttrue\tcancelled\tthe task was cancelled\n", lines[4])
    assert.matches("^4\ttrue\tfalse\tinterrupted\ttask #1 was interrupted in worker tp%-[12]\n$", lines[5])
    assert.matches("^5\ttrue\tfalse\tinterrupted\ttask #2 was interrupted in worker tp%-[12]\n$", lines[6])
    assert.are.equal("6\ttrue\ttrue\tcancelled\tthe task was cancelled\n", lines[7])
    assert.are.equal("42\t42\n", lines[8])
    assert_all_dead(read_notes(run))
  end)
  end

  -- The callback's error was reported as any callback's, and the script
  -- went on to its end with status 0.
  it("SIGINT while a done callback runs ends the script with status 130", function()
    local run = start_host("callback")
    finally(function() cleanup(run) end)
    local n = wait_waiting(run, "the callback to run")
    os.execute("kill -INT " .. n.main)
    local status, out, err = wait_end(run)
    assert.are.equal(130, status, err)
    assert.are.equal("", out)
    local prefix = "luapool: interrupted: the script received SIGINT\nstack traceback:\n"
    assert.are.equal(prefix, err:sub(1, #prefix))
  end)

  it("SIGINT caught in a done callback: the callbacks still owed run later, each once", function()
    local run = start_host("callback caught")
    finally(function() cleanup(run) end)
    local n = wait_waiting(run, "the callback to run")
    os.execute("kill -INT " .. n.main)
    local status, out, err = wait_end(run)
    assert.are.equal(0, status, err)
    assert.are.equal("", err)
    -- a's callback took the signal: b's ran once, later (or before it, on a
    -- machine too slow to end a 50 ms before b)
    local first, later = out:match("^false\tinterrupted\t([ab,]+)\n([ab,]+)\n$")
    assert.is_truthy(first, out)
    assert.is_truthy(first == "a" or first == "b,a", out)
    assert.is_truthy(later == "a,b" or later == "b,a", out)
  end)

  -- A process worker ignored SIGINT, and a command its task started
  -- inherited that: a Ctrl-C at the terminal (the whole group) left it
  -- running after luapool ended.
  for _, sig in ipairs { "INT", "TERM" } do
    it("SIG" .. sig .. " to the whole process group ends a command a process task started", function()
      local run = start_host("command", true)
      local cmd_pid
      finally(function()
        if cmd_pid and h.alive(cmd_pid) then os.execute("kill -9 " .. cmd_pid) end
        os.remove(run.notes .. ".cmd")
        cleanup(run)
      end)
      wait_until(function()
        cmd_pid = tonumber((h.slurp(run.notes .. ".cmd") or ""):match("^(%d+)\n"))
        return cmd_pid ~= nil
      end, "the command to start", 20)
      local main = read_notes(run).main
      os.execute("bash -c 'kill -" .. sig .. " -- -" .. main .. "'")
      local status = wait_end(run)
      assert.are.equal(sig == "INT" and 130 or 143, status)
      wait_until(function() return not h.alive(cmd_pid) end, "the command to end", 10)
    end)
  end

  -- Only the script's own interruption ends the wait that runs a callback:
  -- a task's error of kind interrupted, raised again by a callback, is that
  -- callback's error (it once ended the script with status 130).
  it("SIGINT caught: a callback raising its interrupted task's error is reported, the rest run", function()
    local run = start_host("interrupted future")
    finally(function() cleanup(run) end)
    local n = wait_waiting(run, "the script to wait")
    luapool.sleep(0.2) -- (a signal before the wait begins is delivered there too)
    os.execute("kill -INT " .. n.main)
    local status, out, err = wait_end(run)
    assert.are.equal(0, status, err)
    assert.are.equal("false\tinterrupted\tthe script received SIGINT\n5\tsecond\n", out)
    assert.matches("^luapool: error in a done callback: interrupted: task #1 was interrupted in worker " ..
      "threadpool%-1\nstack traceback:\n", err)
  end)

  it("a second SIGINT ends a script stuck after catching the first, status 130, no worker left", function()
    local run = start_host("twice")
    finally(function() cleanup(run) end)
    local n = wait_workers(run, 2)
    os.execute("kill -INT " .. n.main)
    n = wait_workers(run, 4) -- the two tasks started after catching it
    assert.are.equal("again", n.lines[7]) -- (after main, 2 workers, 2 threads, waiting)
    luapool.sleep(0.1)
    os.execute("kill -INT " .. n.main)
    local status, out = wait_end(run)
    assert.are.equal(130, status)
    assert.matches("^false\tinterrupted\tthe script received SIGINT\n", out)
    assert.matches("\n42\t42\n$", out)
    assert_all_dead(read_notes(run))
  end)
end)

-- }======

describe("Ctrl-C while tasks wait on nested pools of their own", function()
  -- A task's own wait (on a pool it created) took the signal meant for the
  -- script: the main state only saw its task interrupted.
  it("is delivered to the script's main state, not to a task's wait", function()
    local out, err, code = h.run({ "-e", [[
      local pool <close> = threadpool.new { max_workers = 2 }
      local function task()
        local t_end = luapool.now() + 5
        while luapool.now() < t_end do
          local inner <close> = threadpool.new { max_workers = 2 }
          local fs = {}
          for i = 1, 4 do fs[i] = inner:submit(function(x) luapool.sleep(0.002) return x end, i) end
          for _, f in ipairs(fs) do f:result() end
        end
        return "finished"
      end
      local fs = { pool:submit(task), pool:submit(task) }
      os.execute(("(sleep 0.5; kill -INT %d) &"):format(luapool.current_worker().pid))
      local ok, e = pcall(function() for _, f in ipairs(fs) do f:result() end end)
      print(ok, e.kind, e.message)]] })
    assert.are.equal(0, code, err)
    assert.are.equal("false\tinterrupted\tthe script received SIGINT\n", out)
  end)
end)

