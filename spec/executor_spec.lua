-- The Lua layer (lua/luapool/executor.lua): map, starmap, imap, wait and
-- as_completed read sequences as Lua does, count exactly, name the item of
-- every error, validate options with Lua's rules, point argument errors at
-- the caller's line, and end a progress bar's line on every way out.
local luapool = require "luapool"
local h = require "helper"


local wrong_positions = h.wrong_positions

-- The error object fn raises.
local function error_object(fn)
  local ok, e = pcall(fn)
  assert.is_false(ok, "expected an error")
  assert.are.equal("table", type(e), "expected an error object, got " .. tostring(e))
  return e
end

-- A view of base[first .. first + n - 1] through __index and __len (a raw
-- table with nothing in it).
local function view(base, first, n, protect)
  return setmetatable({}, {
    __len = function() return n end,
    __index = function(_, i) if i >= 1 and i <= n then return base[first + i - 1] end end,
    __metatable = protect and false or nil,
  })
end

local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

local function double(x) return x * 2 end

-- A task that returns its item, except that item `slow` first waits (at
-- most 20 s) until the file at `flag` exists.
local wait_file = h.wait_file
local function held_at(slow, flag)
  return function(x)
    if x == slow then wait_file(flag) end
    return x
  end
end

local function release(flag)
  local f = assert(io.open(flag, "w"))
  f:close()
end

for _, kind in ipairs(h.engines) do
  local new = luapool[kind].new

  describe(kind, function()
    describe("sequences with __index and __len", function()
      it("map and starmap read #t and t[i]", function()
        local pool <close> = new { max_workers = 2 }
        local base = { 10, 20, 30, 40 }
        assert.are.same({ 40, 60, 80 }, pool:map(double, view(base, 2, 3)))
        assert.are.same({ 40, 60, 80 }, pool:map(double, view(base, 2, 3), { chunksize = 2 }))
        assert.are.same({ 40, 60, 80 }, pool:map(double, view(base, 2, 3, true)))
        -- automatic chunking on a processpool: 40 items in chunks of 5
        local big = pool:map(double, view(range(41), 2, 40))
        assert.are.equal(40, #big)
        assert.are.equal(4, big[1])
        assert.are.equal(82, big[40])
        local add = function(a, b, c) return a + b + (c or 0) end
        -- the list of argument lists is a view, and so is each list
        assert.are.same({ 3, 7 }, pool:starmap(add, view({ { 1, 2 }, { 3, 4 } }, 1, 2)))
        assert.are.same({ 3, 60, 7 }, pool:starmap(add, { { 1, 2 }, view({ 0, 10, 20, 30 }, 2, 3), { 3, 4 } }))
        assert.are.same({ 3, 60 }, pool:starmap(add, view({ { 1, 2 }, view({ 10, 20, 30 }, 1, 3, true) }, 1, 2),
          { chunksize = 2 }))
      end)

      it("imap reads #t and t[i], ordered or not", function()
        local pool <close> = new { max_workers = 2 }
        local seen = {}
        for i, r in pool:imap(double, view({ 5, 6, 7, 8 }, 2, 3)) do seen[#seen + 1] = i .. "=" .. r end
        assert.are.same({ "1=12", "2=14", "3=16" }, seen)
        local got = {}
        for i, r in pool:imap(double, view({ 5, 6, 7, 8 }, 2, 3), { ordered = false, chunksize = 2 }) do
          got[i] = r
        end
        assert.are.same({ 12, 14, 16 }, got)
      end)

      -- (the caller has no handle on them: before, they all ran on, and
      -- shutdown() waited for them: helper-52)
      it("map cancels what it queued when an item's __index or the progress output raises", function()
        local slow = function(x) luapool.sleep(0.2) return x end
        for _, case in ipairs {
          { "boom at 8", function(pool)
            return pool:map(slow, setmetatable({}, {
              __len = function() return 10 end,
              __index = function(_, i) if i == 8 then error("boom at 8", 0) end return i end,
            }), { chunksize = 1 })
          end },
          { "output boom", function(pool)
            return pool:map(slow, range(7), { chunksize = 1, progress = { tty = true, interval = 0,
              output = function() error("output boom", 0) end } })
          end },
        } do
          local pool <close> = new { max_workers = 1 }
          local ok, err = pcall(case[2], pool)
          assert.are.same({ false, case[1] }, { ok, err })
          local st = pool:stats()
          assert.are.equal(0, st.pending)
          assert.is_true(st.cancelled >= 1, case[1])
          assert.are.equal(7, st.cancelled + st.running + st.done)
        end
      end)

      it("refuses an item that cannot travel with the caller's item number", function()
        local pool <close> = new { max_workers = 1 }
        local items = setmetatable({}, {
          __len = function() return 6 end,
          __index = function(_, i) if i == 5 then return coroutine.create(print) end return i end,
        })
        assert.are.equal("cannot send item #5: a coroutine",
          h.error_of(pool.map, pool, function() end, items, { chunksize = 2 }))
        local arglists = setmetatable({}, {
          __len = function() return 6 end, __index = function(_, i) if i == 5 then return 5 end return { i } end,
        })
        assert.are.equal("bad item #5 to 'starmap' (table of arguments expected, got number)",
          h.error_of(pool.starmap, pool, function() end, arglists, { chunksize = 2 }))
        local co_args = { { 1 }, { 2 }, view({ 0, coroutine.create(print) }, 1, 2) }
        assert.are.equal("cannot send argument #2 of item #3: a coroutine",
          h.error_of(pool.starmap, pool, function() end, co_args, { chunksize = 2 }))
      end)
    end)

    describe("map's timeout", function()
      it("counts exactly the results not ready, later chunks included", function()
        local flag = os.tmpname()
        os.remove(flag)
        local pool <close> = new(h.serial(kind, { max_workers = 2 }))
        -- chunks of 2 (automatic on a processpool): items 3-4 are held, the
        -- other worker runs every other chunk meanwhile
        local opts = { timeout = 2 }
        if kind ~= "processpool" then opts.chunksize = 2 end
        local e = error_object(function() return pool:map(held_at(3, flag), range(16), opts) end)
        release(flag)
        pool:shutdown() -- the held item sees the flag and ends
        os.remove(flag)
        assert.are.equal("timeout", e.kind)
        assert.are.equal("map: 2 of 16 results not ready after 2 seconds", e.message)
      end)

      it("counts the chunks not started after the one that timed out", function()
        local flag = os.tmpname()
        os.remove(flag)
        local pool <close> = new(h.serial(kind, { max_workers = 1 }))
        local e = error_object(function()
          return pool:map(held_at(2, flag), range(4), { timeout = 2, chunksize = 1 })
        end)
        release(flag)
        pool:shutdown() -- the held item sees the flag and ends
        os.remove(flag)
        assert.are.equal("map: 3 of 4 results not ready after 2 seconds", e.message)
      end)
    end)

    describe("task errors name their item", function()
      -- items 11.. return nil when odd: the failing call is found exactly
      -- even when the results before it are nil
      local function fails_at(bad)
        return function(x)
          if x == bad then error("bad " .. x, 0) end
          if x % 2 == 1 then return nil end
          return x
        end
      end

      it("in map, in chunks automatic or given", function()
        local pool <close> = new { max_workers = 2 }
        for _, bad in ipairs { 13, 11, 15, 1, 40 } do
          local e = error_object(function() return pool:map(fails_at(bad), range(40)) end)
          assert.are.equal("task", e.kind)
          assert.are.equal("bad " .. bad, e.message)
          assert.are.equal(bad, e.item)
          e = error_object(function() return pool:map(fails_at(bad), range(40), { chunksize = 5 }) end)
          assert.are.equal(bad, e.item)
          e = error_object(function() return pool:map(fails_at(bad), range(40), { chunksize = 2.0 }) end)
          assert.are.equal(bad, e.item)
        end
      end)

      it("in map, for a result that cannot travel back", function()
        local pool <close> = new { max_workers = 2 }
        local e = error_object(function()
          return pool:map(function(x) if x == 4 then return coroutine.create(print) end end, range(10),
            { chunksize = 5 })
        end)
        assert.are.equal("transfer", e.kind)
        assert.are.equal("cannot send result #1: a coroutine", e.message)
        assert.are.equal(4, e.item)
      end)

      it("in starmap", function()
        local pool <close> = new { max_workers = 2 }
        local fn = function(a, b) if a == 5 then error("five", 0) end return a + b end
        local lists = { { 1, 2 }, { 3, 4 }, { 5, 6 }, { 7, 8 } }
        for _, chunk in ipairs { 1, 2, 4 } do
          local e = error_object(function() return pool:starmap(fn, lists, { chunksize = chunk }) end)
          assert.are.equal("five", e.message)
          assert.are.equal(3, e.item)
        end
      end)

      it("in imap, ordered and unordered", function()
        local pool <close> = new { max_workers = 2 }
        for _, ordered in ipairs { true, false } do
          for _, chunk in ipairs { 1, 3 } do
            local e = error_object(function()
              for _ in pool:imap(fails_at(8), range(10), { ordered = ordered, chunksize = chunk }) do end
            end)
            assert.are.equal("bad 8", e.message)
            assert.are.equal(8, e.item)
          end
        end
      end)
    end)

    -- an empty input submits nothing: map returned {} and imap's loop
    -- ended at once after shutdown (helper-52)
    it("map, starmap and imap raise after shutdown, of an empty input too", function()
      local pool = new { max_workers = 1 }
      pool:shutdown()
      local msg = "cannot submit after shutdown"
      for _, items in ipairs { {}, { 1 }, setmetatable({}, { __len = function() return 0 end }) } do
        assert.are.equal(msg, h.error_of(pool.map, pool, double, items))
        assert.are.equal(msg, h.error_of(pool.starmap, pool, double, items))
        assert.are.equal(msg, h.error_of(function() for _ in pool:imap(double, items) do end end))
        assert.are.equal(msg, h.error_of(function()
          for _ in pool:imap(double, items, { ordered = false }) do end
        end))
      end
      assert.are.equal(msg, h.error_of(function() for _ in pool:imap(double, function() end) do end end))
    end)

    describe("options", function()
      it("take a float with an integral value", function()
        local pool <close> = new { max_workers = 2 }
        assert.are.same({ 2, 4, 6, 8, 10 }, pool:map(double, range(5), { chunksize = 2.0 }))
        local got = {}
        for i, r in pool:imap(double, range(5), { chunksize = 2.0, buffersize = 3.0 }) do got[i] = r end
        assert.are.same({ 2, 4, 6, 8, 10 }, got)
      end)
    end)
  end)
end

describe("option and argument errors", function()
  local pool
  setup(function() pool = luapool.threadpool.new { max_workers = 1 } end)
  teardown(function() pool:shutdown() end)
  local function ident(x) return x end

  it("name the caller's line, for every function", function()
    local f = pool:submit(ident, 1)
    f:result()
    local co = coroutine.create(print)
    local closed <close> = luapool.threadpool.new { max_workers = 1 }
    closed:shutdown()
    local function text_clock() return "x" end
    assert.are.equal("", wrong_positions {
      { function() local _ = pool:map(nil, {}) end, "bad argument #1 to 'map' (function or kernel expected, got nil)" },
      { function() local _ = pool:map(ident, 5) end, "bad argument #2 to 'map' (table expected, got number)" },
      { function() local _ = pool:map(ident, {}, 5) end, "bad argument #3 to 'map' (table expected, got number)" },
      { function() local _ = pool:map(ident, {}, { foo = 1 }) end, "unknown option 'foo' to 'map'" },
      { function() local _ = pool:map(ident, {}, { chunksize = 2.5 }) end,
        "bad option 'chunksize' to 'map' (positive integer expected, got 2.5)" },
      { function() local _ = pool:map(ident, {}, { chunksize = "2" }) end,
        "bad option 'chunksize' to 'map' (positive integer expected, got string)" },
      { function() local _ = pool:map(ident, {}, { chunksize = 0 }) end,
        "bad option 'chunksize' to 'map' (positive integer expected, got 0)" },
      { function() local _ = pool:map(ident, {}, { chunksize = 1 / 0 }) end,
        "bad option 'chunksize' to 'map' (positive integer expected, got inf)" },
      { function() local _ = pool:map(ident, {}, { timeout = "1" }) end,
        "bad option 'timeout' to 'map' (non-negative number expected, got string)" },
      { function() local _ = pool:map(ident, {}, { timeout = 0 / 0 }) end,
        "bad option 'timeout' to 'map' (non-negative number expected, got " .. tostring(0 / 0) .. ")" },
      { function() local _ = pool:map(ident, {}, { task_timeout = "1" }) end,
        "bad option 'task_timeout' to 'map' (positive number of seconds expected, got string)" },
      { function() local _ = pool:map(ident, {}, { progress = 1 }) end,
        "bad option 'progress' to 'map' (boolean or table of settings expected, got 1)" },
      -- a misspelt setting was ignored, a clock returning a string failed in
      -- progress.lua's arithmetic (helper-52)
      { function() local _ = pool:map(ident, {}, { progress = { intervall = 1 } }) end,
        "bad option 'progress' to 'map' (unknown setting 'intervall')" },
      { function() local _ = pool:map(ident, {}, { progress = { true } }) end,
        "bad option 'progress' to 'map' (unknown setting '1')" },
      { function() local _ = pool:map(ident, { 1 }, { progress = { now = text_clock, output = ident } }) end,
        "bad option 'progress' to 'map' (setting 'now' must return a number, got string)" },
      { function() for _ in pool:imap(ident, { 1 }, { progress = { now = function() end, output = ident } }) do end end,
        "bad option 'progress' to 'imap' (setting 'now' must return a number, got nil)" },
      { function() local _ = pool:map(ident, { co }) end, "cannot send item #1: a coroutine" },
      { function() local _ = pool:map(ident, setmetatable({}, { __len = function() return "3" end })) end,
        "bad argument #2 to 'map' (its length (__len) is not an integer: string)" },
      { function() local _ = pool:starmap(5, {}) end,
        "bad argument #1 to 'starmap' (function or kernel expected, got number)" },
      { function() local _ = pool:starmap(ident, nil) end,
        "bad argument #2 to 'starmap' (table expected, got nil)" },
      { function() local _ = pool:starmap(ident, {}, { buffersize = 2 }) end,
        "unknown option 'buffersize' to 'starmap'" },
      { function() local _ = pool:starmap(ident, { 1 }) end,
        "bad item #1 to 'starmap' (table of arguments expected, got number)" },
      { function() local _ = pool:starmap(ident, { {}, { 1, co } }) end,
        "cannot send argument #2 of item #2: a coroutine" },
      { function() local _ = pool:starmap(ident, {}, { chunksize = 1.5 }) end,
        "bad option 'chunksize' to 'starmap' (positive integer expected, got 1.5)" },
      { function() local _ = pool:imap(nil, {}) end,
        "bad argument #1 to 'imap' (function or kernel expected, got nil)" },
      { function() local _ = pool:imap(ident, 5) end,
        "bad argument #2 to 'imap' (table or iterator function expected, got number)" },
      { function() local _ = pool:imap(ident, {}, true) end,
        "bad argument #3 to 'imap' (table expected, got boolean)" },
      { function() local _ = pool:imap(ident, {}, { orderd = false }) end, "unknown option 'orderd' to 'imap'" },
      { function() local _ = pool:imap(ident, {}, { buffersize = 2.5 }) end,
        "bad option 'buffersize' to 'imap' (positive integer expected, got 2.5)" },
      { function() local _ = pool:imap(ident, {}, { buffersize = "4" }) end,
        "bad option 'buffersize' to 'imap' (positive integer expected, got string)" },
      { function() local _ = pool:imap(ident, {}, { chunksize = -1 }) end,
        "bad option 'chunksize' to 'imap' (positive integer expected, got -1)" },
      { function() local _ = pool:imap(ident, {}, { task_timeout = 0 }) end,
        "bad option 'task_timeout' to 'imap' (positive number of seconds expected, got 0)" },
      { function() local _ = pool:imap(ident, {}, { ordered = "no" }) end,
        "bad option 'ordered' to 'imap' (boolean expected, got string)" },
      { function() local _ = pool:imap(ident, {}, { progress = "yes" }) end,
        "bad option 'progress' to 'imap' (boolean or table of settings expected, got string)" },
      { function() for _ in pool:imap(ident, { 1, co }) do end end, "cannot send item #2: a coroutine" },
      { function() local _ = pool:imap(ident, setmetatable({}, { __len = function() return 1.5 end })) end,
        "bad argument #2 to 'imap' (its length (__len) is not an integer: 1.5)" },
      { function() local _ = closed:map(ident, { 1 }) end, "cannot submit after shutdown" },
      { function() local _ = closed:starmap(ident, { { 1 } }) end, "cannot submit after shutdown" },
      { function() for _ in closed:imap(ident, { 1 }) do end end, "cannot submit after shutdown" },
      { function() local _ = closed:map(ident, {}) end, "cannot submit after shutdown" },
      { function() local _ = closed:starmap(ident, {}) end, "cannot submit after shutdown" },
      { function() for _ in closed:imap(ident, {}) do end end, "cannot submit after shutdown" },
      { function() local _ = luapool.as_completed(5) end,
        "bad argument #1 to 'as_completed' (table of futures expected, got number)" },
      { function() local _ = luapool.as_completed({ f, 1 }) end,
        "bad argument #1 to 'as_completed' (future expected at index 2, got number)" },
      { function() local _ = luapool.as_completed({ f }, -1) end,
        "bad argument #2 to 'as_completed' (non-negative number expected, got -1)" },
      { function() local _ = luapool.as_completed({ f }, "1") end,
        "bad argument #2 to 'as_completed' (non-negative number expected, got string)" },
      { function() local _ = luapool.wait(nil) end, "bad argument #1 to 'wait' (table of futures expected, got nil)" },
      { function() local _ = luapool.wait({ f, "x" }) end,
        "bad argument #1 to 'wait' (future expected at index 2, got string)" },
      { function() local _ = luapool.wait({ f }, true) end, "bad argument #2 to 'wait' (table expected, got boolean)" },
      { function() local _ = luapool.wait({ f }, 5) end,
        "bad argument #2 to 'wait' (table expected, got number: write luapool.wait(futures, {timeout = 5}))" },
      { function() local _ = luapool.wait({ f }, { timout = 1 }) end, "unknown option 'timout' to 'wait'" },
      { function() local _ = luapool.wait({ f }, { timeout = "1" }) end,
        "bad option 'timeout' to 'wait' (non-negative number expected, got string)" },
      { function() local _ = luapool.wait({ f }, { return_when = 1 }) end,
        "bad option 'return_when' to 'wait' (ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION expected, got 1)" },
    })
  end)

  it("say how to pass a table instead of an ipairs() or pairs() call", function()
    local t = { 1, 2, 3 }
    local function values(list) -- an iterator triple, as ipairs returns
      return function(s, i) if s[i + 1] then return i + 1, s[i + 1] end end, list, 0
    end
    assert.are.equal("", wrong_positions {
      { function() local _ = pool:imap(ident, ipairs(t)) end,
        "bad argument #2 to 'imap' (table or iterator function expected, got the iterator of an ipairs() call: " ..
        "write pool:imap(fn, t), not pool:imap(fn, ipairs(t)))" },
      { function() local _ = pool:imap(ident, ipairs(t), { ordered = false }) end,
        "bad argument #2 to 'imap' (table or iterator function expected, got the iterator of an ipairs() call: " ..
        "write pool:imap(fn, t), not pool:imap(fn, ipairs(t)))" },
      { function() local _ = pool:imap(ident, pairs(t)) end,
        "bad argument #2 to 'imap' (table or iterator function expected, got next, the iterator of a pairs() " ..
        "call: write pool:imap(fn, t) (its sequence), not pool:imap(fn, pairs(t)))" },
      { function() local _ = pool:imap(ident, values(t)) end,
        "bad argument #3 to 'imap' (options table expected, got a table with integer keys: is it the table of " ..
        "an iterator call such as ipairs(t)? imap takes the table itself, pool:imap(fn, t), or a function " ..
        "returning the next item)" },
      { function() local _ = pool:map(ident, ipairs(t)) end,
        "bad argument #2 to 'map' (table expected, got the iterator of an ipairs() call: " ..
        "write pool:map(fn, t), not pool:map(fn, ipairs(t)))" },
      { function() local _ = pool:map(ident, t, t) end,
        "bad argument #3 to 'map' (options table expected, got a table with integer keys)" },
    })
  end)

  -- an iterator object read as a sequence: #t is 0, and the loop silently
  -- yielded nothing (helper-52); with a __len it is a view, read as one
  it("refuse a callable table with no __len, which would read as an empty sequence", function()
    local calls = 0
    local gen = setmetatable({}, { __call = function() calls = calls + 1 end })
    assert.are.equal("", wrong_positions {
      { function() for _ in pool:imap(ident, gen) do end end,
        "bad argument #2 to 'imap' (table or iterator function expected, got a callable table with no __len: " ..
        "imap reads a table as a sequence, #t and t[i]; to iterate it, write " ..
        "pool:imap(fn, function() return t() end))" },
      { function() local _ = pool:map(ident, gen) end,
        "bad argument #2 to 'map' (table expected, got a callable table with no __len: map reads a table as " ..
        "a sequence, #t and t[i], and takes no iterator)" },
      { function() local _ = pool:starmap(ident, gen) end,
        "bad argument #2 to 'starmap' (table expected, got a callable table with no __len: starmap reads a " ..
        "table as a sequence, #t and t[i], and takes no iterator)" },
    })
    assert.are.equal(0, calls)
    local callable_view = setmetatable({}, { __call = error, __len = function() return 2 end,
      __index = function(_, i) return i * 10 end })
    assert.are.same({ 10, 20 }, pool:map(ident, callable_view))
    local got = {}
    for i, r in pool:imap(ident, callable_view) do got[i] = r end
    assert.are.same({ 10, 20 }, got)
  end)
end)

describe("progress", function()
  -- progress settings that capture every write, on a clock standing still
  local function capture(tty)
    local text = {}
    return text, { tty = tty, interval = 0, now = function() return 0 end,
      output = function(s) text[#text + 1] = s end }
  end
  local EMPTY = "[" .. ("-"):rep(30) .. "]"
  local FULL = "[" .. ("#"):rep(30) .. "]"

  for _, kind in ipairs(h.engines) do
    it("draws map's bar as soon as the work is queued, on a " .. kind, function()
      local pool <close> = luapool[kind].new { max_workers = 2 }
      local text, settings = capture(true)
      assert.are.same({ 2, 4, 6, 8 }, pool:map(double, range(4), { progress = settings }))
      assert.are.equal("\rmap: " .. EMPTY .. "  0/4  0.0%  0.0/s  elapsed 0:00", text[1])
      assert.are.equal("\rmap: " .. FULL .. "  4/4  100.0%  0.0/s  elapsed 0:00\n", text[#text])
    end)

    it("draws imap's bar as soon as the work is queued, on a " .. kind, function()
      local pool <close> = luapool[kind].new { max_workers = 2 }
      local text, settings = capture(true)
      local n = 0
      for _ in pool:imap(double, range(3), { progress = settings, ordered = false }) do n = n + 1 end
      assert.are.equal(3, n)
      assert.are.equal("\rimap: " .. EMPTY .. "  0/3  0.0%  0.0/s  elapsed 0:00", text[1])
      assert.are.equal("\rimap: " .. FULL .. "  3/3  100.0%  0.0/s  elapsed 0:00\n", text[#text])
    end)
  end

  it("keeps redrawing map's bar while a long chunk runs", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local text = {}
    pool:map(function(s) luapool.sleep(s) end, { 0.6 },
      { progress = { tty = true, interval = 0, output = function(s) text[#text + 1] = s end } })
    -- drawn at 0 done, redrawn every tenth of a second or so while the
    -- item runs, then the final line
    assert.is_true(#text >= 3, "written " .. #text .. " times")
    assert.matches("^\rmap: %[%-+%]  0/1  0%.0%%", text[2])
  end)

  it("ends the bar's line when map or imap raises a task error", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local text, settings = capture(true)
    local e = error_object(function()
      return pool:map(function(x) if x == 2 then error("two", 0) end return x end, range(3), { progress = settings })
    end)
    assert.are.equal("two", e.message)
    assert.matches("\n$", text[#text])
    text, settings = capture(true)
    e = error_object(function()
      for _ in pool:imap(function(x) if x == 2 then error("two", 0) end return x end, range(3),
        { progress = settings }) do end
    end)
    assert.are.equal(2, e.item)
    assert.matches("\n$", text[#text])
  end)

  it("ends the bar's line on Ctrl-C, so the error starts a line of its own", function()
    for _, call in ipairs {
      "pool:map(job, { 0, 20 }, { progress = { tty = true } })",
      "for _ in pool:imap(job, { 0, 20 }, { progress = { tty = true } }) do end",
    } do
      local script = h.tempfile(([[
        local pool <close> = threadpool.new { max_workers = 1 }
        local function job(s) luapool.sleep(s) return s end
        %s]]):format(call))
      local q = h.shell_quote
      local err, pidf, rc = os.tmpname(), os.tmpname(), os.tmpname()
      os.remove(pidf) os.remove(rc)
      assert(os.execute(("sh -c %s >/dev/null 2>&1 &"):format(q(
        ("%s %s >/dev/null 2>%s </dev/null & echo $! >%s; wait $!; echo $? >%s.tmp; mv %s.tmp %s")
          :format(q(h.bin), q(script), q(err), q(pidf), q(rc), q(rc), q(rc))))))
      h.wait_until(function() return tonumber(h.slurp(pidf) or "") ~= nil end, "the pid", 60)
      -- the signal only once the first item is done (1/2 drawn), the second
      -- sleeping its 20 s
      h.wait_until(function() return (h.slurp(err) or ""):find("  1/2  ", 1, true) ~= nil end,
        "1/2 to be drawn", 60)
      assert(os.execute("kill -INT " .. tonumber(h.slurp(pidf))))
      h.wait_until(function() return h.slurp(rc) ~= nil end, "luapool to exit", 60)
      local text, code = h.slurp(err), tonumber(h.slurp(rc))
      for _, f in ipairs { script, err, pidf, rc } do os.remove(f) end
      assert.are.equal(130, code, "exit status was not 130: " .. text)
      assert.matches("\r%a+: %[###############%-+%]  1/2  50%.0%%[^\r\n]*\nluapool: interrupted: " ..
        "the script received SIGINT\n", text)
    end
  end)
end)
