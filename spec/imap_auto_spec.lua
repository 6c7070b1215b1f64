-- imap's automatic window and chunking (lua/luapool/executor.lua), and the
-- caller's line in every misuse error the Lua layer raises, tail calls
-- included.
--
-- Chunks are counted without timing: a task function carries its upvalues,
-- and each chunk gets its own copy of them, so a task returning n = n + 1
-- returns its position in its chunk (1 starts a chunk).
local luapool = require "luapool"
local h = require "helper"

local SRC = debug.getinfo(1, "S").short_src
local function here() return debug.getinfo(2, "l").currentline end

local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

local function new_pool(kind, opts)
  opts = opts or {}
  opts.max_workers = opts.max_workers or 2
  return luapool[kind].new(opts)
end

-- The position of each result in its chunk, by input index, and the number
-- of chunks (results at position 1).
local function positions(pool, items, opts)
  local count = 0
  local function pos(_)
    count = count + 1
    return count
  end
  local got, chunks, n = {}, 0, 0
  for i, r in pool:imap(pos, items, opts) do
    n = n + 1
    got[i] = r
    if r == 1 then chunks = chunks + 1 end
  end
  return got, chunks, n
end

for _, kind in ipairs(h.engines) do
  describe("imap at default options on a " .. kind, function()
    local pool
    setup(function() pool = new_pool(kind) end)
    teardown(function() pool:shutdown() end)

    it("gives the exact results of 100,000 tiny items in input order", function()
      local items = range(100000)
      local expect, bad, n = 1, nil, 0
      for i, r in pool:imap(function(x) return x * 3 end, items) do
        n = n + 1
        if i ~= expect or r ~= 3 * i or math.type(i) ~= "integer" or math.type(r) ~= "integer" then
          bad = bad or ("index %s result %s where %d expected"):format(tostring(i), tostring(r), expect)
        end
        expect = expect + 1
      end
      assert.is_nil(bad)
      assert.are.equal(100000, n)
    end)

    it("gives each of 100,000 tiny items once with ordered = false", function()
      local seen, n, bad = {}, 0, nil
      for i, r in pool:imap(function(x) return -x end, range(100000), { ordered = false }) do
        n = n + 1
        if seen[i] or r ~= -i then bad = bad or ("index %d result %s"):format(i, tostring(r)) end
        seen[i] = true
      end
      assert.is_nil(bad)
      assert.are.equal(100000, n)
    end)

    it("starts with single items, chunks tiny tasks, and keeps chunks within 256 items", function()
      local t0 = luapool.now()
      local got, chunks, n = positions(pool, range(100000))
      local took = luapool.now() - t0
      assert.are.equal(100000, n)
      -- the window (twice the workers) is filled with one-item chunks
      -- before anything is measured
      assert.are.same({ 1, 1, 1, 1 }, { got[1], got[2], got[3], got[4] })
      local largest = 0
      for i = 1, n do if got[i] > largest then largest = got[i] end end
      assert.is_true(largest <= 256, "a chunk of " .. largest .. " items")
      if pool.concurrency then -- (an iopool: one item a task, never a batch)
        assert.are.same({ n, 1 }, { chunks, largest })
        return
      end
      -- Chunking is on: fewer chunks than items.  How many fewer depends on
      -- the machine's load (a chunk's time counts its waits in queues); the
      -- sizes are tested on next_chunksize itself, below.  Only a loop this
      -- slow could excuse one item a chunk throughout: each chunk but the
      -- last window's then took over 1 ms (the 2 ms target makes 2 items of
      -- anything faster), with at most a window of chunks in flight at once.
      local window = 2 * pool.max_workers
      local slowest = (n - window) * 0.001 / window
      assert.is_true(chunks < n or took > slowest,
        ("%d chunks for 100,000 tiny items in %.1f s"):format(chunks, took))
    end)

    it("reads an infinite iterator lazily, a bounded window ahead, and stops at break", function()
      local read = 0
      local function naturals()
        read = read + 1
        return read
      end
      local last, bad = 0, nil
      for i, r in pool:imap(function(x) return x + 1 end, naturals) do
        if i ~= last + 1 or r ~= i + 1 then bad = bad or ("index %d result %s"):format(i, tostring(r)) end
        last = i
        if i == 50000 then break end
      end
      assert.is_nil(bad)
      assert.are.equal(50000, last)
      -- at most twice the workers chunks of at most 256 items in flight,
      -- besides the chunk being handed out (an iopool: concurrency items)
      local ahead = pool.concurrency and pool.concurrency + 1 or 5 * 256
      assert.is_true(read - 50000 <= ahead, ("read %d items for 50000 results"):format(read))
      local read_at_break = read
      luapool.sleep(0.05)
      assert.are.equal(read_at_break, read) -- nothing more read once the loop is left
    end)

    it("honours an explicit chunksize exactly", function()
      local got, chunks, n = positions(pool, range(1000), { chunksize = 7 })
      assert.are.equal(1000, n)
      assert.are.equal(143, chunks) -- 142 chunks of 7, one of 6
      local bad
      for i = 1, n do
        if got[i] ~= (i - 1) % 7 + 1 then bad = bad or ("item %d at position %d"):format(i, got[i]) end
      end
      assert.is_nil(bad)
    end)

    it("keeps an explicit buffersize as the bound of automatic chunks", function()
      local got, _, n = positions(pool, range(5000), { buffersize = 6 })
      assert.are.equal(5000, n)
      local largest = 0
      for i = 1, n do if got[i] > largest then largest = got[i] end end
      assert.is_true(largest <= 6, "a chunk of " .. largest .. " items")
    end)

    it("keeps an explicit buffersize as the bound of the items read ahead", function()
      local read = 0
      local function naturals()
        read = read + 1
        return read
      end
      local worst = 0
      for i in pool:imap(function(x) return x end, naturals, { buffersize = 6 }) do
        if read - i > worst then worst = read - i end
        if i == 5000 then break end
      end
      -- at most 6 items in flight, besides the rest of the chunk being
      -- handed out (at most 5 more)
      assert.is_true(worst <= 11, ("read %d items ahead of the loop"):format(worst))
    end)

    it("cuts an explicit chunksize larger than buffersize to fit the window", function()
      local read = 0
      local function naturals()
        read = read + 1
        return read
      end
      local worst = 0
      for i in pool:imap(function(x) return x end, naturals, { buffersize = 3, chunksize = 10 }) do
        if read - i > worst then worst = read - i end
        if i == 300 then break end
      end
      -- at most 3 in flight besides the rest of the chunk being handed out
      -- (2 more); chunks of 10 read 19 ahead
      assert.is_true(worst <= 5, ("read %d items ahead of the loop"):format(worst))
      local got, _, n = positions(pool, range(100), { buffersize = 3, chunksize = 10 })
      assert.are.equal(100, n)
      local largest = 0
      for i = 1, n do if got[i] > largest then largest = got[i] end end
      assert.are.equal(3, largest)
    end)

    it("makes every item its own task under a task_timeout, of the call or of the pool", function()
      local _, chunks, n = positions(pool, range(3000), { task_timeout = 30 })
      assert.are.same({ 3000, 3000 }, { n, chunks })
      local timed <close> = new_pool(kind, { task_timeout = 30 })
      _, chunks, n = positions(timed, range(3000))
      assert.are.same({ 3000, 3000 }, { n, chunks })
    end)
  end)
end

-- The rule behind imap's automatic chunk sizes, without timing: imap's
-- next_chunksize(chunk, k, elapsed), the size of the next chunk when the
-- current size is `chunk` and a chunk of k items took `elapsed` seconds
-- from submission to its results (a local of lua/luapool/executor.lua,
-- reached as an upvalue of pool.imap).
describe("imap's automatic chunk size", function()
  local next_chunksize
  setup(function()
    local pool <close> = new_pool("threadpool", { max_workers = 1 })
    for i = 1, math.huge do
      local name, v = debug.getupvalue(pool.imap, i)
      if name == nil then break end
      if name == "next_chunksize" then next_chunksize = v end
    end
    assert(type(next_chunksize) == "function", "pool.imap has no upvalue next_chunksize")
  end)

  it("doubles at most at a time and stays within 256 items, however fast the chunk", function()
    local sizes, chunk = {}, 1
    for _ = 1, 10 do
      chunk = next_chunksize(chunk, chunk, 1e-6)
      sizes[#sizes + 1] = chunk
    end
    assert.are.same({ 2, 4, 8, 16, 32, 64, 128, 256, 256, 256 }, sizes)
    assert.are.equal(256, next_chunksize(200, 200, 1e-6))
    assert.are.equal(2, next_chunksize(1, 1, 0)) -- a clock too coarse to see it
    assert.are.equal(256, next_chunksize(256, 256, 0))
  end)

  it("sizes the next chunk to take about 2 ms from the time a chunk took", function()
    assert.are.equal(32, next_chunksize(64, 64, 0.004))
    assert.are.equal(10, next_chunksize(10, 10, 0.002))
    assert.are.equal(13, next_chunksize(10, 10, 0.0015)) -- 13.3 items, rounded down
    assert.are.equal(4, next_chunksize(8, 2, 0.001)) -- a chunk sent before the size grew
    assert.are.equal(1, next_chunksize(1, 1, 0.0011)) -- 1.8 items: no growth past 1 ms
    assert.are.equal(1, next_chunksize(256, 256, 1)) -- slow tasks: one item a chunk
    assert.are.equal(1, next_chunksize(1, 1, 0.1))
    for _, c in ipairs { { 1, 1, 1e-6 }, { 10, 10, 0.0015 }, { 256, 256, 1 }, { 3, 3, 0 } } do
      assert.are.equal("integer", math.type(next_chunksize(c[1], c[2], c[3])))
    end
  end)
end)

describe("imap of slow tasks at default options", function()
  it("yields the first result after about one task, and keeps one item a chunk", function()
    local pool <close> = new_pool("threadpool")
    local count = 0
    local function slow(_)
      count = count + 1
      luapool.sleep(0.1)
      return count
    end
    local produced = 0
    local function items()
      produced = produced + 1
      return produced
    end
    local t0 = luapool.now()
    local first, positions_seen, n = nil, {}, 0
    for i, r in pool:imap(slow, items) do
      first = first or luapool.now() - t0
      n = n + 1
      assert.are.equal(1, r)
      if i == 12 then break end
    end
    assert.are.equal(12, n)
    -- 0.1 s of work; a chunk of even 16 such items would take 1.6 s
    assert.is_true(first < 1.2, ("first result after %.3f s"):format(first))
    -- each chunk took at least 0.1 s, so none grew beyond one item: read
    -- again, with the position in the chunk
    for _, p in pool:imap(slow, range(8)) do positions_seen[#positions_seen + 1] = p end
    assert.are.same({ 1, 1, 1, 1, 1, 1, 1, 1 }, positions_seen)
  end)
end)

describe("misuse errors of the Lua layer", function()
  local pool
  setup(function()
    pool = new_pool("threadpool", { max_workers = 1 })
    pool:shutdown()
  end)

  -- Each case calls pcall on the line it is written on; the error must name
  -- that line even when the call to the API is a tail call (its caller's
  -- frame is gone, and pcall, a C function, stands in its place).
  local function at(line, msg) return SRC .. ":" .. line .. ": " .. msg end

  it("name the line of map, starmap and imap after shutdown", function()
    local msg = "cannot submit after shutdown"
    local ok, err = pcall(function() return pool:map(print, { 1 }) end) local line = here()
    assert.are.same({ false, at(line, msg) }, { ok, err })
    ok, err = pcall(function() return pool:starmap(print, { { 1 } }) end) line = here()
    assert.are.same({ false, at(line, msg) }, { ok, err })
    ok, err = pcall(function() local r = pool:map(print, { 1 }) return r end) line = here()
    assert.are.same({ false, at(line, msg) }, { ok, err })
    ok, err = pcall(function() return (pool:imap(print, { 1 }))() end) line = here()
    assert.are.same({ false, at(line, msg) }, { ok, err })
    ok, err = pcall(function() for _ in pool:imap(print, { 1 }) do end end) line = here()
    assert.are.same({ false, at(line, msg) }, { ok, err })
    ok, err = pcall(pool.map, pool, print, { 1 }) line = here()
    assert.are.same({ false, at(line, msg) }, { ok, err })
  end)

  it("name the line of a pool shut down while an imap loop runs", function()
    local p <close> = new_pool("threadpool")
    local ok, err = pcall(function()
      for i in p:imap(function(x) return x end, range(100), { chunksize = 1 }) do
        if i == 1 then p:shutdown() end
      end
    end)
    assert.is_false(ok)
    assert.are.equal(at(here() - 5, "cannot submit after shutdown"), err)
  end)

  it("name the line of argument and option errors reached by a tail call", function()
    local open <close> = new_pool("threadpool", { max_workers = 1 })
    local _, err = pcall(function() return open:map(print, 5) end) local line = here()
    assert.are.equal(at(line, "bad argument #2 to 'map' (table expected, got number)"), err)
    _, err = pcall(function() return open:imap(print, 5) end) line = here()
    assert.are.equal(at(line, "bad argument #2 to 'imap' (table or iterator function expected, got number)"), err)
    _, err = pcall(function() return open:starmap(print, {}, { chunksize = 0 }) end) line = here()
    assert.are.equal(at(line, "bad option 'chunksize' to 'starmap' (positive integer expected, got 0)"), err)
    _, err = pcall(function() return open:map(print, {}, { foo = 1 }) end) line = here()
    assert.are.equal(at(line, "unknown option 'foo' to 'map'"), err)
    _, err = pcall(function() return luapool.wait({}, { return_when = 5 }) end) line = here()
    assert.are.equal(at(line, "bad option 'return_when' to 'wait' (ALL_COMPLETED, FIRST_COMPLETED or " ..
      "FIRST_EXCEPTION expected, got 5)"), err)
    _, err = pcall(function() return luapool.as_completed({ 1 }) end) line = here()
    assert.are.equal(at(line, "bad argument #1 to 'as_completed' (future expected at index 1, got number)"), err)
    local co = coroutine.create(print)
    _, err = pcall(function() return open:map(function(x) return x end, { co }) end) line = here()
    assert.are.equal(at(line, "cannot send item #1: a coroutine"), err)
  end)

  it("name the script's line when a done callback tail-calls map while map waits", function()
    -- the callback runs under chunk_into, called from the Lua layer: its
    -- frames are passed over, not named
    local script = h.tempfile([[
local p = threadpool.new { max_workers = 1 }
local q = threadpool.new { max_workers = 1 }
q:shutdown()
local f = p:submit(luapool.sleep, 0.1)
f:add_done_callback(function() return q:map(print, { 1 }) end)
local r = p:map(function(x) return x end, { 1, 2 })
print(#r)
]])
    local out, err, code = h.run({ script })
    os.remove(script)
    assert.are.equal(0, code)
    assert.are.equal("2\n", out)
    assert.are.equal("luapool: error in a done callback: " .. script .. ":6: cannot submit after shutdown",
      err:match("^[^\n]*"))
  end)

  it("name the line of a pool method called with a dot", function()
    local open <close> = new_pool("threadpool", { max_workers = 1 })
    local _, err = pcall(function() return open.map(print, { 1 }) end) local line = here()
    assert.are.equal(at(line, "calling 'map' on bad self (luapool.pool expected, got function: " ..
      "write pool:map(...), with a colon)"), err)
    _, err = pcall(function() local r = open.imap(print, { 1 }) return r end) line = here()
    assert.are.equal(at(line, "calling 'imap' on bad self (luapool.pool expected, got function: " ..
      "write pool:imap(...), with a colon)"), err)
    _, err = pcall(function() return open.starmap({}, print, { 1 }) end) line = here()
    assert.are.equal(at(line, "calling 'starmap' on bad self (luapool.pool expected, got table)"), err)
    -- the caller's line, not its caller's (that was named: helper-52)
    local function inner() local r = open.map(print, { 1 }) return r end line = here()
    _, err = pcall(function()
      local r = inner()
      return r
    end)
    assert.are.equal(at(line, "calling 'map' on bad self (luapool.pool expected, got function: " ..
      "write pool:map(...), with a colon)"), err)
  end)

  it("name the line of a bad progress setting, before anything is drawn or sent", function()
    local open <close> = new_pool("threadpool", { max_workers = 1 })
    local drawn = {}
    local out = function(s) drawn[#drawn + 1] = s end
    local _, err = pcall(function() return open:map(print, { 1 }, { progress = { interval = "x", output = out } }) end)
    local line = here() - 1
    assert.are.equal(at(line, "bad option 'progress' to 'map' (setting 'interval': non-negative number " ..
      "expected, got string)"), err)
    _, err = pcall(function() return open:imap(print, { 1 }, { progress = { output = 1 } }) end) line = here()
    assert.are.equal(at(line, "bad option 'progress' to 'imap' (setting 'output': function expected, got 1)"), err)
    _, err = pcall(function() local r = open:map(print, {}, { progress = { label = true } }) return r end)
    line = here() - 1
    assert.are.equal(at(line, "bad option 'progress' to 'map' (setting 'label': string expected, got boolean)"), err)
    assert.are.same({}, drawn)
    assert.are.equal(0, open:stats().done)
  end)
end)

-- An iopool runs many tasks at once on each loop: imap kept its window at
-- twice the loops (2 tasks in flight on one loop: 20 fetches of 0.3 s took
-- 3 s) and batched tiny items into one task, whose items then ran one after
-- another in one coroutine.  It now keeps `concurrency` tasks in flight, one
-- item each.
describe("imap on an iopool", function()
  it("keeps concurrency tasks in flight at once, one item each", function()
    local pool <close> = luapool.iopool.new { concurrency = 40 }
    assert.are.equal(40, pool.concurrency)
    -- Each item counts the items alive in the loop's state (the tasks of a
    -- loop share it) while it sleeps, and returns the most it saw.
    local function item()
      live = (live or 0) + 1 -- luacheck: ignore (the loop state's globals)
      if live > (peak or 0) then peak = live end -- luacheck: ignore
      luapool.sleep(0.3)
      live = live - 1 -- luacheck: ignore
      return peak -- luacheck: ignore
    end
    local most, n = 0, 0
    for _, seen in pool:imap(item, range(120)) do
      n = n + 1
      if seen > most then most = seen end
    end
    -- (items batched into one task would run one after another: fewer alive;
    -- the old window of two tasks gave 2; 30: a loop too busy to start all
    -- 40 within their 0.3 s)
    assert.are.equal(120, n)
    assert.is_true(most >= 30 and most <= 40, ("%d items alive at once"):format(most))
    assert.is_nil(luapool.threadpool.new { max_workers = 1 }.concurrency)
  end)
end)
