-- What must stay flat as a script grows: the loops over completions hold
-- only what they have not handed out yet (as_completed, unordered imap,
-- wait), many outstanding futures give exact results, and a future's
-- extras (callbacks, error object, its pool) survive collections.
local luapool = require "luapool"
local h = require "helper"

-- Futures have finalizers: a future the script dropped is finalized in one
-- full collection and leaves a weak-keyed table in the next.
local function full_gc()
  collectgarbage("collect")
  collectgarbage("collect")
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

local function weak_keys() return setmetatable({}, { __mode = "k" }) end

-- A task that waits until the file at path exists (the gate is opened by
-- writing it), then returns v.
local function gated(path, v)
  return function()
    while true do
      local f = io.open(path)
      if f then
        f:close()
        return v
      end
      luapool.sleep(0.01)
    end
  end
end

local function open_gate(path)
  local f = assert(io.open(path, "w"))
  f:close()
end

-- A gate's path and two to-be-closed guards: declare `opener` after the
-- pool (it opens the gate before the pool closes, even when an assertion
-- failed, so closing never waits for a gated task forever) and `remover`
-- before it (it removes the file once the pool is closed).
local function new_gate()
  local path = os.tmpname()
  os.remove(path)
  return path, setmetatable({}, { __close = function() open_gate(path) end }),
    setmetatable({}, { __close = function() os.remove(path) end })
end

-- The completion queue (a userdata named luapool.cq) reachable from the
-- upvalues of fn, searched through the functions among them.
local function find_cq(fn, seen)
  seen = seen or {}
  if seen[fn] then return nil end
  seen[fn] = true
  for i = 1, math.huge do
    local name, v = debug.getupvalue(fn, i)
    if not name then return nil end
    if type(v) == "userdata" and (getmetatable(v) or {}).__name == "luapool.cq" then return v end
    if type(v) == "function" then
      local q = find_cq(v, seen)
      if q then return q end
    end
  end
end

describe("loops over completions", function()
  it("as_completed lets go of the futures it has yielded while later ones are pending", function()
    local gate, opener, remover = new_gate()
    local _ <close> = remover
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local _ <close> = opener
    local alive = weak_keys()
    local function submit_all() -- the script keeps no list of its own
      local fs = {}
      for i = 1, 3 do fs[i] = pool:submit(function(x) return x end, i) end
      fs[4] = pool:submit(gated(gate, "late 1"))
      fs[5] = pool:submit(gated(gate, "late 2"))
      for i, f in ipairs(fs) do alive[f] = i <= 3 and "early" or "late" end
      return fs
    end
    local iter, _, _, closing = luapool.as_completed(submit_all())
    local function take(n) -- in a frame of its own: no register keeps a future
      local got = {}
      for k = 1, n do got[k] = iter():result() end
      return got
    end
    local early = take(3)
    table.sort(early)
    assert.are.same({ 1, 2, 3 }, early)
    full_gc()
    local left = {}
    for _, tag in pairs(alive) do left[#left + 1] = tag end
    assert.are.same({ "late", "late" }, left) -- the yielded ones are gone, the pending ones kept
    open_gate(gate)
    local late = take(2)
    table.sort(late)
    assert.are.same({ "late 1", "late 2" }, late)
    assert.is_nil(iter())
    full_gc()
    assert.are.equal(0, count(alive))
    closing:close()
  end)

  it("as_completed still yields each future once and raises its timeout", function()
    local gate, opener, remover = new_gate()
    local _ <close> = remover
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local _ <close> = opener
    local f = pool:submit(function() return "x" end)
    f:result()
    local n = 0
    for g in luapool.as_completed { f, f, f } do
      n = n + 1
      assert.are.equal(f, g)
    end
    assert.are.equal(1, n)
    local slow = pool:submit(gated(gate, "y"))
    local ok, err = pcall(function()
      for _ in luapool.as_completed({ f, slow }, 0.2) do end
    end)
    assert.is_false(ok)
    assert.are.equal("1 (of 2) futures unfinished after 0.2 seconds", err.message)
    open_gate(gate)
    assert.are.equal("y", slow:result())
  end)

  it("unordered imap holds only the chunks it has not handed out", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local items = {}
    for i = 1, 40 do items[i] = i end
    local iter, s, c = pool:imap(function(x) return x * 2 end, items,
      { ordered = false, buffersize = 4 })
    local q = assert(find_cq(iter), "the unordered imap's completion queue")
    local seen = weak_keys()
    local function step() -- one item; the futures the queue holds go in seen
      local i, v = iter(s, c)
      for _, f in pairs(debug.getuservalue(q, 1)) do seen[f] = true end
      return i, v
    end
    local sum, held = 0, 0
    for _ = 1, 30 do
      local i, v = step()
      assert.are.equal(2 * i, v)
      sum = sum + v
      held = math.max(held, count(debug.getuservalue(q, 1)))
    end
    full_gc()
    assert.is_true(held <= 4, "the queue held " .. held .. " futures")
    assert.is_true(count(seen) <= 4, count(seen) .. " futures still alive after 30 items")
    for _ = 31, 40 do sum = sum + select(2, step()) end
    assert.is_nil(iter(s, c))
    assert.are.equal(40 * 41, sum)
  end)

  it("wait keeps none of the futures once it has returned", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local alive = weak_keys()
    local function run()
      local fs = {}
      for i = 1, 20 do
        fs[i] = pool:submit(function(x) return x end, i)
        alive[fs[i]] = true
      end
      local done, not_done = luapool.wait(fs)
      return #done, #not_done
    end
    local ndone, nnot = run()
    assert.are.equal(20, ndone)
    assert.are.equal(0, nnot)
    full_gc()
    assert.are.equal(0, count(alive))
  end)
end)

describe("many futures", function()
  it("100000 outstanding futures give exact results", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local function id(x) return x end
    local fs = {}
    for i = 1, 100000 do fs[i] = pool:submit(id, i) end
    local bad = 0
    for i = 1, 100000 do
      if fs[i]:result() ~= i then bad = bad + 1 end
    end
    assert.are.equal(0, bad)
    local st = pool:stats()
    assert.are.equal(100000, st.done)
  end)

  it("results of every size survive: inline, beside the message's place, and large", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local fs, want = {}, {}
    for i, len in ipairs { 0, 1, 5, 10, 11, 12, 20, 23, 24, 25, 100, 5000, 70000 } do
      want[i] = string.rep("v", len)
      fs[i] = pool:submit(function(n) return string.rep("v", n) end, len)
    end
    for i, f in ipairs(fs) do assert.are.equal(want[i], f:result()) end
  end)

  it("a future keeps its error object, its callbacks and its pool through collections", function()
    local f, calls
    local gate, opener, remover = new_gate()
    local _ <close> = remover
    do
      local pool = luapool.threadpool.new { max_workers = 1 } -- held by its futures only
      local _ <close> = opener
      local g = pool:submit(gated(gate, "ok"))
      calls = {}
      g:add_done_callback(function(x) calls[#calls + 1] = x:result() end)
      f = pool:submit(function() error({ code = 7 }) end)
      pool = nil -- luacheck: ignore 311
      full_gc()
      open_gate(gate)
      assert.are.equal("ok", g:result())
    end
    local e1 = f:exception()
    full_gc()
    local e2 = f:exception()
    assert.is_true(rawequal(e1, e2))
    assert.are.equal(7, e1.value.code)
    local ok, e3 = pcall(f.result, f)
    assert.is_false(ok)
    assert.is_true(rawequal(e1, e3))
    assert.are.same({ "ok" }, calls)
  end)

  it("refuses what is not a future as before", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local f = pool:submit(function() return 1 end)
    assert.has_error(function() f.result(io.stdout) end,
      "bad argument #1 to 'result' (luapool.future expected, got FILE*)")
    assert.has_error(function() f.done({}) end,
      "bad argument #1 to 'done' (luapool.future expected, got table)")
    assert.are.equal(1, f:result())
  end)
end)

describe("scripts/bench/scale.lua", function()
  it("runs with --quick", function()
    local out, err, code = h.run { h.source_dir .. "/scripts/bench/scale.lua", "--quick", "--runs", "1",
                                   "--warmup", "0" }
    assert.are.equal(0, code, err)
    assert.matches("5k futures inline", out)
    assert.matches("per%-task time against 1k", out)
    assert.matches("as_completed over 40 futures of 100 KB results", out)
    -- the last row: all 40 yielded, only the one the loop still holds alive
    assert.matches("\n%s+40%s+1%s+%d+%s+[%d.]+\n", out)
  end)
end)
