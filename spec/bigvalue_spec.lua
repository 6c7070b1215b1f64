-- Big values on a thread pool: a result string of LP_PIN_MIN (64 KiB) or
-- more is not copied into the reply; the reply refers to the worker's own
-- string, which the worker keeps until the owner has dropped the future
-- (core/future.h, "pinned strings").  Every way a reply's life can end:
-- read (once, twice), never read and collected, read after the pool
-- closed, cancelled, failed, errors carrying big values, many alive at
-- once, one string in many replies.  Each value is checked byte for byte.
local luapool = require "luapool"
local h = require "helper"

local KiB = 1024

-- A string of n bytes whose content says which one it is (and where),
-- made the same way here and, as an argument or upvalue, in a worker.
local function make(tag, n)
  local parts, len, i = {}, 0, 0
  while len < n do
    i = i + 1
    local p = ("%s:%08d|"):format(tag, i)
    parts[#parts + 1] = p
    len = len + #p
  end
  return (table.concat(parts)):sub(1, n)
end
local big = make

-- The worker's heap in KiB after a full collection there.
local function worker_kib(pool)
  return pool:submit(function()
    collectgarbage()
    collectgarbage()
    return collectgarbage("count")
  end):result(60)
end

describe("big strings from a threadpool", function()
  it("arrive exactly, at every size around the pinning threshold, and read twice", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local sizes = { 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 100 * KiB, 1024 * KiB, 3 * 1024 * KiB + 7 }
    local fs = {}
    for i, n in ipairs(sizes) do fs[i] = pool:submit(make, "s" .. i, n) end
    for i, n in ipairs(sizes) do
      local want = big("s" .. i, n)
      local got = fs[i]:result(60)
      assert.are.equal(n, #got)
      assert.is_true(got == want)
      assert.is_true(fs[i]:result(60) == want) -- decoded again from the same reply
    end
  end)

  it("arrive exactly inside tables, as keys, as several results and as upvalue-made closures' data", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local f = pool:submit(function(mk)
      local a, b = mk("a", 70 * KiB), mk("b", 200 * KiB)
      return a, { x = b, [b] = 1, list = { a, b, a } }, #a + #b, "small"
    end, make)
    local a, t, n, s = f:result(60)
    local wa, wb = big("a", 70 * KiB), big("b", 200 * KiB)
    assert.is_true(a == wa)
    assert.is_true(t.x == wb)
    assert.are.equal(1, t[wb])
    assert.is_true(t.list[1] == wa and t.list[2] == wb and t.list[3] == wa)
    assert.are.equal(270 * KiB, n)
    assert.are.equal("small", s)
  end)

  it("stay readable after the pool closed (<close> with every result unread)", function()
    local fs = {}
    do
      local pool <close> = luapool.threadpool.new { max_workers = 2 }
      for i = 1, 12 do fs[i] = pool:submit(make, "c" .. i, 300 * KiB) end
    end -- closed here: the workers' states are gone
    collectgarbage()
    for i = 12, 1, -1 do assert.is_true(fs[i]:result(0) == big("c" .. i, 300 * KiB)) end
    for i = 1, 12 do assert.is_true(fs[i]:result(0) == big("c" .. i, 300 * KiB)) end
  end)

  it("stay readable after shutdown when some were read and some collected unread", function()
    local pool = luapool.threadpool.new { max_workers = 2 }
    local fs = {}
    for i = 1, 20 do fs[i] = pool:submit(make, "d" .. i, 128 * KiB) end
    for i = 1, 20, 3 do assert.is_true(fs[i]:result(60) == big("d" .. i, 128 * KiB)) end
    for i = 2, 20, 3 do fs[i]:result(60); fs[i] = nil end -- read, then dropped
    for i = 3, 20, 3 do fs[i]:exception(60); fs[i] = nil end -- never decoded, dropped
    collectgarbage()
    collectgarbage()
    pool:shutdown { wait = true }
    collectgarbage()
    for i = 1, 20, 3 do assert.is_true(fs[i]:result(0) == big("d" .. i, 128 * KiB)) end
  end)

  it("let the worker free them once the futures are gone, read or not", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local before = worker_kib(pool)
    local fs = {}
    for i = 1, 24 do fs[i] = pool:submit(make, "e" .. i, 1024 * KiB) end
    for i = 1, 24, 2 do assert.is_true(fs[i]:result(60) == big("e" .. i, 1024 * KiB)) end
    fs[24]:exception(60)
    -- unread or read, the futures hold them: the worker still has them all
    assert.is_true(worker_kib(pool) >= before + 24 * 1024)
    fs = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    -- (generous: a worker's own state is a few hundred KiB)
    assert.is_true(worker_kib(pool) < before + 8 * 1024)
  end)

  it("are the same bytes when many replies return one string of the worker", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    pool:submit(function(mk) _G.KEPT = mk("k", 512 * KiB) end, make):result(60)
    local fs = {}
    for i = 1, 30 do fs[i] = pool:submit(function() return _G.KEPT, _G.KEPT end) end
    local want = big("k", 512 * KiB)
    for i = 30, 1, -1 do
      local a, b = fs[i]:result(60)
      assert.is_true(a == want and b == want)
      if i % 2 == 0 then fs[i] = nil end
    end
    collectgarbage()
    pool:submit(function() _G.KEPT = nil end):result(60) -- the worker drops its own
    pool:shutdown { wait = true }
    collectgarbage()
    for i = 1, 30, 2 do assert.is_true((fs[i]:result(0)) == want) end
  end)

  it("hold many at once, distinct, read in any order", function()
    local pool <close> = luapool.threadpool.new { max_workers = 3 }
    local fs = {}
    for i = 1, 64 do fs[i] = pool:submit(make, "m" .. i, 256 * KiB + i) end
    luapool.wait(fs, nil, 60)
    for i = 64, 1, -1 do assert.is_true(fs[i]:result(0) == big("m" .. i, 256 * KiB + i)) end
    local seen = 0
    for f in luapool.as_completed(fs, 60) do
      local s = f:result(0)
      local i = math.tointeger(tonumber(s:match("^m(%d+):")))
      assert.is_true(s == big("m" .. i, 256 * KiB + i))
      seen = seen + 1
    end
    assert.are.equal(64, seen)
  end)

  it("arrive through map and imap", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local tags = {}
    for i = 1, 10 do tags[i] = "p" .. i end
    local rs = pool:map(function(tag) return make(tag, 80 * KiB) end, tags)
    for i = 1, 10 do assert.is_true(rs[i] == big("p" .. i, 80 * KiB)) end
    local n = 0
    for i, s in pool:imap(function(tag) return make(tag, 70 * KiB) end, tags) do
      n = n + 1
      assert.are.equal(n, i)
      assert.is_true(s == big("p" .. i, 70 * KiB))
    end
    assert.are.equal(10, n)
  end)

  it("travel in an error's value, and a big message travels as text", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local f = pool:submit(function() error({ blob = make("v", 90 * KiB) }) end)
    local e = h.result_error(f, 60)
    assert.are.equal("task", e.kind)
    assert.is_true(e.value.blob == big("v", 90 * KiB))
    local g = pool:submit(function() error(make("w", 100 * KiB), 0) end)
    local e2 = h.result_error(g, 60)
    assert.is_true(e2.message == big("w", 100 * KiB))
    assert.is_true(e2.value == big("w", 100 * KiB))
  end)

  it("are never made for a cancelled task, and a finished one's survives a cancel", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local gate = os.tmpname()
    local blocker = pool:submit(function(path)
      while io.open(path) do luapool.sleep(0.005) end
      return make("b", 100 * KiB)
    end, gate)
    local queued = pool:submit(make, "q", 100 * KiB)
    assert.is_true(queued:cancel())
    os.remove(gate)
    assert.is_true(blocker:result(60) == big("b", 100 * KiB))
    assert.is_false(blocker:cancel())
    assert.is_true(blocker:result(0) == big("b", 100 * KiB))
    assert.are.equal("cancelled", h.result_error(queued, 0).kind)
    assert.is_true(pool:submit(make, "after", 100 * KiB):result(60) == big("after", 100 * KiB))
  end)

  it("go with a reply its deadline replaced", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    -- one C call past the deadline (nothing stops it midway): the result is
    -- encoded, then the reply becomes a timeout and the string goes with it
    -- (the deadline is map's, for that call only: the checks after it have none)
    local ok, e = pcall(pool.map, pool, function() return string.rep("x", 64 << 20) end, { 1 },
      { task_timeout = 0.05 })
    assert.is_false(ok)
    assert.are.equal("timeout", e.kind)
    assert.are.equal("item #1 exceeded its deadline of 0.05 seconds in worker threadpool-1", e.message)
    e = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    assert.is_true(pool:submit(make, "t", 100 * KiB):result(60) == big("t", 100 * KiB))
    assert.is_true(worker_kib(pool) < 16 * 1024) -- the 64 MiB are gone
  end)

  it("leave a collector the task stopped stopped", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local f = pool:submit(function(mk)
      collectgarbage("stop")
      return mk("g", 100 * KiB)
    end, make)
    assert.is_true(f:result(60) == big("g", 100 * KiB))
    f = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    -- the next task's sweep lets the string go, and does not restart the collector
    assert.is_false(pool:submit(function() return collectgarbage("isrunning") end):result(60))
    pool:submit(function() collectgarbage("restart") end):result(60)
  end)

  it("refuse a reference decoded anywhere but a pinned reply", function()
    -- tag 16 is a pinned string's: luapool.codec.decode never takes it
    local msg = string.pack("<I4B", 1, 16) .. string.pack("<I8", 5) .. string.rep("\0", 8)
    assert.are.equal("malformed message: unknown tag 16", h.error_of(luapool.codec.decode, msg))
  end)
end)

-- A thread worker's state takes its blocks of 256 KiB or more from a heap of
-- its own: regions of 32 MiB given to huge pages, a block bigger than a
-- region a mapping of its own (base/alloc.h, "big blocks").  What its Lua
-- makes there must be exactly what it made, whatever the path (a new block,
-- a buffer growing in place or moving, a table's array growing and
-- shrinking back below the threshold); what it frees goes back to the
-- system but one region; and none of it outlives the pool, except the
-- strings unread results still refer to.
local MiB = 1024 * KiB
-- n bytes made quickly from a tagged 1 KiB piece (make is slow past MiBs).
local function fast(tag, n)
  local piece = make(tag, KiB)
  return piece:rep(n // KiB) .. piece:sub(1, n % KiB)
end

describe("a thread worker's big blocks", function()
  it("hold exactly what the worker made, at every size around the threshold and a region's", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    -- A string's block is its length plus 25 bytes (Lua 5.4's header and
    -- terminator): these straddle 256 KiB, a region's 32 MiB (its blocks
    -- carry 32 bytes of their own, and take whole pages) and go past it.
    local sizes = { 256 * KiB - 26, 256 * KiB - 25, 256 * KiB, 3 * MiB + 1, 32 * MiB - 57, 32 * MiB - 56,
                    33 * MiB + 5 }
    local fs = {}
    for i, n in ipairs(sizes) do fs[i] = pool:submit(fast, "z" .. i, n) end
    for i, n in ipairs(sizes) do
      local got = fs[i]:result(60)
      assert.are.equal(n, #got)
      assert.is_true(got == fast("z" .. i, n))
    end
  end)

  it("grow and shrink in place or by moving, with their bytes", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local s, t, u, v = pool:submit(function(mk)
      -- a buffer doubling from 1 KiB to 8 MiB (grown in place while the
      -- pages after it are free, else moved), next to blocks that stay
      local parts, keep = {}, {}
      for i = 1, 8 * 1024 do
        parts[i] = mk("g" .. i % 7, KiB)
        if i % 1024 == 0 then keep[#keep + 1] = ("k"):rep(300 * KiB + i) end
      end
      local joined = table.concat(parts)
      -- a table's array past the threshold, then shrunk below it by a rehash
      local big_t, small_t = {}, {}
      for i = 1, 40000 do big_t[i], small_t[i] = i * 3, i end
      for i = 40000, 11, -1 do small_t[i] = nil end
      collectgarbage()
      small_t.x = "rehashed"
      return joined, big_t, small_t, keep
    end, make):result(60)
    assert.are.equal(8 * MiB, #s)
    for i = 1, 8 * 1024, 997 do assert.is_true(s:sub((i - 1) * KiB + 1, i * KiB) == make("g" .. i % 7, KiB)) end
    assert.are.equal(40000, #t)
    for i = 1, 40000 do assert.are.equal(i * 3, t[i]) end
    assert.are.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, x = "rehashed" }, u)
    assert.are.equal(8, #v)
    for i = 1, 8 do assert.is_true(v[i] == ("k"):rep(300 * KiB + i * 1024)) end
  end)

  it("stay readable after the pool closed, in a region among freed blocks and in a mapping of their own",
    function()
      local sizes = { 300 * KiB, 20 * MiB, 40 * MiB }
      local fs = {}
      do
        local pool <close> = luapool.threadpool.new { max_workers = 1 }
        for i, n in ipairs(sizes) do
          fs[i] = pool:submit(function(mk, tag, len)
            do -- blocks freed around the result's
              local junk = {}
              for j = 1, 6 do junk[j] = ("j"):rep(MiB + j) end
              assert(#junk == 6)
            end
            collectgarbage()
            return mk(tag, len)
          end, fast, "c" .. i, n)
        end
        luapool.wait(fs, nil, 60)
      end -- closed: every block but the results' went with the state
      collectgarbage()
      for i = #sizes, 1, -1 do assert.is_true(fs[i]:result(0) == fast("c" .. i, sizes[i])) end
      for i = 1, #sizes do assert.is_true(fs[i]:result(0) == fast("c" .. i, sizes[i])) end
    end)

  it("go back to the system once freed, but for one region a worker keeps", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local before, held, after = pool:submit(function()
      local function rss() return tonumber(io.open("/proc/self/status"):read("a"):match("VmRSS:%s*(%d+)")) // 1024 end
      collectgarbage()
      local r0 = rss()
      local r1
      do
        local t = {}
        for i = 1, 96 do t[i] = ("b"):rep(MiB + i) end
        r1 = assert(#t == 96) and rss()
      end
      collectgarbage()
      collectgarbage()
      return r0, r1, rss()
    end):result(60)
    assert.is_true(held >= before + 96, ("held %d MiB from %d"):format(held, before))
    -- (a malloc arena would have kept all 96 MiB: generous, a region is 32)
    assert.is_true(after <= before + 40, ("kept %d MiB from %d"):format(after, before))
  end)

  it("are all gone when the pool closes (luapool's own host)", function()
    local out, err, code = h.run({ "-e", [[
      local function rss() return tonumber(io.open("/proc/self/status"):read("a"):match("VmRSS:%s*(%d+)")) // 1024 end
      collectgarbage()
      local r0 = rss()
      do
        local pool <close> = luapool.threadpool.new { max_workers = 2 }
        local fs = {}
        for i = 1, 2 do
          fs[i] = pool:submit(function()
            local t = {}
            for j = 1, 48 do t[j] = ("a"):rep((1 << 20) + j) end
            return #t
          end)
        end
        for i = 1, 2 do assert(fs[i]:result(60) == 48) end
      end
      collectgarbage()
      print(rss() - r0)
    ]] })
    assert.are.equal("", err)
    assert.are.equal(0, code)
    -- (malloc's arenas, under the host's policy, would have kept the 96 MiB)
    assert.is_true(math.tointeger(tonumber(out)) <= 16, out)
  end)
end)

-- A thread worker whose unread results hold 8 MiB or more of its strings
-- waits before its next task while the owner is reading (threadpool.c,
-- pacing), and goes on when the owner blocks on a future, stops reading,
-- or after 50 ms.  How fast is for scripts/bench; here: whatever the
-- script does, every result arrives, exactly, and nothing stalls (a pace
-- that waited for a read that never comes would time these out).
describe("thread workers paced by the owner's reads of their big strings", function()
  -- (string.rep: cheap enough to make twice per value, and still says which it is)
  local function rmake(tag, n) return ((tag .. "|"):rep(n // (#tag + 1) + 1)):sub(1, n) end
  local function submit_all(pool, tag, n)
    local fs = {}
    for i = 1, n do fs[i] = pool:submit(rmake, tag .. i, MiB) end
    return fs
  end
  local function check_all(fs, tag, order)
    for _, i in ipairs(order) do assert.is_true(fs[i]:result(60) == rmake(tag .. i, MiB), tag .. i) end
  end
  local function upto(n, step)
    local t = {}
    for i = step > 0 and 1 or n, step > 0 and n or 1, step do t[#t + 1] = i end
    return t
  end

  it("finish every task when the owner only waits for them", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local fs = submit_all(pool, "w", 24)
    local done = luapool.wait(fs, nil, 60)
    assert.are.equal(24, #done)
    check_all(fs, "w", upto(24, 1))
  end)

  it("finish every task when the owner reads a few, then computes without waiting", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local fs = submit_all(pool, "c", 24)
    check_all(fs, "c", { 1, 2, 3 }) -- (the workers are pacing now)
    local deadline, x = luapool.now() + 60, 0
    local function all_done()
      for i = 1, 24 do if not fs[i]:done() then return false end end
      return true
    end
    while not all_done() and luapool.now() < deadline do
      for j = 1, 10000 do x = x + j % 7 end -- no wait, no read
    end
    assert.is_true(all_done())
    check_all(fs, "c", upto(24, 1))
  end)

  it("deliver exactly when read last first, and in order again", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local fs = submit_all(pool, "r", 24)
    check_all(fs, "r", upto(24, -1))
    check_all(fs, "r", upto(24, 1))
  end)

  it("deliver exactly from two pools read in turn", function()
    local a <close> = luapool.threadpool.new { max_workers = 2 }
    local b <close> = luapool.threadpool.new { max_workers = 1 }
    local fa, fb = submit_all(a, "a", 16), submit_all(b, "b", 16)
    for i = 1, 16 do
      check_all(fa, "a", { i })
      check_all(fb, "b", { 17 - i })
    end
  end)

  it("let a shutdown that waits finish the tasks the owner has not read", function()
    local pool = luapool.threadpool.new { max_workers = 2 }
    local fs = submit_all(pool, "s", 24)
    check_all(fs, "s", { 1, 2, 3, 4 })
    pool:shutdown { wait = true }
    for i = 1, 24 do assert.is_true(fs[i]:done(), "s" .. i) end
    check_all(fs, "s", upto(24, 1))
  end)

  it("deliver exactly through map and as_completed", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local tags = {}
    for i = 1, 20 do tags[i] = "m" .. i end
    local out = pool:map(function(tag) return rmake(tag, MiB) end, tags)
    for i = 1, 20 do assert.is_true(out[i] == rmake("m" .. i, MiB), "m" .. i) end
    local fs = submit_all(pool, "q", 20)
    local seen = 0
    for f in luapool.as_completed(fs, 60) do
      local v = f:result(0)
      local i = math.tointeger(tonumber(v:match("^q(%d+)|")))
      assert.is_true(v == rmake("q" .. i, MiB))
      seen = seen + 1
    end
    assert.are.equal(20, seen)
  end)
end)

describe("big strings on a processpool", function()
  it("arrive exactly (copied: no process takes another's addresses)", function()
    local pool <close> = luapool.processpool.new { max_workers = 1 }
    local fs = {}
    for i = 1, 3 do fs[i] = pool:submit(make, "r" .. i, 300 * KiB) end
    for i = 1, 3 do assert.is_true(fs[i]:result(60) == big("r" .. i, 300 * KiB)) end
  end)
end)
