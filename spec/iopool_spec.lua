-- The iopool engine: Lua tasks as coroutines of an event loop thread,
-- fetch_length tasks native on its curl multi handle, against the nginx
-- fixture.  (The futures API itself is the conformance suite's: iopool is
-- in helper.engines.)
local luapool = require "luapool"
local h = require "helper"

local iopool = luapool.iopool

-- This process's connections to the fixture that are still open on our side
-- (nginx notices a closed one only when its slow reply is due: ss sees it).
local function open_conns(srv)
  local f = io.popen(("ss -Htn state established '( dport = :%d )' | wc -l"):format(srv.port))
  local n = tonumber(f:read("a"))
  f:close()
  return n
end

describe("iopool", function()
  local srv
  setup(function() srv = h.fixture() end)
  teardown(function() if srv then srv:stop() end end)

  describe("options", function()
    it("has one loop and 1000 tasks in flight by default, and refuses what it does not know", function()
      local p <close> = iopool.new {}
      assert.are.equal(1, p.max_workers)
      assert.are.equal("iopool", p.kind)
      assert.is_false(p.chunking)
      assert.are.equal("unknown option 'bogus' to 'new'", h.error_of(iopool.new, { bogus = 1 }))
      assert.are.equal("bad option 'concurrency' to 'new' (integer from 1 to 1000000 expected, got 0)",
        h.error_of(iopool.new, { concurrency = 0 }))
      assert.are.equal("bad option 'per_host' to 'new' (integer from 0 to 1000000 expected, got -1)",
        h.error_of(iopool.new, { per_host = -1 }))
      assert.are.equal("bad option 'on_crash' to 'new' (a processpool/mpipool option: an event loop runs "
        .. "many tasks on one thread)", h.error_of(iopool.new, { on_crash = "break" }))
    end)
  end)

  describe("Lua tasks", function()
    it("run as coroutines of the loop: current_worker, shared loop globals, stats", function()
      local p <close> = iopool.new { max_workers = 2, name = "lp" }
      local w = p:submit(function() return luapool.current_worker() end):result(10)
      assert.are.equal("io", w.kind)
      assert.matches("^lp%-[12]$", w.name)
      assert.is_true(w.index == 1 or w.index == 2)
      assert.are.equal(tonumber(h.slurp("/proc/self/stat"):match("^(%d+)")), w.pid)
      -- (the loop counts itself idle just after it settled the future)
      h.wait_until(function() return p:stats().idle == 1 end, "the loop to be idle")
      assert.are.equal(1, p:stats().workers)
    end)

    it("honour concurrency: never more tasks in flight than it says", function()
      local p <close> = iopool.new { concurrency = 7 }
      -- the tasks of one loop share its state: a global counts them
      local r = p:map(function()
        local G = _G
        G.INFLIGHT = (G.INFLIGHT or 0) + 1
        G.PEAK = math.max(G.PEAK or 0, G.INFLIGHT)
        luapool.sleep(0.05)
        G.INFLIGHT = G.INFLIGHT - 1
        return G.PEAK
      end, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21 })
      local peak = 0
      for _, v in ipairs(r) do peak = math.max(peak, v) end
      assert.are.equal(7, peak)
    end)

    it("runs 2,000 tasks of two requests and a sleep each at once on one loop, results exact", function()
      local p <close> = iopool.new { concurrency = 2000 }
      local t0 = luapool.now()
      local fs = {}
      for i = 1, 2000 do
        fs[i] = p:submit(function(base, k)
          local a = assert(luapool.http.request { url = base .. "/sleep?s=0.3" })
          luapool.sleep(0.2)
          local b = assert(luapool.http.get(base .. "/bytes?n=" .. k))
          return a.status, a.body, #b.body
        end, srv.base, i)
      end
      for i = 1, 2000 do
        assert.are.same({ 200, "ok\n", i }, { fs[i]:result(60) })
      end
      -- one thread per task would take 2,000 threads; a loop does it in about
      -- 1.2 s (bound generously: a loaded machine, or a sanitizer, must pass)
      local bound = os.getenv("LUAPOOL_SANITIZER") and 120 or 10
      assert.is_true(luapool.now() - t0 < bound, "took " .. (luapool.now() - t0))
    end)

    it("yield in fetch_length called from Lua; block in a coroutine the task made itself", function()
      local p <close> = iopool.new {}
      local t0 = luapool.now()
      local fs = {}
      for i = 1, 200 do
        fs[i] = p:submit(function(url) return luapool.kernels.fetch_length(url) end, srv:url("/sleep?s=0.5"))
      end
      for i = 1, 200 do assert.are.same({ 3, 200 }, { fs[i]:result(60) }) end
      -- one after the other they would take 100 s
      assert.is_true(luapool.now() - t0 < 20, "took " .. (luapool.now() - t0))
      -- a coroutine of the task's own cannot give the loop its wait: it blocks, and works
      assert.are.same({ 200, 9, 9, 200 }, { p:submit(function(url)
        local r = coroutine.wrap(function() return luapool.http.get(url) end)()
        local n, status = coroutine.wrap(function() return luapool.kernels.fetch_length(url) end)()
        return r.status, #r.body, n, status
      end, srv:url("/bytes?n=9")):result(30) })
    end)

    it("load libcurl at the loop's first request, not at a task that makes none", function()
      local script = h.tempfile(([[
        local luapool = require "luapool"
        local function curl_loaded()
          for line in io.lines("/proc/self/maps") do
            if line:find("libcurl", 1, true) then return true end
          end
          return false
        end
        local p <close> = luapool.iopool.new {}
        print(p:submit(function() luapool.sleep(0.01) return 1 end):result(10), curl_loaded())
        print(p:submit(function(u) return luapool.kernels.fetch_length(u) end, %q):result(10))
        print(curl_loaded())
      ]]):format(srv:url("/bytes?n=6")))
      local out, err, code = h.run { script }
      os.remove(script)
      assert.are.same({ "1\tfalse\n6\t200\ntrue\n", "", 0 }, { out, err, code })
    end)

    it("report a task error with its traceback", function()
      local p <close> = iopool.new {}
      local e = p:submit(function()
        luapool.sleep(0.01)
        local t = nil
        return t.field
      end):exception(10)
      assert.are.equal("task", e.kind)
      assert.matches("attempt to index a nil value %(local 't'%)$", e.message)
      assert.matches("in function <[^>]*iopool_spec%.lua:%d+>", e.traceback)
    end)

    it("say so when they wait where a coroutine cannot yield", function()
      local p <close> = iopool.new {}
      local e = p:submit(function()
        table.sort({ 3, 1, 2 }, function(a, b) luapool.sleep(0.01) return a < b end)
      end):exception(10)
      assert.matches(": luapool%.sleep: cannot yield here %(inside a metamethod or a C function such " ..
        "as table%.sort's comparator%); call it from the task's own code$", e.message)
      e = p:submit(function(url)
        return tostring(setmetatable({}, { __tostring = function() return luapool.http.get(url).body end }))
      end, srv:url("/")):exception(10)
      assert.matches(": luapool%.http%.get: cannot yield here %(inside a metamethod", e.message)
      -- the loop goes on
      assert.are.equal(42, p:submit(function() luapool.sleep(0.01) return 42 end):result(10))
    end)

    it("let coroutine.yield in the task's own code hand the loop to the others", function()
      local p <close> = iopool.new {}
      assert.are.equal(3, p:submit(function()
        local n = 0
        for _ = 1, 3 do coroutine.yield() n = n + 1 end
        return n
      end):result(10))
    end)
  end)

  describe("native tasks", function()
    it("run the initializer first: a failing one breaks the pool for them as for a Lua task", function()
      local p <close> = iopool.new { name = "ib", initializer = function() error("init boom", 0) end }
      local e = p:submit(luapool.kernels.fetch_length, srv:url("/bytes?n=5")):exception(10)
      assert.are.equal("broken", e.kind)
      assert.are.equal("the initializer failed in worker ib-1: init boom", e.message)
      e = p:submit(function() return "x" end):exception(10)
      assert.are.equal("broken", e.kind)
      assert.are.equal("the initializer failed in worker ib-1: init boom", e.message)
      -- a good one ran once, before the loop's first task (a native one)
      local q <close> = iopool.new { initializer = function()
        local G = _G
        G.INIT_AT, G.INITS = luapool.now(), (G.INITS or 0) + 1
      end }
      assert.are.same({ 5, 200 }, { q:submit(luapool.kernels.fetch_length, srv:url("/bytes?n=5")):result(10) })
      local answered = luapool.now()
      local at, n = q:submit(function() return _G.INIT_AT, _G.INITS end):result(10)
      assert.are.equal(1, n)
      assert.is_true(at < answered, "the initializer ran after the native task")
    end)

    it("refuse a fetch_length call with an argument past the URL and timeout, at once", function()
      local p <close> = iopool.new { name = "xa" }
      local msg = "bad argument #3 to 'fetch_length' (no value expected: it takes a URL and an optional timeout)"
      -- (run inline, the 30 s transfer would block the loop: result(15) would time out)
      local e = p:submit(luapool.kernels.fetch_length, srv:url("/sleep?s=30"), 5, "extra"):exception(15)
      assert.are.equal("task", e.kind)
      assert.are.equal(msg, e.message)
      e = p:submit(luapool.kernels.fetch_length, srv:url("/sleep?s=30"), nil, {}):exception(15)
      assert.are.equal(msg, e.message)
      -- a trailing nil is no argument; in a chunk, the call alone fails
      assert.are.same({ 3, 200 }, { p:submit(luapool.kernels.fetch_length, srv:url("/bytes?n=3"), 5, nil):result(10) })
      -- (its timeout still counts, and is still checked first)
      e = p:submit(luapool.kernels.fetch_length, srv:url("/sleep?s=30"), 0.2, nil):exception(15)
      assert.matches("^fetch_length: .*: Timeout was reached %(Operation timed out after %d+ milliseconds", e.message)
      e = p:submit(luapool.kernels.fetch_length, srv:url("/bytes?n=3"), -1, "extra"):exception(15)
      assert.are.equal("bad argument #2 to 'fetch_length' (positive number expected, got -1)", e.message)
      local ok, err = pcall(p.starmap, p, luapool.kernels.fetch_length,
        { { srv:url("/bytes?n=4") }, { srv:url("/sleep?s=30"), 1, nil, 2 } }, { chunksize = 2 })
      assert.is_false(ok)
      assert.are.equal((msg:gsub("#3", "#4")), err.message)
      assert.are.equal(4, p:submit(luapool.kernels.fetch_length, srv:url("/bytes?n=4")):result(10))
    end)
  end)

  describe("cancel and deadlines", function()
    it("cancel aborts a running task's request: true, cancelled, the server sees it go", function()
      local p <close> = iopool.new {}
      local base = open_conns(srv)
      local f = p:submit(function(url) return luapool.http.get(url) end, srv:url("/sleep?s=20"))
      h.wait_until(function() return open_conns(srv) > base end, "the request to reach the server")
      assert.is_true(f:cancel())
      assert.is_true(f:cancelled())
      assert.are.equal("cancelled", f:exception(10).kind)
      h.wait_until(function() return open_conns(srv) <= base end, "the connection to be closed", 5)
      assert.are.equal("ok", p:submit(function() return "ok" end):result(10))
    end)

    it("cancel aborts a native fetch_length task", function()
      local p <close> = iopool.new {}
      local base = open_conns(srv)
      local f = p:submit(luapool.kernels.fetch_length, srv:url("/sleep?s=20"))
      h.wait_until(function() return open_conns(srv) > base end, "the request to reach the server")
      assert.is_true(f:cancel())
      assert.are.equal("cancelled", f:exception(10).kind)
      h.wait_until(function() return open_conns(srv) <= base end, "the connection to be closed", 5)
    end)

    it("a deadline aborts the transfer (kind timeout), native or in a coroutine", function()
      local p <close> = iopool.new { task_timeout = 0.5, name = "dl" }
      local t0 = luapool.now()
      local e = p:submit(function(url) return luapool.http.get(url) end, srv:url("/sleep?s=20")):exception(30)
      assert.are.equal("timeout", e.kind)
      assert.are.equal("task #1 exceeded its deadline of 0.5 seconds in worker dl-1", e.message)
      e = select(2, pcall(p.map, p, luapool.kernels.fetch_length, { srv:url("/sleep?s=20") }))
      assert.are.equal("timeout", e.kind)
      assert.are.equal("item #1 exceeded its deadline of 0.5 seconds in worker dl-1", e.message)
      e = p:submit(function() luapool.sleep(20) end):exception(30)
      -- (map's items are numbered apart from submits)
      assert.are.equal("task #2 exceeded its deadline of 0.5 seconds in worker dl-1", e.message)
      assert.is_true(luapool.now() - t0 < 15)
    end)

    it("a deadline or timeout ends a request waiting for a per_host slot, with the in-flight messages", function()
      local p <close> = iopool.new { per_host = 1, name = "qd" }
      local base = open_conns(srv)
      local slow = p:submit(luapool.kernels.fetch_length, srv:url("/sleep?s=30"))
      h.wait_until(function() return open_conns(srv) > base end, "the slow request to hold the slot")
      local url = srv:url("/bytes?n=1")
      local timed_out = "Timeout was reached %(Operation timed out after %d+ milliseconds with 0 bytes received%)$"
      -- (each waits behind the 30 s request: exception(15) raises unless its own 0.5 s ended it)
      local ok, e = pcall(p.map, p, luapool.kernels.fetch_length, { url }, { task_timeout = 0.5 })
      assert.is_false(ok)
      assert.are.equal("timeout", e.kind)
      assert.are.equal("item #1 exceeded its deadline of 0.5 seconds in worker qd-1", e.message)
      e = p:submit(luapool.kernels.fetch_length, url, 0.5):exception(15)
      assert.are.equal("task", e.kind)
      assert.matches("^fetch_length: " .. url:gsub("%p", "%%%0") .. ": " .. timed_out, e.message)
      e = p:submit(function(u) return luapool.kernels.fetch_length(u, 0.5) end, url):exception(15)
      assert.matches("^fetch_length: " .. url:gsub("%p", "%%%0") .. ": " .. timed_out, e.message)
      local r, m = p:submit(function(u) return luapool.http.request { url = u, timeout = 0.5 } end, url):result(15)
      assert.is_nil(r)
      assert.matches("^GET " .. url:gsub("%p", "%%%0") .. ": " .. timed_out, m)
      -- cancel still ends a queued request; the slow one still holds its slot
      local f = p:submit(function(u) return luapool.http.get(u) end, url)
      h.wait_until(function() return f:running() end, "the task to run")
      assert.is_true(f:cancel())
      assert.are.equal("cancelled", f:exception(10).kind)
      assert.is_false(slow:done())
      assert.is_true(slow:cancel())
    end)

    it("task_timeout stops a coroutine that hogs the loop, even through pcall", function()
      local p <close> = iopool.new { name = "hog" }
      -- (no deadline of its own: the hog holds up its wake-up, not its end)
      local other = p:submit(function() luapool.sleep(0.1) return "other" end)
      local ok, e = pcall(p.map, p, function()
        while true do pcall(function() for _ = 1, 1e6 do end end) end
      end, { 1 }, { task_timeout = 0.3 })
      assert.is_false(ok)
      assert.are.equal("timeout", e.kind)
      assert.are.equal("item #1 exceeded its deadline of 0.3 seconds in worker hog-1", e.message)
      assert.are.equal("other", other:result(30))
      assert.are.equal(7, p:submit(function() return 7 end):result(10))
    end)
  end)

  describe("scripts/io.lua --pool iopool", function()
    it("fetches every URL on one loop and prints the lengths in input order", function()
      local out, err, code = h.run({ h.source_dir .. "/scripts/io.lua", "--pool", "iopool", "--concurrency", "2",
        srv:url("/bytes?n=3"), srv:url("/bytes?n=5"), srv:url("/bytes?n=7") })
      assert.are.equal("", err)
      assert.are.equal(0, code)
      for _, n in ipairs { 3, 5, 7 } do
        assert.matches("Fetching " .. srv:url("/bytes?n=" .. n):gsub("%p", "%%%0") .. " in loop io%-1\n", out)
      end
      assert.matches("\niopool execution time: [%d.]+ seconds\n" ..
        srv:url("/bytes?n=3"):gsub("%p", "%%%0") .. ": 3\n" ..
        srv:url("/bytes?n=5"):gsub("%p", "%%%0") .. ": 5\n" ..
        srv:url("/bytes?n=7"):gsub("%p", "%%%0") .. ": 7\n$", out)
      local _, uerr, ucode = h.run({ h.source_dir .. "/scripts/io.lua", "--concurrency", "2", srv:url("/") })
      assert.are.equal(2, ucode)
      assert.matches("^io.lua: %-%-concurrency is for %-%-pool iopool\n", uerr)
    end)
  end)

  describe("scale and shutdown", function()
    it("shutdown waits for the requests in flight", function()
      local p = iopool.new { concurrency = 100 }
      local fs = {}
      for i = 1, 50 do
        fs[i] = p:submit(function(url, k) return luapool.http.get(url).status + k end, srv:url("/sleep?s=0.3"), i)
      end
      p:shutdown()
      for i = 1, 50 do
        assert.is_true(fs[i]:done())
        assert.are.equal(200 + i, fs[i]:result(0))
      end
    end)

    it("shutdown with cancel_running cancels the tasks in flight too, a hog included", function()
      local p = iopool.new { concurrency = 3 }
      local req = p:submit(function(url) return luapool.http.get(url).status end, srv:url("/sleep?s=30"))
      local slp = p:submit(function() luapool.sleep(30) return 1 end)
      -- (calls in the loop: the hook then meets call events before a count event, which
      -- once let a cancelled hog run on; a table each turn: under TSan a signal is
      -- delivered only at an intercepted call, here malloc, and a loop of pure
      -- arithmetic in liblua makes none, so the stop signal never landed)
      local hog = p:submit(function() local x = 0 while true do x = x + math.abs(-1) + #{} end end)
      local queued = p:submit(function() return "never" end)
      h.wait_until(function() return p:stats().running == 3 end, "three tasks in flight")
      local t0 = luapool.now()
      p:shutdown { cancel_running = true }
      assert.is_true(luapool.now() - t0 < 10, "shutdown waited for the tasks in flight") -- (they take 30 s)
      for _, f in ipairs { req, slp, hog, queued } do assert.is_true(f:cancelled()) end
      assert.are.same({ pending = 0, running = 0, done = 0, failed = 0, cancelled = 4 },
        { pending = p:stats().pending, running = p:stats().running, done = p:stats().done,
          failed = p:stats().failed, cancelled = p:stats().cancelled })
    end)

    -- (both run to their end on the loop thread itself, where no pass of
    -- the loop sees the cancel: before, the shutdown waited them out)
    for _, case in ipairs {
      { "an initializer", { initializer = function() luapool.sleep(30) end }, function() return "ran" end },
      { "a busy initializer", { initializer = function()
        local t = luapool.now()
        while luapool.now() - t < 30 do end
      end }, function() return "ran" end },
      { "a kernel", {}, luapool.kernels.sum_squares, 1 << 40 },
    } do
      it("shutdown with cancel_running cancels " .. case[1] .. " running on the loop itself", function()
        local p = iopool.new(case[2])
        local f = p:submit(case[3], case[4])
        local queued = p:submit(function() return "never" end)
        h.wait_until(function() return f:running() end, "the task to run")
        local t0 = luapool.now()
        p:shutdown { cancel_running = true }
        assert.is_true(luapool.now() - t0 < 10, "shutdown waited for the run") -- (30 s, hours)
        assert.are.equal("cancelled\tthe task was cancelled", f:exception().kind .. "\t" .. f:exception().message)
        assert.is_true(queued:cancelled())
        assert.are.same({ running = 0, failed = 0, cancelled = 2, broken = nil },
          { running = p:stats().running, failed = p:stats().failed, cancelled = p:stats().cancelled,
            broken = p.broken })
      end)
    end

    -- f:cancel() of a task run on the loop thread itself: it returned true
    -- and the kernel ran on, holding the loop and every later task for its
    -- whole time (helper-51's suspicion: 102 s for sum_squares(1 << 36)).
    -- An initializer the cancel stops runs again for the next task.
    -- luacheck: globals RUNS
    for _, case in ipairs {
      { "a kernel", {}, luapool.kernels.sum_squares, 1 << 40 },
      { "the initializer it waits for", { initializer = function()
        RUNS = (RUNS or 0) + 1
        if RUNS == 1 then local t = luapool.now() while luapool.now() - t < 60 do end end
      end }, function() return "ran" end },
    } do
      it("f:cancel() stops " .. case[1] .. " running on the loop itself", function()
        local p <close> = iopool.new(case[2])
        local f = p:submit(case[3], case[4])
        h.wait_until(function() return f:running() end, "the task to run")
        assert.is_true(f:cancel())
        assert.are.equal("cancelled\tthe task was cancelled", f:exception().kind .. "\t" .. f:exception().message)
        -- the loop is free again: the next task runs at once (its limit is far
        -- below the run's 60 s, hours for the kernel)
        assert.are.equal(case[2].initializer and 2 or 7,
          p:submit(function() return RUNS or 7 end):result(20))
        assert.are.same({ running = 0, failed = 0, cancelled = 1, done = 1, broken = nil },
          { running = p:stats().running, failed = p:stats().failed, cancelled = p:stats().cancelled,
            done = p:stats().done, broken = p.broken })
      end)
    end

    it("cancel_running is refused by pools that cannot cancel a running task", function()
      for _, kind in ipairs { "threadpool", "processpool" } do
        local p <close> = luapool[kind].new { max_workers = 1 }
        assert.are.equal(("bad option 'cancel_running' to 'shutdown' (a %s cannot cancel a running task)")
          :format(kind), h.error_of(p.shutdown, p, { cancel_running = true }))
      end
    end)

    it("honours per_host: ten connections for forty slow URLs take four rounds", function()
      local p <close> = iopool.new { per_host = 10 }
      local urls = {}
      for i = 1, 40 do urls[i] = srv:url("/sleep?s=0.3") end
      local t0 = luapool.now()
      local r = p:map(luapool.kernels.fetch_length, urls)
      assert.are.equal(40, #r)
      assert.is_true(luapool.now() - t0 >= 1.15, "took " .. (luapool.now() - t0))
    end)

    it("honours per_host and max_connections across loops: never over, fully used, wherever tasks land", function()
      -- (a fixture of its own: a cancelled slow request of another test stays "Writing" in
      -- nginx until its reply is due)
      local own <close> = h.fixture()
      local function writing()
        local r = assert(luapool.http.get(own:url("/nginx_status")))
        return tonumber(r.body:match("Writing: (%d+)")) - 1 -- (this request is one)
      end
      -- the most requests the server saw at once while 12 x 0.5 s ran, and how long they took
      local function peak_of(opts, fn)
        local p <close> = iopool.new(opts)
        local fs, peak, t0 = {}, 0, luapool.now()
        for i = 1, 12 do fs[i] = p:submit(fn, own:url("/sleep?s=0.5")) end
        local done
        repeat
          peak = math.max(peak, writing())
          done = true
          for i = 1, 12 do done = done and fs[i]:done() end
          if not done then luapool.sleep(0.02) end
        until done
        for i = 1, 12 do assert.are.equal(3, (fs[i]:result(0))) end
        return peak, luapool.now() - t0
      end
      local function lua_get(u) return #assert(luapool.http.get(u)).body end
      -- (concurrency 12 on two loops: each takes 6 at most, so both have tasks; without it they
      -- may all land on one)
      for _, case in ipairs {
        { "per_host, Lua tasks, both loops", { per_host = 3, max_workers = 2, concurrency = 12 }, lua_get },
        { "per_host, native", { per_host = 3, max_workers = 2 }, luapool.kernels.fetch_length },
        { "max_connections, native, both loops", { max_connections = 3, max_workers = 2, concurrency = 12 },
          luapool.kernels.fetch_length },
        { "max_connections, Lua tasks", { max_connections = 3, max_workers = 2 }, lua_get },
        { "per_host, one loop", { per_host = 3 }, luapool.kernels.fetch_length },
      } do
        local peak, took = peak_of(case[2], case[3])
        -- three at once at most (so four rounds: 2 s at least), and all three used
        assert.are.equal(3, peak, case[1])
        assert.is_true(took >= 1.9, ("%s: took %.2f s"):format(case[1], took))
      end
    end)

    it("counts a host's connections as one however its URLs spell it (per_host = 1: three rounds)", function()
      local p <close> = iopool.new { per_host = 1 }
      local u = srv:url("/sleep?s=0.3")
      local urls = { u, (u:gsub("^http:", "HTTP:")), (u:gsub("/sleep", "/sleep/../sleep")) }
      local t0 = luapool.now()
      assert.are.same({ 3, 3, 3 }, p:map(luapool.kernels.fetch_length, urls))
      assert.is_true(luapool.now() - t0 >= 0.85, "took " .. (luapool.now() - t0))
    end)

    it("sends each request of a Lua task as asked, on handles earlier requests used", function()
      local p <close> = iopool.new { concurrency = 1 }
      local got = p:submit(function(u)
        local out = {}
        local function hdrs(opts)
          opts.url = u
          local r = assert(luapool.http.request(opts))
          out[#out + 1] = r.body:match("^(%u+) ") .. (r.body:find("X-A", 1, true) and "+A" or "")
            .. (r.body:find("Content-Length", 1, true) and "+L" or "")
        end
        hdrs { method = "POST", body = "abc", headers = { ["X-A"] = "1" } }
        hdrs {}
        hdrs { headers = { ["X-A"] = "2" } }
        hdrs { connect_timeout = 3 }
        hdrs {}
        return table.concat(out, " ")
      end, srv:url("/headers")):result(30)
      assert.are.equal("POST+A+L GET GET+A GET GET", got)
      -- native tasks after it, on the same loop
      assert.are.same({ 10, 10 }, p:map(luapool.kernels.fetch_length,
        { srv:url("/redirect"), srv:url("/bytes?n=10") }))
    end)

    it("ends at once on Ctrl-C with requests in flight: exit 130, every transfer aborted", function()
      local ready, rc = os.tmpname(), os.tmpname()
      os.remove(ready)
      os.remove(rc)
      local script = h.tempfile(([[
        local luapool = require "luapool"
        local p <close> = luapool.iopool.new { max_workers = 2 }
        local fs = {}
        for i = 1, 200 do
          fs[i] = p:submit(function(url) return luapool.http.get(url) end, %q)
        end
        fs[201] = p:submit(luapool.kernels.fetch_length, %q)
        while p:stats().running < 201 do luapool.sleep(0.01) end
        luapool.sleep(0.2) -- (the requests reach the server)
        io.open(%q, "w"):close()
        fs[1]:result()
      ]]):format(srv:url("/sleep?s=30"), srv:url("/sleep?s=30"), ready))
      local err = os.tmpname()
      local inner = ("%s %s 2>%s </dev/null >/dev/null & echo $! >%s.pid; wait $!; echo $? >%s")
        :format(h.bin, script, err, rc, rc)
      assert(os.execute("sh -c " .. h.shell_quote(inner) .. " >/dev/null 2>&1 &"))
      h.wait_until(function() return h.slurp(ready) ~= nil end, "the requests to be in flight", 30)
      local t0 = luapool.now()
      assert(os.execute("kill -INT " .. tonumber(h.slurp(rc .. ".pid"))))
      h.wait_until(function() return h.slurp(rc) ~= nil end, "luapool to exit", 20)
      local took = luapool.now() - t0
      local code, msg = tonumber(h.slurp(rc)), h.slurp(err)
      for _, f in ipairs { ready, rc, rc .. ".pid", script, err } do os.remove(f) end
      assert.are.equal(130, code)
      assert.matches("interrupted", msg)
      assert.is_true(took < 5, "took " .. took)
      h.wait_until(function() return open_conns(srv) == 0 end, "its connections to be closed", 5)
    end)

    it("keeps 10,000 requests in flight from two loops, losing and duplicating none", function()
      -- (1,000 under a sanitizer: 10,000 connections outlast the test's
      -- timeout there, and the count changes nothing in what is checked)
      local n = os.getenv("LUAPOOL_SANITIZER") and 1000 or 10000
      local script = h.tempfile(([[
        local luapool = require "luapool"
        local n = %d
        local p <close> = luapool.iopool.new { max_workers = 2, concurrency = n }
        local fs = {}
        for i = 1, n do
          fs[i] = p:submit(function(url, k)
            local r = assert(luapool.http.get(url))
            return k, r.status, luapool.current_worker().index
          end, %q, i)
        end
        local seen, loops = {}, {}
        for i = 1, n do
          local k, status, loop = fs[i]:result(120)
          assert(k == i and status == 200 and not seen[k], "item " .. i)
          seen[k] = true
          loops[loop] = (loops[loop] or 0) + 1
        end
        print(#seen, loops[1] > 0 and loops[2] > 0)
      ]]):format(n, srv:url("/sleep?s=1")))
      -- each request is a socket: raise the soft descriptor limit to the hard one
      local out = io.popen("ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; " .. h.shell_quote(h.bin) .. " "
        .. h.shell_quote(script) .. " 2>&1"):read("a")
      os.remove(script)
      assert.are.equal(n .. "\ttrue\n", out)
    end)
  end)
end)
