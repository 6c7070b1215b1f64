-- Thread and process pools: futures, map/starmap, errors, cancellation,
-- shutdown, workers, and the messages of bad input.
local luapool = require "luapool"
local helper = require "helper"
local error_of, result_error = helper.error_of, helper.result_error
local function wait_until(pred, what) return helper.wait_until(pred, what, 30) end

local SRC = debug.getinfo(1, "S").short_src
local MAIN_PID = tonumber(helper.slurp("/proc/self/stat"):match("^(%d+)"))

local function line_of(fn) return debug.getinfo(fn, "S").linedefined end

local function ident(...) return ... end

for _, kind in ipairs(helper.engines) do
  local worker_kind = helper.worker_kinds[kind]

  describe(kind, function()
    local pool
    lazy_setup(function() pool = luapool[kind].new { max_workers = 2, name = "io" } end)
    lazy_teardown(function() pool:shutdown() end)

    describe("pool", function()
      it("tells its kind, name and size", function()
        assert.are.equal(kind, pool.kind)
        assert.are.equal("io", pool.name)
        assert.are.equal(2, pool.max_workers)
        local opts = helper.sized(kind, { max_workers = 3 }) -- (an mpipool: fewer ranks, more slots)
        local p <close> = luapool[kind].new(opts)
        assert.are.equal(kind, p.name)
        assert.are.equal(opts.max_workers, p.max_workers)
        assert.are.equal(kind .. "-1", p:submit(function() return luapool.current_worker().name end):result(30))
      end)
    end)

    describe("submit and result", function()
      it("returns every value the task returned", function()
        local f = pool:submit(function(a, b) return a + b, a .. b, nil, { a, b } end, 2, 3)
        local r = table.pack(f:result(30))
        assert.are.equal(4, r.n)
        assert.are.equal(5, r[1])
        assert.are.equal("23", r[2])
        assert.is_nil(r[3])
        assert.are.same({ 2, 3 }, r[4])
        -- result() again gives the same values
        assert.are.equal(5, (f:result()))
        assert.are.equal(0, select("#", pool:submit(function() end):result(30)))
      end)

      it("tells done() false while running, then true", function()
        local f = pool:submit(function() luapool.sleep(0.3) return "slept" end)
        assert.is_false(f:done())
        assert.is_false(f:cancelled())
        wait_until(function() return f:running() end, "the task to run")
        assert.is_false(f:done())
        assert.are.equal("slept", f:result(30))
        assert.is_true(f:done())
        assert.is_false(f:running())
        assert.is_false(f:cancelled())
      end)

      it("raises a timeout error object when the task is not done in time", function()
        local f = pool:submit(function() luapool.sleep(0.5) return 1 end)
        local e = result_error(f, 0.05)
        assert.are.equal("timeout", e.kind)
        assert.are.equal("no result after 0.05 seconds", e.message)
        assert.are.equal("timeout: no result after 0.05 seconds", tostring(e))
        assert.is_nil(e.worker)
        local ok, e2 = pcall(f.exception, f, 0.05)
        assert.is_false(ok)
        assert.are.equal("timeout", e2.kind)
        assert.are.equal(1, f:result(30)) -- the task was not disturbed
      end)

      -- as as_completed, wait and map refuse theirs, the value shown; it said
      -- "(timeout must be a non-negative number)" and took "1" (helper-52)
      it("refuses a negative, NaN or string timeout", function()
        local f = pool:submit(function() return 1 end)
        assert.are.equal("bad argument #1 to 'result' (non-negative number expected, got -1)",
          error_of(function() return f:result(-1) end))
        assert.are.equal("bad argument #1 to 'result' (non-negative number expected, got " .. tostring(0 / 0) .. ")",
          error_of(function() return f:result(0 / 0) end))
        assert.are.equal("bad argument #1 to 'exception' (non-negative number expected, got -0.5)",
          error_of(function() return f:exception(-0.5) end))
        assert.are.equal("bad argument #1 to 'exception' (non-negative number expected, got " ..
          tostring(0 / 0) .. ")", error_of(function() return f:exception(0 / 0) end))
        assert.are.equal("bad argument #1 to 'result' (non-negative number expected, got string)",
          error_of(function() return f:result("1") end))
        assert.are.equal(1, f:result(30))
      end)

      -- %g, as as_completed's and map's timeouts print: it said "no result
      -- after 0.0 seconds" (%f) where they say "after 0 seconds" (helper-52)
      it("prints its timeout as as_completed and map print theirs", function()
        local f = pool:submit(function() luapool.sleep(0.5) return 1 end)
        for _, t in ipairs { 0, 0.0, 1e-3, 0.05, 1 / 64 } do
          assert.are.equal(("no result after %g seconds"):format(t), result_error(f, t).message)
          local ok, e = pcall(function() for _ in luapool.as_completed({ f }, t) do end end)
          assert.is_false(ok)
          assert.are.equal(("1 (of 1) futures unfinished after %g seconds"):format(t), e.message)
        end
        assert.are.equal("no result after 0 seconds", result_error(f, 0).message)
        assert.are.equal("no result after 0.001 seconds", result_error(f, 1e-3).message)
        assert.are.equal(1, f:result(30))
      end)
    end)

    describe("task errors", function()
      it("gives nil from exception() on success", function()
        local f = pool:submit(function() return 1 end)
        assert.is_nil(f:exception(30))
      end)

      it("gives an error object for a string error", function()
        local function boom() error("boom") end
        local where = SRC .. ":" .. line_of(boom) .. ":"
        local f = pool:submit(boom)
        local e = f:exception(30)
        assert.are.equal("table", type(e))
        assert.are.equal("task", e.kind)
        assert.are.equal(where .. " boom", e.value)
        assert.are.equal(where .. " boom", e.message)
        assert.matches(helper.worker_pattern(kind, "io"), e.worker)
        assert.are.equal("string", type(e.traceback))
        assert.truthy(e.traceback:find(where, 1, true), e.traceback)
        assert.are.equal("task failed in worker " .. e.worker .. ": " .. where .. " boom\nworker " .. e.traceback,
          tostring(e))
        local prefix = "task failed in worker " .. e.worker .. ": " .. where .. " boom\nworker stack traceback:\n"
        assert.are.equal(prefix, tostring(e):sub(1, #prefix))
        -- result() raises the same error object
        local e2 = result_error(f, 30)
        assert.are.equal("task", e2.kind)
        assert.are.equal(where .. " boom", e2.value)
        assert.are.equal(e.worker, e2.worker)
      end)

      it("keeps a table error value with its fields", function()
        local f = pool:submit(function() error({ code = 7, why = { "nested" } }) end)
        local e = result_error(f, 30)
        assert.are.equal("task", e.kind)
        assert.are.equal(7, e.value.code)
        assert.are.equal("nested", e.value.why[1])
        assert.matches("^table: ", e.message)
        assert.matches(helper.worker_pattern(kind, "io"), e.worker)
      end)

      it("keeps an error raised without position", function()
        local e = result_error(pool:submit(function() error("plain", 0) end), 30)
        assert.are.equal("plain", e.value)
        assert.are.equal("plain", e.message)
        assert.are.equal("task failed in worker " .. e.worker .. ": plain\nworker " .. e.traceback, tostring(e))
      end)

      it("reports runtime errors of the task", function()
        local function bad() local t = nil; return t.x end
        local e = result_error(pool:submit(bad), 30)
        assert.are.equal(SRC .. ":" .. line_of(bad) .. ": attempt to index a nil value (local 't')", e.value)
      end)

      it("keeps the pool working after an error", function()
        result_error(pool:submit(error, "x"), 30)
        assert.are.equal(3, pool:submit(function() return 3 end):result(30))
      end)
    end)

    describe("map and starmap", function()
      it("gives results in input order whatever the durations", function()
        local r = pool:map(function(x)
          luapool.sleep((6 - x) * 0.02)
          return x * 10
        end, { 1, 2, 3, 4, 5 })
        assert.are.same({ 10, 20, 30, 40, 50 }, r)
      end)

      it("keeps only the first return value of each call", function()
        assert.are.same({ 1, 4, 9 }, pool:map(function(x) return x * x, "extra" end, { 1, 2, 3 }))
      end)

      it("gives the same results with chunk sizes 1, 3 and 1000", function()
        local items, expect = {}, {}
        for i = 1, 50 do
          items[i] = i
          expect[i] = i * i + 1
        end
        for _, cs in ipairs { 1, 3, 1000 } do
          local r = pool:map(function(x) return x * x + 1 end, items, { chunksize = cs })
          assert.are.same(expect, r)
        end
        assert.are.same({ 2, 5, 10, 17 }, pool:map(function(x) return x * x + 1 end, { 1, 2, 3, 4 }, { chunksize = 3 }))
      end)

      it("gives an empty table for no items", function()
        local r = pool:map(ident, {})
        assert.are.equal("table", type(r))
        assert.is_nil(next(r))
        assert.is_nil(next(pool:starmap(ident, {})))
      end)

      it("leaves nil holes where a call returned nothing", function()
        local r = pool:map(function(x) if x % 2 == 0 then return x end end, { 1, 2, 3, 4, 5, 6 }, { chunksize = 2 })
        assert.is_nil(r[1])
        assert.are.equal(2, r[2])
        assert.is_nil(r[3])
        assert.are.equal(4, r[4])
        assert.is_nil(r[5])
        assert.are.equal(6, r[6])
      end)

      it("spreads argument lists with starmap", function()
        assert.are.same({ "ab", "cd", "12" },
          pool:starmap(function(a, b) return a .. b end, { { "a", "b" }, { "c", "d" }, { 1, 2 } }))
        assert.are.same({ 0, 1, 3 },
          pool:starmap(function(...) return select("#", ...) end, { {}, { 1 }, { 1, 2, 3 } }))
      end)

      it("raises the first error in input order", function()
        local function fn(x)
          if x >= 3 then error({ at = x }) end
          luapool.sleep(0.01)
          return x
        end
        for _, cs in ipairs { 1, 2 } do
          local ok, e = pcall(pool.map, pool, fn, { 1, 2, 3, 4, 5, 6 }, { chunksize = cs })
          assert.is_false(ok)
          assert.are.equal("task", e.kind)
          assert.are.equal(3, e.value.at)
          assert.matches(helper.worker_pattern(kind, "io"), e.worker)
        end
        local ok, e = pcall(pool.starmap, pool, function(a) error("bad " .. a, 0) end, { { "one" }, { "two" } })
        assert.is_false(ok)
        assert.are.equal("bad one", e.value)
      end)

      it("refuses bad options and items", function()
        assert.are.equal("bad option 'chunksize' to 'map' (positive integer expected, got 0)",
          error_of(function() return pool:map(ident, { 1 }, { chunksize = 0 }) end))
        assert.are.equal("bad option 'chunksize' to 'map' (positive integer expected, got 1.5)",
          error_of(function() return pool:map(ident, { 1 }, { chunksize = 1.5 }) end))
        assert.are.equal("unknown option 'foo' to 'map'",
          error_of(function() return pool:map(ident, { 1 }, { foo = 1 }) end))
        assert.are.equal("bad argument #2 to 'map' (table expected, got nil)",
          error_of(function() return pool:map(ident, nil) end))
        assert.are.equal("bad item #2 to 'starmap' (table of arguments expected, got number)",
          error_of(function() return pool:starmap(ident, { { 1 }, 2 }) end))
      end)
    end)

    describe("cancel", function()
      it("cancels a queued task and not a running or finished one", function()
        -- (an iopool aborts a running task's I/O and cancels it: iopool_spec)
        if kind == "iopool" then return pending("a running iopool task can be cancelled") end
        local p <close> = luapool[kind].new { max_workers = 1 }
        local busy = p:submit(function() luapool.sleep(0.3) return "busy" end)
        local queued = p:submit(function() return "queued" end)
        wait_until(function() return busy:running() end, "the first task to run")
        assert.is_false(busy:cancel())
        assert.is_true(queued:cancel())
        assert.is_true(queued:cancelled())
        assert.is_true(queued:done())
        local e = result_error(queued, 30)
        assert.are.equal("cancelled", e.kind)
        assert.are.equal("the task was cancelled", e.message)
        assert.are.equal("cancelled: the task was cancelled", tostring(e))
        assert.are.equal("cancelled", queued:exception(30).kind)
        assert.are.equal("busy", busy:result(30))
        assert.is_false(busy:cancel())
        assert.is_false(busy:cancelled())
        assert.are.equal("busy", busy:result(30))
      end)
    end)

    describe("shutdown", function()
      it("waits for the tasks with wait = true", function()
        local p = luapool[kind].new { max_workers = 2 }
        local fs = {}
        for i = 1, 6 do fs[i] = p:submit(function() luapool.sleep(0.03) return i end) end
        p:shutdown { wait = true }
        for i = 1, 6 do
          assert.is_true(fs[i]:done())
          assert.are.equal(i, fs[i]:result(0))
        end
      end)

      it("cancels queued tasks with cancel_futures = true", function()
        local p = luapool[kind].new(helper.serial(kind, { max_workers = 1 }))
        local fs = {}
        for i = 1, 5 do fs[i] = p:submit(function() luapool.sleep(0.2) return i end) end
        wait_until(function() return fs[1]:running() end, "the first task to run")
        p:shutdown { cancel_futures = true }
        assert.are.equal(1, fs[1]:result(30))
        for i = 2, 5 do
          assert.is_true(fs[i]:cancelled())
          assert.are.equal("cancelled", result_error(fs[i], 30).kind)
        end
      end)

      it("counts no workers once shut down", function()
        local p = luapool[kind].new { max_workers = 2 }
        local fs = { p:submit(function() luapool.sleep(0.05) end), p:submit(function() end) }
        for _, f in ipairs(fs) do f:result(30) end
        assert.are.equal(2, p:stats().workers)
        p:shutdown()
        local s = p:stats()
        assert.are.same({ 0, 0, 2 }, { s.workers, s.idle, s.done })
      end)

      it("refuses submit and map after shutdown, and shuts down twice", function()
        local p = luapool[kind].new { max_workers = 1 }
        assert.are.equal(1, p:submit(function() return 1 end):result(30))
        p:shutdown()
        assert.are.equal("cannot submit after shutdown", error_of(function() return p:submit(ident, 1) end))
        assert.are.equal("cannot submit after shutdown", error_of(function() return p:map(ident, { 1 }) end))
        assert.are.equal("cannot submit after shutdown", error_of(function() return p:starmap(ident, { { 1 } }) end))
        p:shutdown()
        p:shutdown { wait = false }
      end)

      it("shuts down on leaving a <close> scope", function()
        local fs = {}
        do
          local p <close> = luapool[kind].new { max_workers = 2 }
          for i = 1, 4 do fs[i] = p:submit(function() luapool.sleep(0.05) return i end) end
        end
        for i = 1, 4 do
          assert.is_true(fs[i]:done())
          assert.are.equal(i, fs[i]:result(0))
        end
      end)

      it("does not hang when a <close> scope is left by an error", function()
        local fs = {}
        local ok, err = pcall(function()
          local p <close> = luapool[kind].new { max_workers = 1 }
          for i = 1, 4 do fs[i] = p:submit(function() luapool.sleep(0.2) return i end) end
          error("oops", 0)
        end)
        assert.is_false(ok)
        assert.are.equal("oops", err)
        for i = 1, 4 do assert.is_true(fs[i]:done()) end
        assert.is_true(fs[4]:cancelled())
      end)

      it("does not hang when a pool with queued tasks is collected", function()
        local weak = setmetatable({}, { __mode = "v" })
        -- in a function of its own, so that no stack slot keeps the pool
        local pids = (function()
          local p = luapool[kind].new { max_workers = 2 }
          weak[1] = p
          local r = p:map(function() luapool.sleep(0.05) return luapool.current_worker().pid end, { 1, 2, 3, 4 })
          for _ = 1, 6 do p:submit(function() luapool.sleep(0.1) end) end
          return r
        end)()
        collectgarbage()
        collectgarbage()
        assert.is_nil(weak[1], "the pool was not collected")
        if kind == "processpool" then
          for _, pid in ipairs(pids) do assert.is_false(helper.alive(pid), "worker " .. pid .. " is alive") end
        end
      end)

      it("creates and closes 200 pools", function()
        local pids = {}
        for i = 1, 200 do
          local p <close> = luapool[kind].new { max_workers = 2 }
          if i % 4 == 0 then
            pids[#pids + 1] = p:submit(function() return luapool.current_worker().pid end):result(30)
          end
        end
        assert.are.equal(50, #pids)
        if kind == "processpool" then
          for _, pid in ipairs(pids) do assert.is_false(helper.alive(pid), "worker " .. pid .. " is alive") end
        end
      end)
    end)

    describe("workers", function()
      it("tell who they are", function()
        local ws = pool:map(function()
          luapool.sleep(0.05)
          return luapool.current_worker()
        end, { 1, 2, 3, 4, 5, 6 })
        local seen = {}
        for _, w in ipairs(ws) do
          assert.are.equal(worker_kind, w.kind)
          assert.is_true(w.index == 1 or w.index == 2)
          assert.are.equal("io-" .. w.index, w.name)
          if helper.traits[kind].own_process then -- (an iopool's loops are threads too)
            assert.are.equal(MAIN_PID, w.pid)
          else
            -- (on an mpipool each rank has its worker 1, 2...)
            local key = w.rank and w.rank .. "/" .. w.index or w.index
            assert.are_not.equal(MAIN_PID, w.pid)
            if seen[key] then assert.are.equal(seen[key], w.pid) end
            seen[key] = w.pid
          end
        end
      end)

      it("can require luapool and print", function()
        local same, new_type, wkind = pool:submit(function()
          local m = require "luapool"
          return rawequal(m, package.loaded.luapool), type(m.threadpool.new), m.current_worker().kind
        end):result(30)
        assert.is_true(same)
        assert.are.equal("function", new_type)
        assert.are.equal(worker_kind, wkind)
        assert.are.equal("after print", pool:submit(function()
          print("(pool_spec: a line printed by a task)")
          return "after print"
        end):result(30))
        assert.are.equal(2, pool:submit(function() return 2 end):result(30))
      end)
    end)

    describe("bad input", function()
      it("refuses a task that is not a function", function()
        assert.are.equal("bad argument #1 to 'submit' (function or kernel expected, got nil)",
          error_of(function() return pool:submit(nil) end))
        assert.are.equal("bad argument #1 to 'submit' (function or kernel expected, got number)",
          error_of(function() return pool:submit(1) end))
        assert.are.equal("bad argument #1 to 'map' (function or kernel expected, got nil)",
          error_of(function() return pool:map(nil, {}) end))
        assert.are.equal("bad argument #1 to 'starmap' (function or kernel expected, got table)",
          error_of(function() return pool:starmap({}, {}) end))
      end)

      it("points argument errors at the caller's line", function()
        -- each case on one line: the error must name that line
        local cases = {
          { function() local r = pool:submit(nil); return r end,
            "bad argument #1 to 'submit' (function or kernel expected, got nil)" },
          { function() local r = pool:map(nil, {}); return r end,
            "bad argument #1 to 'map' (function or kernel expected, got nil)" },
          { function() local r = pool:starmap(nil, {}); return r end,
            "bad argument #1 to 'starmap' (function or kernel expected, got nil)" },
          { function() local r = pool:map(ident, nil); return r end,
            "bad argument #2 to 'map' (table expected, got nil)" },
          { function() local r = pool:map(ident, { 1 }, 5); return r end,
            "bad argument #3 to 'map' (table expected, got number)" },
          { function() local r = pool:map(ident, { 1 }, { foo = 1 }); return r end,
            "unknown option 'foo' to 'map'" },
          { function() local r = pool:map(ident, { 1 }, { chunksize = 0 }); return r end,
            "bad option 'chunksize' to 'map' (positive integer expected, got 0)" },
          { function() local r = pool:submit(ident):result(-1); return r end,
            "bad argument #1 to 'result' (non-negative number expected, got -1)" },
          { function() local r = luapool[kind].new { max_workers = 0 }; return r end,
            "bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got 0)" },
        }
        assert.are.equal("", helper.wrong_positions(cases))
      end)

      it("refuses bad options to new", function()
        local new = luapool[kind].new
        assert.are.equal("bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got 0)",
          error_of(function() return new { max_workers = 0 } end))
        assert.are.equal("bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got -3)",
          error_of(function() return new { max_workers = -3 } end))
        assert.are.equal("bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got 4097)",
          error_of(function() return new { max_workers = 4097 } end))
        assert.are.equal("bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got 1.5)",
          error_of(function() return new { max_workers = 1.5 } end))
        assert.are.equal("bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got string)",
          error_of(function() return new { max_workers = "2" } end))
        assert.are.equal("unknown option 'foo' to 'new'", error_of(function() return new { foo = 1 } end))
        assert.are.equal("bad option 'name' to 'new' (non-empty string of at most 39 bytes expected, got 0 bytes)",
          error_of(function() return new { name = "" } end))
        assert.are.equal("bad option 'name' to 'new' (non-empty string of at most 39 bytes expected, got 40 bytes)",
          error_of(function() return new { name = string.rep("n", 40) } end))
        assert.are.equal("bad option 'name' to 'new' (non-empty string of at most 39 bytes expected, got boolean)",
          error_of(function() return new { name = true } end))
        local p <close> = new { max_workers = helper.largest(kind), name = string.rep("n", 39) }
        assert.are.equal(helper.largest(kind), p.max_workers)
      end)

      it("refuses a name that is a number, not a string", function()
        assert.are.equal("bad option 'name' to 'new' (non-empty string of at most 39 bytes expected, got 5)",
          error_of(function() return luapool[kind].new { name = 5 } end))
      end)

      it("refuses bad options to shutdown", function()
        local p <close> = luapool[kind].new { max_workers = 1 }
        assert.are.equal("unknown option 'foo' to 'shutdown'", error_of(function() return p:shutdown { foo = 1 } end))
        -- a key that is no string is named too (it read '?')
        assert.are.equal("unknown option '1' to 'shutdown'", error_of(function() return p:shutdown { true } end))
        -- booleans only: read by truthiness, wait = "no" waited and
        -- cancel_futures = 0 cancelled (helper-52)
        assert.are.equal("bad option 'wait' to 'shutdown' (boolean expected, got string)",
          error_of(function() return p:shutdown { wait = "no" } end))
        assert.are.equal("bad option 'cancel_futures' to 'shutdown' (boolean expected, got 0)",
          error_of(function() return p:shutdown { cancel_futures = 0 } end))
        assert.are.equal("bad option 'cancel_running' to 'shutdown' (boolean expected, got string)",
          error_of(function() return p:shutdown { cancel_running = "false" } end))
        -- refused before anything is done: the pool still takes work
        assert.are.equal(2, p:submit(function() return 2 end):result(30))
      end)
    end)
  end)
end

describe("processpool workers that die", function()
  -- Each test has a pool of its own: crash messages name the task by its
  -- number in the pool ("task #2") or by its map items ("item #2").
  local pool
  before_each(function() pool = luapool.processpool.new { max_workers = 1, name = "io" } end)
  after_each(function() pool:shutdown() end)

  local function pid_of_worker() return pool:submit(function() return luapool.current_worker().pid end):result(30) end

  it("fails a task whose worker exits, and goes on in a new process", function()
    local pid = pid_of_worker() -- task #1
    local f = pool:submit(function() os.exit(3) end) -- task #2
    local e = result_error(f, 30)
    assert.are.equal("crashed", e.kind)
    assert.are.equal(("worker io-1 (pid %d) exited with status 3 while running task #2"):format(pid), e.message)
    assert.are.equal("io-1", e.worker)
    assert.are.equal("crashed: " .. e.message, tostring(e))
    assert.are.equal("crashed", f:exception(30).kind)
    assert.is_false(helper.alive(pid))
    local pid2 = pid_of_worker()
    assert.are_not.equal(pid, pid2)
    assert.are.equal(42, pool:submit(function() return 42 end):result(30))
  end)

  it("fails a task whose worker is killed by SIGKILL", function()
    local pid = pid_of_worker()
    local f = pool:submit(function()
      os.execute("kill -9 " .. luapool.current_worker().pid)
      luapool.sleep(10)
      return "not killed"
    end)
    local e = result_error(f, 30)
    assert.are.equal("crashed", e.kind)
    assert.are.equal(("worker io-1 (pid %d) killed by signal 9 (KILL) while running task #2"):format(pid), e.message)
    assert.is_false(helper.alive(pid))
    assert.are.equal("ok", pool:submit(function() return "ok" end):result(30))
  end)

  it("fails a map whose worker dies, naming the items", function()
    local function exit_at(at)
      return function(x)
        if x == at then os.exit(5) end
        return x
      end
    end
    local ok, e = pcall(pool.map, pool, exit_at(2), { 1, 2, 3 }, { chunksize = 1 })
    assert.is_false(ok)
    assert.are.equal("crashed", e.kind)
    assert.matches("^worker io%-1 %(pid %d+%) exited with status 5 while running item #2$", e.message)
    ok, e = pcall(pool.map, pool, exit_at(5), { 1, 2, 3, 4, 5, 6, 7 }, { chunksize = 3 })
    assert.is_false(ok)
    assert.are.equal("crashed", e.kind)
    assert.matches("^worker io%-1 %(pid %d+%) exited with status 5 while running items #4%-#6$", e.message)
    assert.are.same({ 1, 2, 3 }, pool:map(ident, { 1, 2, 3 }))
  end)

  it("leaves no worker process alive after close", function()
    local pids
    do
      local p <close> = luapool.processpool.new { max_workers = 3 }
      pids = p:map(function() luapool.sleep(0.1) return luapool.current_worker().pid end, { 1, 2, 3 },
        { chunksize = 1 })
      for _, pid in ipairs(pids) do assert.is_true(helper.alive(pid)) end
    end
    for _, pid in ipairs(pids) do assert.is_false(helper.alive(pid), "worker " .. pid .. " is alive") end
  end)
end)

describe("luapool.current_worker in the main state", function()
  it("says main", function()
    local w = luapool.current_worker()
    assert.are.same({ name = "main", index = 0, kind = "main", pid = MAIN_PID }, w)
  end)
end)

describe("a __gc that submits while another submit is encoding", function()
  -- Both used the state's one scratch buffer: the outer submit's message was
  -- corrupted, or written past the end of a buffer the inner one took.
  it("leaves both messages intact", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local big = string.rep("x", 10000) -- large enough to be handed over, not copied
    local keep, inner = {}, 0
    local mt = { __gc = function()
      inner = inner + 1
      keep[#keep + 1] = pool:submit(function(str) return #str end, big)
    end }
    for _ = 1, 20 do
      local t = {}
      for i = 1, 3000 do
        local up = i
        t[i] = { function() return up end }
      end
      collectgarbage()
      collectgarbage("stop")
      for _ = 1, 50 do setmetatable({}, mt) end
      collectgarbage("incremental", 1, 100, 8) -- collect in tiny steps, during the encode
      collectgarbage("restart")
      assert.are.equal(3000, pool:submit(function(list) return #list end, t):result(10))
    end
    collectgarbage("generational")
    collectgarbage("incremental")
    for _, f in ipairs(keep) do assert.are.equal(10000, f:result(10)) end
    assert.is_true(inner > 0, "no finalizer ran during the submits")
  end)
end)

