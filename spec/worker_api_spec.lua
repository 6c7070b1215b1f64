-- Initializers, the worker API, and the documented semantics of tasks
-- (fresh globals, upvalues copied by value), on both pools.
local luapool = require "luapool"
local h = require "helper"

for _, kind in ipairs(h.engines) do
  local new = luapool[kind].new
  describe(kind, function()
    it("runs the initializer with initargs once in each worker before its tasks", function()
      local pool <close> = new { max_workers = 2, initializer = function(tag, n)
        INIT_COUNT = (INIT_COUNT or 0) + 1
        CONFIG = { tag = tag, n = n }
      end, initargs = { "cfg", 42 } }
      local r = pool:map(function() return CONFIG.tag .. CONFIG.n .. ":" .. INIT_COUNT end,
        { 1, 2, 3, 4, 5, 6 })
      for i = 1, 6 do assert.are.equal("cfg42:1", r[i]) end
    end)

    it("breaks the pool when the initializer fails: every future fails 'broken'", function()
      local pool <close> = new { max_workers = 2, name = "bad",
        initializer = function() error("no config here") end }
      local fs = {}
      for i = 1, 6 do fs[i] = pool:submit(function() return i end) end
      for i = 1, 6 do
        local e = fs[i]:exception(10)
        assert.are.equal("broken", e.kind)
        assert.matches("^" .. h.at(kind) .. "the initializer failed in worker bad%-[12]: " ..
          "[^:]*spec/worker_api_spec%.lua:%d+: no config here$", e.message)
      end
      local later = pool:submit(function() return 1 end)
      assert.are.equal("broken", later:exception(10).kind)
      local ok, err = pcall(pool.map, pool, tostring, { 1, 2 })
      assert.is_false(ok)
      assert.are.equal("broken", err.kind)
      assert.matches("^broken: " .. h.at(kind) .. "the initializer failed in worker bad%-", tostring(err))
    end)

    it("breaks the pool when the initializer outlives the task deadline, the same on both pools", function()
      local pool <close> = new { max_workers = 1, name = "ini", task_timeout = 0.3,
        initializer = function() while true do end end }
      local tail = h.traits[kind].kills and "; the worker %(pid %d+%) was killed$" or "$"
      for _ = 1, 2 do
        local e = pool:submit(print):exception(30)
        assert.are.equal("broken", e.kind)
        assert.matches("^" .. h.at(kind) .. "the initializer failed in worker ini%-1: it exceeded its deadline " ..
          "of 0%.3 seconds" .. tail, e.message)
      end
    end)

    it("refuses an initializer or initargs that cannot travel, at creation", function()
      local co = coroutine.create(print)
      -- the initializer is "initializer", its arguments are numbered from 1
      assert.has_error(function() new { initializer = print, initargs = { 1, co } } end,
        "cannot send initializer argument #2: a coroutine")
      assert.has_error(function() new { initializer = function() return co end } end,
        "cannot send initializer: upvalue 'co' of function <" .. debug.getinfo(1, "S").short_src ..
        ":" .. debug.getinfo(1, "l").currentline - 2 .. "> is a coroutine")
      assert.has_error(function() new { initializer = 5 } end,
        "bad option 'initializer' to 'new' (function expected, got number)")
      assert.has_error(function() new { initializer = print, initargs = 5 } end,
        "bad option 'initargs' to 'new' (table expected, got number)")
    end)

    it("gives tasks fresh globals: helpers travel as upvalues, not globals", function()
      HELPER_GLOBAL = function() return 1 end
      local function helper(x) return x + 1 end
      local pool <close> = new { max_workers = 1 }
      assert.is_nil(pool:submit(function() return HELPER_GLOBAL end):result())
      assert.are.equal(6, pool:submit(function(x) return helper(x) end, 5):result())
      HELPER_GLOBAL = nil
    end)

    it("copies upvalues by value: writes in a task do not flow back", function()
      local counter, log = 10, {}
      local pool <close> = new { max_workers = 1 }
      local r = pool:submit(function()
        counter = counter + 1
        log[#log + 1] = "x"
        return counter, #log
      end):result()
      assert.are.equal(11, r)
      assert.are.equal(10, counter)
      assert.are.equal(0, #log)
    end)

    it("lets tasks require modules from the script's package.path", function()
      local pool <close> = new { max_workers = 1 }
      local t = pool:submit(function() return type(require("luapool.fixture").start) end)
      assert.are.equal("function", t:result())
    end)

    it("returns every value of a task from result(), the first from map", function()
      local pool <close> = new { max_workers = 2 }
      assert.are.same({ 1, nil, "three", n = 3 },
        table.pack(pool:submit(function() return 1, nil, "three" end):result()))
      assert.are.same({ 1, 2 }, pool:map(function(x) return x, "ignored" end, { 1, 2 }))
    end)

    it("fails a result the owner cannot receive with kind transfer", function()
      local pool <close> = new { max_workers = 1 }
      local saved = string.format
      string.format = nil -- the worker still sends string.format by name
      local f = pool:submit(function() return string.format end)
      local e = f:exception()
      string.format = saved
      assert.are.equal("transfer", e.kind)
      assert.are.equal("cannot receive the result of task #1: cannot receive 'string.format': not found here",
        e.message)
    end)

    it("answers current_worker, now, sleep and cpu_count inside tasks", function()
      local pool <close> = new { max_workers = 2, name = "api" }
      local w, t0, t1, cpus = pool:submit(function()
        local a = luapool.now()
        luapool.sleep(0.05)
        return luapool.current_worker(), a, luapool.now(), luapool.cpu_count()
      end):result()
      assert.matches("^api%-[12]$", w.name)
      assert.are.equal(h.worker_kinds[kind], w.kind)
      assert.is_true(w.index == 1 or w.index == 2)
      assert.are.equal("number", math.type(w.pid) and "number")
      assert.is_true(t1 - t0 >= 0.05)
      assert.are.equal(luapool.cpu_count(), cpus)
    end)
  end)
end

describe("luapool in the main state", function()
  it("says it is main", function()
    local w = luapool.current_worker()
    assert.are.equal("main", w.kind)
    assert.are.equal("main", w.name)
    assert.are.equal(0, w.index)
  end)

  it("refuses a negative sleep", function()
    assert.has_error(function() luapool.sleep(-1) end,
      "bad argument #1 to 'sleep' (non-negative number expected, got -1)")
    assert.has_error(function() luapool.sleep(-0.5) end,
      "bad argument #1 to 'sleep' (non-negative number expected, got -0.5)")
    assert.has_error(function() luapool.sleep("x") end,
      "bad argument #1 to 'sleep' (number expected, got string)")
  end)

  it("has a monotonic clock finer than a microsecond", function()
    local a, b = luapool.now(), luapool.now()
    -- (the upper bound only says the two readings are close: a preempted
    -- process may lose a good part of a second between them)
    assert.is_true(b >= a and b - a < 1)
    assert.are.equal("float", math.type(a))
  end)
end)
