-- The value codec: luapool.codec.encode/decode in the same state, and the
-- same values carried through real workers of both pools.
-- luacheck: globals LUAPOOL_CODEC_SPEC_GLOBAL
local luapool = require "luapool"
local helper = require "helper"
local error_of = helper.error_of

local codec = luapool.codec

local function pack(...) return { n = select("#", ...), ... } end

-- Where a function was defined, as the refusal messages name it.
local function where(fn)
  local info = debug.getinfo(fn, "S")
  return ("<%s:%d>"):format(info.short_src, info.linedefined)
end

-- A chain of n tables, each the field x of the previous one.
local function nest(n)
  local root = {}
  local cur = root
  for _ = 2, n do
    cur.x = {}
    cur = cur.x
  end
  return root
end

-- Crafted bytes: one value, a chain of n nested tables (each with one array
-- item, the next table; the last one empty).
local function crafted_nest(n)
  return "\1\0\0\0" .. string.rep("\8" .. string.pack("<I4I4", 1, 0), n - 1) ..
    "\8" .. string.pack("<I4I4", 0, 0) .. "\0" .. string.rep("\0", n - 1)
end

-- Runs a Lua script in a separate luapool process (a crash there fails the
-- test instead of the whole spec run).
local function run_script(src)
  local path = helper.tempfile(src)
  local out, err, status = helper.run({ path })
  os.remove(path)
  return out, err, status
end

-- After a case that made the collector step at every allocation
-- (collectgarbage("incremental", 0, 1000) returned mode).
local function restore_collector(mode)
  collectgarbage("incremental", 200, 100) -- Lua 5.4's defaults
  if mode == "generational" then collectgarbage("generational") end
end

local function float_bits(x) return string.pack("<d", x) end

-- FNV-1a (64 bits), the checksum the codec puts before function bytecode;
-- as source text too, for the scripts run in a separate process.
local FNV1A_SOURCE = [[
local function fnv1a(s)
  local h = 0xcbf29ce484222325
  for i = 1, #s do h = (h ~ s:byte(i)) * 0x100000001b3 end
  return h
end
]]
local fnv1a = load(FNV1A_SOURCE .. "return fnv1a")()

local all_bytes = {}
for i = 0, 255 do all_bytes[#all_bytes + 1] = string.char(i) end
all_bytes = table.concat(all_bytes)

-- Every carrier offers run(fn, ...): fn called on carried copies of fn and
-- its arguments, its results carried back.
local carriers = {
  {
    name = "codec.encode/decode in the same state",
    kind = "codec",
    open = function()
      return function(fn, ...)
        local v = pack(codec.decode(codec.encode(fn, ...)))
        return codec.decode(codec.encode(v[1](table.unpack(v, 2, v.n))))
      end
    end,
  },
  {
    name = "a threadpool worker",
    kind = "threadpool",
    open = function(pool)
      return function(fn, ...) return pool:submit(fn, ...):result(60) end
    end,
  },
  {
    name = "a processpool worker",
    kind = "processpool",
    open = function(pool)
      return function(fn, ...) return pool:submit(fn, ...):result(60) end
    end,
  },
}

for _, carrier in ipairs(carriers) do
  describe("values through " .. carrier.name, function()
    local pool, run
    local function send(...) return run(function(...) return ... end, ...) end

    lazy_setup(function()
      if carrier.kind ~= "codec" then
        pool = luapool[carrier.kind].new { max_workers = 2 }
      end
      run = carrier.open(pool)
    end)

    lazy_teardown(function()
      if pool then pool:shutdown() end
    end)

    describe("scalars", function()
      it("keeps nil and booleans, trailing nils included", function()
        local v = pack(send(nil, true, false, nil, nil))
        assert.are.equal(5, v.n)
        assert.is_nil(v[1])
        assert.is_true(v[2])
        assert.is_false(v[3])
        assert.is_nil(v[4])
        assert.is_nil(v[5])
        assert.are.equal(0, select("#", send()))
      end)

      it("keeps the integer and float subtypes", function()
        local a, b = send(3, 3.0)
        assert.are.equal("integer", math.type(a))
        assert.are.equal("float", math.type(b))
        assert.are.equal(3, a)
        assert.are.equal(3.0, b)
        local ta, tb = run(function(x, y) return math.type(x), math.type(y) end, 3, 3.0)
        assert.are.equal("integer", ta)
        assert.are.equal("float", tb)
      end)

      it("keeps math.maxinteger, math.mininteger and 2^53 + 1 exactly", function()
        local big, small, odd = send(math.maxinteger, math.mininteger, (1 << 53) + 1)
        assert.are.equal(math.maxinteger, big)
        assert.are.equal(math.mininteger, small)
        assert.are.equal(9007199254740993, odd)
        assert.are.equal("integer", math.type(big))
        assert.are.equal("integer", math.type(small))
        assert.is_true(run(function(x, y) return x == math.maxinteger and y == math.mininteger end,
          math.maxinteger, math.mininteger))
      end)

      it("keeps NaN, infinities, -0.0 and denormals", function()
        local nan, inf, ninf, nzero, tiny, tenth = send(0 / 0, math.huge, -math.huge, -0.0, 5e-324, 0.1)
        assert.is_true(nan ~= nan)
        assert.are.equal("float", math.type(nan))
        assert.are.equal(math.huge, inf)
        assert.are.equal(-math.huge, ninf)
        assert.are.equal(-math.huge, 1 / nzero)
        assert.are.equal("float", math.type(nzero))
        assert.are.equal(float_bits(5e-324), float_bits(tiny))
        assert.are.equal(float_bits(0.1), float_bits(tenth))
        local is_nan, inv = run(function(x, z) return x ~= x, 1 / z end, 0 / 0, -0.0)
        assert.is_true(is_nan)
        assert.are.equal(-math.huge, inv)
      end)

      it("keeps strings binary-safe: all 256 byte values, zeros, empty", function()
        local s, z, e = send(all_bytes, "a\0b\0\0", "")
        assert.are.equal(all_bytes, s)
        assert.are.equal("a\0b\0\0", z)
        assert.are.equal("", e)
        local n, b0, b255 = run(function(x) return #x, x:byte(1), x:byte(256) end, all_bytes)
        assert.are.equal(256, n)
        assert.are.equal(0, b0)
        assert.are.equal(255, b255)
      end)

      it("keeps strings at the length boundaries 255, 256, 65535, 65536, 65537", function()
        for _, len in ipairs { 254, 255, 256, 257, 65535, 65536, 65537 } do
          local s = string.rep("\0\255x", len // 3 + 1):sub(1, len)
          local back = send(s)
          assert.are.equal(len, #back)
          assert.are.equal(s, back)
          assert.are.equal(len, run(function(x) return #x end, s))
        end
      end)

      it("keeps luapool.int128 values, extremes included", function()
        local max = "170141183460469231731687303715884105727"
        local min = "-170141183460469231731687303715884105728"
        local a, b, c = send(luapool.int128(max), luapool.int128(min), luapool.int128(0))
        assert.are.equal(max, tostring(a))
        assert.are.equal(min, tostring(b))
        assert.are.equal("0", tostring(c))
        assert.are.equal("userdata", type(a))
        assert.are.equal("123456789012345678901234567891",
          run(function(v) return tostring(v + 1) end, luapool.int128("123456789012345678901234567890")))
        local doubled = run(function(v) return v * 2 end, luapool.int128("123456789012345678901234567890"))
        assert.are.equal("246913578024691357802469135780", tostring(doubled))
      end)
    end)

    describe("tables", function()
      it("keeps nested tables and mixed array/hash parts", function()
        local t = { 1, "two", 3.5, { "inner", { deep = true } }, x = "y", n = { m = { 42 } }, [10] = 10 }
        assert.are.same(t, send(t))
        assert.are.equal(42, run(function(v) return v.n.m[1] end, t))
      end)

      it("keeps every key of tables built in any order, wherever Lua put their integer keys", function()
        -- the encoder walks the hash part from the last array key when Lua
        -- holds keys 1..n in the array part, else from the start: tables
        -- whose keys 1..n sit in the hash part (built backwards, from
        -- hash keys first, with deletions) must lose nothing either way
        local seed = 7
        local function rnd(n)
          seed = (seed * 1103515245 + 12345) % 2147483648
          return seed % n + 1
        end
        local tables = {}
        for round = 1, 60 do
          local t, n = {}, rnd(40)
          for k = 1, rnd(6) - 1 do t["k" .. k] = k end
          if round % 3 == 0 then
            for i = n, 1, -1 do t[i] = i * 2 end
          elseif round % 3 == 1 then
            for i = 1, n do t[i] = i * 2 end
          else
            for _ = 1, n do t[rnd(n)] = round end
          end
          for _ = 1, rnd(4) - 1 do t[rnd(n)] = nil end
          if rnd(2) == 1 then t[n + rnd(5)] = "past" end
          t[0.5], t[-1] = "half", "minus"
          tables[round] = t
        end
        local back = send(tables)
        for round, t in ipairs(tables) do
          local count, got = 0, 0
          for k, v in pairs(t) do
            count = count + 1
            assert.are.equal(v, back[round][k], ("table %d, key %s"):format(round, tostring(k)))
          end
          for _ in pairs(back[round]) do got = got + 1 end
          assert.are.equal(count, got, ("table %d: key count"):format(round))
        end
      end)

      it("keeps the numbers of an array exact, integers and floats, among other values", function()
        -- (the array's numbers are read and written in place: bytecode.h)
        local pattern = { 1, 2.5, 0 / 0, math.mininteger, "s", { 3 }, true, 2 ^ 53, -0.0, math.maxinteger, 1e308 }
        local t = {}
        for i = 1, 3000 do t[i] = pattern[(i - 1) % #pattern + 1] end
        local back = send(t)
        assert.are.equal(3000, #back)
        for i = 1, 3000 do
          local want, got = t[i], back[i]
          if want ~= want then
            assert.is_true(got ~= got, "NaN at " .. i)
          elseif type(want) == "table" then
            assert.are.same(want, got)
          else
            assert.are.equal(math.type(want), math.type(got), "type at " .. i)
            assert.are.equal(want, got, "value at " .. i)
            if want == 0 then assert.are.equal(1 / want, 1 / got, "sign of zero at " .. i) end
          end
        end
      end)

      it("reads a table's array again after a finalizer run inside the encoder resized it", function()
        -- a new function in the array is dumped into a Lua buffer: that
        -- allocation may run a collection step, and a __gc finalizer that
        -- empties and rehashes the table being sent (its array freed); the
        -- numbers after the function must come from the table as it is now
        -- The collector steps at every allocation while the test runs (pause
        -- 0, a big step multiplier), so that the buffer's allocation meets a
        -- finalizer within a few attempts, whatever the build's allocator
        -- (under TSan 5,000 attempts at the default pace once met none).
        local mode = collectgarbage("incremental", 0, 1000)
        local target, fired = nil, 0
        local mt = { __gc = function()
          if target then
            local t = target
            target = nil
            fired = fired + 1
            for i = 3, 16 do t[i] = nil end
            for i = 1, 64 do t["k" .. i] = i end
          end
        end }
        for attempt = 1, 5000 do
          for _ = 1, 50 do setmetatable({}, mt) end
          local t = {}
          for i = 1, 16 do t[i] = i * 1000 end
          t[2] = load("local a = ... return a + " .. attempt .. string.rep(" + a * 2", 300))
          target = t
          local back = send(t)
          target = nil
          for i = 1, 16 do
            if i ~= 2 then
              assert.is_true(back[i] == nil or back[i] == i * 1000, ("entry %d is %s"):format(i, tostring(back[i])))
            end
          end
          if fired > 0 then break end
        end
        restore_collector(mode)
        assert.are.equal(1, fired)
      end)

      it("keeps holes", function()
        local t = send({ 1, nil, 3, nil, 5, [8] = 8 })
        assert.are.equal(1, t[1])
        assert.is_nil(t[2])
        assert.are.equal(3, t[3])
        assert.is_nil(t[4])
        assert.are.equal(5, t[5])
        assert.is_nil(t[6])
        assert.is_nil(t[7])
        assert.are.equal(8, t[8])
      end)

      it("sends a table shared between places as one table", function()
        local shared = { v = 1 }
        local t = { shared, shared, k = shared }
        local r = send(t)
        assert.is_true(rawequal(r[1], r[2]))
        assert.is_true(rawequal(r[1], r.k))
        assert.are.equal(1, r[1].v)
        if carrier.kind ~= "codec" then assert.is_false(rawequal(r[1], shared)) end
        assert.is_true(run(function(x) return rawequal(x[1], x[2]) and rawequal(x[1], x.k) end, t))
        -- shared between two arguments of one call, and two results
        local a, b = send(shared, shared)
        assert.is_true(rawequal(a, b))
        assert.is_true(run(function(x, y) return rawequal(x, y) end, shared, shared))
      end)

      it("keeps cycles", function()
        local t = { name = "t" }
        t.self = t
        local a, b = { name = "a" }, { name = "b" }
        a.other, b.other = b, a
        local r, ra = send(t, a)
        assert.is_true(rawequal(r.self, r))
        assert.are.equal("t", r.name)
        assert.is_true(rawequal(ra.other.other, ra))
        assert.are.equal("b", ra.other.name)
        assert.is_true(run(function(x) return rawequal(x.self, x) end, t))
      end)

      it("copies metatables, with their metamethods", function()
        local class = { __index = { greet = function(self) return "hi " .. self.who end } }
        local obj = setmetatable({ who = "bob" }, class)
        local other = setmetatable({ who = "ann" }, class)
        local r, r2 = send(obj, other)
        assert.are.equal("hi bob", (r:greet()))
        assert.is_true(rawequal(getmetatable(r), getmetatable(r2)))
        assert.are.equal("hi ann", run(function(o) return o:greet() end, other))
        local fallback = setmetatable({}, { __index = function(_, k) return k .. "!" end })
        assert.are.equal("foo!", send(fallback).foo)
        local self_mt = {}
        setmetatable(self_mt, self_mt)
        local rs = send(self_mt)
        assert.is_true(rawequal(getmetatable(rs), rs))
      end)

      it("keeps float, boolean, integer-extreme and table keys", function()
        local key = { name = "key" }
        local t = {
          [2.5] = "two and a half", [-0.5] = "minus half",
          [true] = "yes", [false] = "no",
          [math.maxinteger] = "max", [math.mininteger] = "min",
          [key] = key,
        }
        local r = send(t)
        assert.are.equal("two and a half", r[2.5])
        assert.are.equal("minus half", r[-0.5])
        assert.are.equal("yes", r[true])
        assert.are.equal("no", r[false])
        assert.are.equal("max", r[math.maxinteger])
        assert.are.equal("min", r[math.mininteger])
        local tk, tv
        for k, v in pairs(r) do
          if type(k) == "table" then tk, tv = k, v end
        end
        assert.are.equal("key", tk.name)
        assert.is_true(rawequal(tk, tv))
        assert.are.equal("yes/no/two and a half",
          run(function(x) return x[true] .. "/" .. x[false] .. "/" .. x[2.5] end, t))
      end)
    end)

    describe("functions", function()
      it("carries closures with their captured locals and tables", function()
        local a, b = 40, "x"
        local cfg = { n = 5, list = { 1, 2, 3 } }
        local r1, r2, r3 = run(function() return a + 2, b, cfg.n * #cfg.list end)
        assert.are.equal(42, r1)
        assert.are.equal("x", r2)
        assert.are.equal(15, r3)
      end)

      it("carries standard C functions captured as upvalues", function()
        local fmt, pr, ins = string.format, print, table.insert
        local s, same_print, t = run(function()
          local l = {}
          ins(l, "a")
          ins(l, "b")
          return fmt("%03d|%s", 7, "x"), pr == print, table.concat(l)
        end)
        assert.are.equal("007|x", s)
        assert.is_true(same_print)
        assert.are.equal("ab", t)
        local back = send(string.format)
        assert.is_true(rawequal(string.format, back))
      end)

      it("carries recursive local functions", function()
        local function fact(n)
          if n <= 1 then return 1 end
          return n * fact(n - 1)
        end
        assert.are.equal(2432902008176640000, run(fact, 20))
        assert.are.equal(3628800, run(function(f) return f(10) end, fact))
      end)

      it("carries nested functions and functions as arguments", function()
        local function make_adder(k) return function(x) return x + k end end
        assert.are.equal(42, run(function(n) return make_adder(n)(1) end, 41))
        assert.are.equal(15, run(function(f, x) return f(x) end, function(x) return x * 3 end, 5))
        local ops = { double = function(x) return 2 * x end, square = function(x) return x * x end }
        assert.are.equal(2 * 7 + 49, run(function(o, x) return o.double(x) + o.square(x) end, ops, 7))
      end)

      it("brings back a function made by the task", function()
        local g = run(function()
          local k = 7
          return function(x) return x + k end
        end)
        assert.are.equal("function", type(g))
        assert.are.equal(8, (g(1)))
      end)

      it("preserves every returned value, nils included", function()
        local v = pack(run(function() return 1, nil, "three", nil end))
        assert.are.equal(4, v.n)
        assert.are.equal(1, v[1])
        assert.is_nil(v[2])
        assert.are.equal("three", v[3])
        assert.is_nil(v[4])
      end)

      it("does not write upvalues back to the sender", function()
        local counter = 0
        local state = { n = 0 }
        local r1, r2 = run(function()
          counter = counter + 1
          state.n = 5
          return counter, state.n
        end)
        assert.are.equal(1, r1)
        assert.are.equal(5, r2)
        assert.are.equal(0, counter)
        assert.are.equal(0, state.n)
      end)

      it("gives _ENV the receiver's globals", function()
        _G.LUAPOOL_CODEC_SPEC_GLOBAL = "main"
        local seen, has_string, fmt = run(function()
          return LUAPOOL_CODEC_SPEC_GLOBAL, type(string), string.format("%d", 5)
        end)
        _G.LUAPOOL_CODEC_SPEC_GLOBAL = nil
        if carrier.kind == "codec" then
          assert.are.equal("main", seen)
        else
          assert.is_nil(seen)
        end
        assert.are.equal("table", has_string)
        assert.are.equal("5", fmt)
      end)

      it("carries kernels", function()
        assert.are.equal("328350", tostring(run(luapool.kernels.sum_squares, 100)))
        assert.are.equal("285", run(function(k) return tostring(k(10)) end, luapool.kernels.sum_squares))
        assert.is_true(rawequal(luapool.kernels.sum_squares, send(luapool.kernels.sum_squares)))
      end)

      it("carries library tables by name", function()
        local same_string, same_luapool, kind = run(function(s, l)
          return rawequal(s, string), rawequal(l, package.loaded.luapool), l.current_worker().kind
        end, string, luapool)
        assert.is_true(same_string)
        assert.is_true(same_luapool)
        assert.are.equal(({ codec = "main", threadpool = "thread", processpool = "process" })[carrier.kind], kind)
      end)

      it("runs the same function 1000 times", function()
        local base = 3
        local function f(x) return x * 2 + base end
        local total = 0
        if pool then
          local fs = {}
          for i = 1, 1000 do fs[i] = pool:submit(f, i) end
          for i = 1, 1000 do total = total + fs[i]:result(60) end
        else
          for i = 1, 1000 do total = total + run(f, i) end
        end
        assert.are.equal(1000 * 1001 + 3000, total)
      end)

      it("keeps upvalues shared between functions shared (sum and add)", function()
        local total = 0
        local function add(x) total = total + x end
        local function sum(t)
          total = 0
          for _, x in ipairs(t) do add(x) end
          return total
        end
        assert.are.equal(6, sum { 1, 2, 3 })
        assert.are.equal(6, run(sum, { 1, 2, 3 }))
        assert.are.equal(10, run(function(f, t) return f(t) end, sum, { 1, 2, 3, 4 }))
        -- the sender's copy is not touched
        total = 100
        assert.are.equal(3, run(sum, { 1, 2 }))
        assert.are.equal(100, total)
      end)

      it("runs a tokenizer whose helpers share the position", function()
        local src, pos = "", 1
        local function peek() return src:sub(pos, pos) end
        local function advance() pos = pos + 1 end
        local function tokenize(s)
          src, pos = s, 1
          local out, steps = {}, 0
          while pos <= #src do
            steps = steps + 1
            if steps > 1000 then return "stuck at " .. pos end -- (it looped forever)
            if peek():match("%d") then
              local start = pos
              while peek():match("%d") do advance() end
              out[#out + 1] = src:sub(start, pos - 1)
            else
              out[#out + 1] = peek()
              advance()
            end
          end
          return out
        end
        assert.are.same({ "12", "+", "345", "*", "6" }, run(tokenize, "12+345*6"))
      end)

      it("brings back two closures made together still sharing their local", function()
        local get, set = run(function()
          local n = 0
          return function() return n end, function(v) n = v end
        end)
        assert.are.equal(0, get())
        set(5)
        assert.are.equal(5, get())
        -- and sends two such closures, as two values of one message
        local count = 0
        local function inc() count = count + 1 end
        local function value() return count end
        local i2, v2 = send(inc, value)
        i2()
        i2()
        assert.are.equal(2, v2())
        assert.are.equal(0, count)
        assert.are.equal(3, run(function(i, v) i() i() i() return v() end, inc, value))
      end)

      it("keeps sharing through mutual recursion and a function met inside its own upvalue", function()
        local a, b
        function a(n) if n == 0 then return "a" end return b(n - 1) end
        function b(n) if n == 0 then return "b" end return a(n - 1) end
        assert.are.equal("b", run(a, 5))
        assert.are.equal("a", run(b, 5))
        local a2, b2 = send(a, b)
        assert.are.equal("a", a2(4))
        assert.are.equal("b", b2(4))
        -- the shared upvalue t is met again (in g) while t's value is still
        -- being written: g must still share it with f
        local t
        local function f() return t end
        t = { g = function(v) t = v end }
        local f2 = send(f)
        local tt = f2()
        assert.are.equal("function", type(tt.g))
        tt.g(42)
        assert.are.equal(42, f2())
        assert.are.equal(7, run(function(h)
          h().g(7)
          return h()
        end, f))
        assert.are.equal("table", type(t))
      end)

      it("keeps _ENV the receiver's globals next to shared upvalues", function()
        local n = 0
        local function bump() n = n + 1 return type(string) end
        local function read() return n, type(print) end
        assert.are.same({ 2, "function" }, { run(function()
          bump()
          bump()
          return read()
        end) })
      end)

      it("carries a linked list of 100,000 nodes both ways, exact to the end", function()
        local list
        for i = 1, 100000 do list = { v = i, next = list } end
        local n, first, last, total = run(function(l)
          local c, f, v, s = 0, l.v, nil, 0
          while l do
            c, v, s = c + 1, l.v, s + l.v
            l = l.next
          end
          return c, f, v, s
        end, list)
        assert.are.equal(100000, n)
        assert.are.equal(100000, first)
        assert.are.equal(1, last)
        assert.are.equal(100000 * 100001 // 2, total)
        local back = run(function(k)
          local l
          for i = 1, k do l = { v = i, next = l } end
          return l
        end, 100000)
        local c, v = 0, nil
        while back do
          c, v = c + 1, back.v
          back = back.next
        end
        assert.are.equal(100000, c)
        assert.are.equal(1, v)
      end)

      it("gives each decoded copy its own upvalues", function()
        local n = 1
        local function get() return n end
        local function set(v) n = v end
        local g1 = send(get)
        set(2)
        local g2 = send(get)
        assert.are.equal(2, (g2()))
        assert.are.equal(1, (g1()))
        assert.is_false(rawequal(g1, g2))
      end)
    end)
  end)
end

describe("functions made by different worker processes", function()
  it("stay distinct when they come back", function()
    local pool <close> = luapool.processpool.new { max_workers = 2 }
    local fa = pool:submit(function()
      luapool.sleep(0.3)
      return function() return "A" end, luapool.current_worker().pid
    end)
    local fb = pool:submit(function()
      luapool.sleep(0.3)
      return function() return "B" end, luapool.current_worker().pid
    end)
    local a, pa = fa:result(60)
    local b, pb = fb:result(60)
    assert.are_not.equal(pa, pb) -- two processes made them
    assert.are.equal("A", (a()))
    assert.are.equal("B", (b()))
  end)
end)

describe("functions kept by a worker", function()
  for _, kind in ipairs(helper.engines) do
    it("are not changed when a later task gets the same function (" .. kind .. ")", function()
      local pool <close> = luapool[kind].new { max_workers = 1 }
      local n = 1
      local function get() return n end
      local function set(v) n = v end
      assert.are.equal(1, pool:submit(function(cb)
        _G.kept = cb
        return cb()
      end, get):result(60))
      set(2)
      local kept, now, same = pool:submit(function(cb)
        return _G.kept(), cb(), rawequal(_G.kept, cb)
      end, get):result(60)
      assert.are.equal(2, now)
      assert.are.equal(1, kept)
      assert.is_false(same)
    end)
  end
end)

describe("shared upvalues in a batch", function()
  for _, kind in ipairs(helper.engines) do
    it("keep the helpers of a map's function sharing their state, every call (" .. kind .. ")", function()
      local pool <close> = luapool[kind].new { max_workers = 2 }
      local acc = 0
      local function reset() acc = 0 end
      local function push(x) acc = acc + x end
      local function triangle(n)
        reset()
        for i = 1, n do push(i) end
        return acc
      end
      assert.are.same({ 1, 3, 6, 10, 15, 21 }, pool:map(triangle, { 1, 2, 3, 4, 5, 6 }, { chunksize = 3 }))
      assert.are.same({ 1, 3, 6, 10 }, pool:map(triangle, { 1, 2, 3, 4 }))
      local got = {}
      for i, r in pool:imap(triangle, { 4, 5 }, { chunksize = 2 }) do got[i] = r end
      assert.are.same({ 10, 15 }, got)
    end)
  end
end)

describe("deep nesting", function()
  it("carries a million levels through the codec", function()
    local root = {}
    local cur = root
    for i = 1, 1000000 do
      cur.next = { i = i }
      cur = cur.next
    end
    local back = codec.decode(codec.encode(root))
    local d, last = 0, nil
    back = back.next
    while back do
      d, last = d + 1, back.i
      back = back.next
    end
    assert.are.equal(1000000, d)
    assert.are.equal(1000000, last)
  end)
end)

describe("the message buffer", function()
  it("is kept after an error raised between taking and releasing it", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    -- Lua memory allocated by 1000 encodes (a reused buffer allocates none)
    local function growth()
      collectgarbage()
      collectgarbage("stop")
      local before = collectgarbage("count")
      for _ = 1, 1000 do codec.encode(1) end
      local d = collectgarbage("count") - before
      collectgarbage("restart")
      return d
    end
    growth()
    -- an argument list too long for the Lua stack: raised while the
    -- chunk's message is being written
    local args = {}
    for i = 1, 1000001 do args[i] = i end
    assert.is_false(pcall(pool.starmap, pool, print, { args }))
    args = nil -- luacheck: ignore 311
    -- (a fresh buffer per encode, the old behaviour, took 140 KiB here)
    assert.is_true(growth() < 16, "each encode allocated a buffer of its own")
    assert.are.equal(3, pool:submit(function(x) return x end, 3):result(60))
  end)
end)

describe("the encoder's and decoder's shortcuts", function()
  it("keep a value met twice, a cycle and a reference to the first table (it waits in its slot)", function()
    local t = {}
    local a, b = codec.decode(codec.encode(t, t))
    assert.are.same({}, a)
    assert.is_true(rawequal(a, b))
    local c = {}
    c.me = c
    local d = codec.decode(codec.encode(c))
    assert.is_true(rawequal(d, d.me))
    local x = {}
    local x2, y2 = codec.decode(codec.encode(x, { x, x }))
    assert.is_true(rawequal(x2, y2[1]) and rawequal(x2, y2[2]))
    local f = function() return 7 end
    local f1, f2 = codec.decode(codec.encode(f, f))
    assert.is_true(rawequal(f1, f2))
    assert.are.equal(7, f1())
  end)

  it("keep an upvalue shared with the first function of the message shared", function()
    local n = 0
    local function inc() n = n + 1 return n end
    local function get() return n end
    local inc2, get2 = codec.decode(codec.encode(inc, get))
    inc2()
    inc2()
    assert.are.equal(2, get2())
    assert.are.equal(0, n)
  end)

  it("decode scalars before and after a table, and name a scalar cut short", function()
    assert.are.same(pack(1, "s", nil, true, 2.5, { 7 }, false, math.mininteger),
      pack(codec.decode(codec.encode(1, "s", nil, true, 2.5, { 7 }, false, math.mininteger))))
    assert.are.equal(math.type(codec.decode(codec.encode(2.0))), "float")
    assert.are.equal("malformed message: truncated integer",
      error_of(codec.decode, "\1\0\0\0\3\1\2"))
    assert.are.equal("malformed message: truncated float", error_of(codec.decode, "\1\0\0\0\4\1"))
    assert.are.equal("malformed message: truncated string", error_of(codec.decode, "\1\0\0\0\5\9ab"))
  end)

  it("send each closure of a prototype sent before with its own upvalues", function()
    local function mk(v) return function(a) return v, string.rep("x", a) end end
    local g = function(a) return math.abs(a) end -- globals only: the memo's kind
    for i = 1, 3 do
      assert.are.equal(i, codec.decode(codec.encode(g))(-i))
      local v, xs = codec.decode(codec.encode(mk(i)))(i)
      assert.are.equal(i, v)
      assert.are.equal(string.rep("x", i), xs)
    end
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local fs = {}
    for i = 1, 200 do
      fs[i] = i % 2 == 0 and pool:submit(mk(i), 1) or pool:submit(g, -i)
    end
    for i = 1, 200 do
      local v, xs = fs[i]:result(60)
      assert.are.equal(i, v)
      assert.are.equal(i % 2 == 0 and "x" or nil, xs)
    end
  end)

  it("do not name a function sent unnamed before, nor miss a library function after it", function()
    local mine = function(s) return s:upper() end
    assert.are.equal("AB", codec.decode(codec.encode(mine))("ab"))
    assert.are.equal("AB", codec.decode(codec.encode(mine))("ab"))
    assert.is_true(rawequal(string.upper, codec.decode(codec.encode(string.upper))))
    assert.are.equal("AB", codec.decode(codec.encode(mine))("ab"))
  end)

  it("keep the pool's buffer after a refused submit", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    for i = 1, 3 do
      assert.is_false(pcall(pool.submit, pool, function() end, coroutine.create(print)))
      assert.are.equal(i, pool:submit(function(x) return x end, i):result(60))
    end
  end)
end)

describe("transferable userdata", function()
  -- luapool.int128 registers itself (src/codec/int128_codec.c): id 13, the
  -- tag it had before the registry, then its 16 bytes
  local function int128_bytes(lo, hi) return "\1\0\0\0\13" .. string.pack("<i8i8", lo, hi) end

  it("send luapool.int128 as its id and its bytes, as before the registry", function()
    assert.are.equal(int128_bytes(-2, -1), codec.encode(luapool.int128(-2)))
    assert.are.equal(int128_bytes(0, 1), codec.encode(luapool.int128("18446744073709551616")))
    assert.are.equal(luapool.int128("-18446744073709551617"), codec.decode(int128_bytes(-1, -2)))
    assert.are.equal("luapool.int128", getmetatable(codec.decode(int128_bytes(5, 0))).__name)
  end)

  it("refuse an id no type has, naming it, and a value cut short, naming its type", function()
    assert.are.equal("malformed message: unknown tag 200", error_of(codec.decode, "\1\0\0\0\200"))
    assert.are.equal("malformed message: unknown tag 32", error_of(codec.decode, "\1\0\0\0\32"))
    assert.are.equal("malformed message: truncated luapool.int128",
      error_of(codec.decode, int128_bytes(1, 0):sub(1, -2)))
    assert.are.equal("malformed message: truncated luapool.int128", error_of(codec.decode, "\1\0\0\0\13"))
  end)

  it("still refuse a userdata of no registered type", function()
    assert.are.equal("cannot send argument #2: a userdata", error_of(codec.encode, 1, io.stderr))
    assert.are.equal("cannot send argument #1: field 'f' of index 1 is a userdata",
      error_of(codec.encode, { { f = io.stdout } }))
  end)

  for _, kind in ipairs(helper.engines) do
    it("reach a kernel in a worker and come back from it as scalars (" .. kind .. ")", function()
      local pool <close> = luapool[kind].new { max_workers = 1 }
      -- the argument read and the answer written without a Lua state
      local got = pool:submit(luapool.kernels.sum_squares, luapool.int128(10)):result(60)
      assert.are.equal(luapool.int128(285), got) -- 0^2 + ... + 9^2
      assert.are.equal("luapool.int128", getmetatable(got).__name)
      assert.are.equal(luapool.int128(14),
        pool:submit(function(a) return a * 2 end, luapool.int128(7)):result(60))
    end)
  end
end)

describe("the wire handshake", function()
  local build = "luapool %d+%.%d+%.%d+ %(wire 1, Lua 5%.4%.%d+, little%-endian, 8%-byte integers " ..
    "and floats, kernels (%x+)%)"

  it("refuses a worker binary that registers other transferable types, naming both builds", function()
    -- built with one transferable type more (LUAPOOL_TEST_UDTYPE, udtype.c)
    local other = helper.bin:gsub("luapool$", "luapool-othertypes")
    local out, _, code = helper.run({ "-e", [[
      local p <close> = require("luapool").processpool.new { max_workers = 1 }
      local e = p:submit(print):exception()
      print(e.kind, e.message)]] }, nil, { LUAPOOL_WORKER_EXE = other })
    assert.are.equal(0, code)
    local theirs, mine = out:match("^broken\tcannot start worker process " .. other:gsub("%p", "%%%0") ..
      ": it is " .. build .. ", and this is " .. build ..
      ": a worker must be the same luapool build %(LUAPOOL_WORKER_EXE names the binary workers run%)\n$")
    assert.is_truthy(theirs, out)
    assert.are.equal(16, #theirs)
    assert.are.equal(16, #mine)
    assert.are_not.equal(theirs, mine)
  end)

  it("takes a worker binary of this build", function()
    local out, _, code = helper.run({ "-e", [[
      local luapool = require "luapool"
      local p <close> = luapool.processpool.new { max_workers = 1 }
      print(p:submit(function(x) return x + 1 end, luapool.int128(41)):result(60))]] }, nil,
      { LUAPOOL_WORKER_EXE = helper.bin })
    assert.are.equal(0, code)
    assert.are.equal("42\n", out)
  end)
end)

describe("big strings", function()
  local big
  lazy_setup(function() big = string.rep("ab\0c", 25 * 1024 * 1024) end) -- 100 MiB
  lazy_teardown(function()
    big = nil
    collectgarbage()
  end)
  for _, kind in ipairs(helper.engines) do
    it("carries a 100 MiB string through a " .. kind, function()
      local pool <close> = luapool[kind].new { max_workers = 1 }
      local n, head, tail = pool:submit(function(s) return #s, s:sub(1, 5), s:sub(-3) end, big):result(120)
      assert.are.equal(104857600, n)
      assert.are.equal("ab\0ca", head)
      assert.are.equal("b\0c", tail)
      local back = pool:submit(function(s) return s end, big):result(120)
      assert.are.equal(#big, #back)
      assert.is_true(back == big)
    end)
  end
  it("round trips a 100 MiB string through codec", function()
    assert.is_true(codec.decode(codec.encode(big)) == big)
  end)
end)

describe("codec.encode of strings of 64 KiB and more (joined into the result, not copied twice)", function()
  -- the wire format: a u32 count of values (host order), then per string
  -- T_SSTR (5) and a u8 length or T_STR (6) and a u32 length, then its bytes
  local function str_bytes(s)
    if #s < 256 then return "\5" .. string.char(#s) .. s end
    return "\6" .. string.pack("=I4", #s) .. s
  end
  local function distinct(n, i) return (("%08d"):format(i)):rep(n // 8) end

  it("writes the same bytes as for a copied string, below, at and above the size", function()
    for _, n in ipairs { 65535, 65536, 65544, 1 << 20 } do
      local s = distinct(n, n) .. ("z"):rep(n % 8)
      assert.are.equal(n, #s)
      assert.is_true(codec.encode(s) == string.pack("=I4", 1) .. str_bytes(s), "size " .. n)
    end
    local a, b = distinct(1 << 16, 1), distinct(1 << 17, 2)
    local expect = string.pack("=I4", 5) .. str_bytes(a) .. str_bytes("x") .. str_bytes(b) .. str_bytes(a) .. "\0"
    assert.is_true(codec.encode(a, "x", b, a, nil) == expect)
    -- other bytes outweigh the big strings: each string's bytes put in
    -- place in the buffer instead (a join would copy the others twice)
    local x, y, z = distinct(50 << 10, 3), distinct(50 << 10, 4), distinct(50 << 10, 5)
    expect = string.pack("=I4", 5) .. str_bytes(x) .. str_bytes(a) .. str_bytes(y) .. str_bytes(b) .. str_bytes(z)
    assert.is_true(codec.encode(x, a, y, b, z) == expect)
    local floats = {}
    for i = 1, 100000 do floats[i] = i + 0.5 end
    local back = codec.decode(codec.encode({ a, floats, b }))
    assert.is_true(back[1] == a and back[3] == b)
    assert.are.equal(100000, #back[2])
    assert.are.equal(100000.5, back[2][100000])
  end)

  it("encodes as many arguments as before with a hundred of them among", function()
    -- the join's stack slots are reserved as the strings are met, where
    -- the stack is highest; near the stack's limit a string is copied, so
    -- that a message of as many values as fit without big strings (found
    -- by bisection) still goes with 128 of them, joined as they outweigh
    -- the rest (it raised "stack overflow (too many strings to join)" for
    -- the join's 257 slots)
    local s = distinct(1 << 17, 9)
    local zeros, t = {}, {}
    for i = 1, 1000000 do zeros[i], t[i] = 0, i <= 128 and s or 0 end
    local function fits(n) return (pcall(function() return codec.encode(table.unpack(zeros, 1, n)) end)) end
    local lo, hi = 1000, 1000000
    assert.is_true(fits(lo))
    while hi - lo > 1 do
      local mid = (lo + hi) // 2
      if fits(mid) then lo = mid else hi = mid end
    end
    local n = lo - 8
    local bytes = codec.encode(table.unpack(t, 1, n))
    assert.are.equal(4 + 128 * (#codec.encode(s) - 4) + (n - 128) * (#codec.encode(0) - 4), #bytes)
    local back = table.pack(codec.decode(bytes))
    assert.are.equal(n, back.n)
    assert.is_true(back[1] == s and back[128] == s and back[129] == 0 and back[n] == 0)
  end)

  it("keeps such a string whole when a finalizer run inside the encoder drops it", function()
    -- The functions after the string are dumped one by one, and each dump
    -- allocates: a collection step may run a __gc that takes the string out
    -- of the table being sent.  That finalizer then allocates 32 MiB, so
    -- that the collector's next step (pause 0, a big step multiplier) runs
    -- a whole cycle, which frees the string before the join unless the
    -- encoder holds it (the asan gate reports the read of freed memory).
    -- Attempts go on until that has happened after the string was read
    -- (it is in the result) 20 times.
    if os.getenv("LUAPOOL_SANITIZER") == "tsan" then
      -- (there 5,000 attempts met the window 8 times in 213 s: the asan
      -- gate and the plain suite run it)
      pending("the window is seldom met under tsan")
      return
    end
    local mode = collectgarbage("incremental", 0, 1000)
    local target, dropped
    local mt = { __gc = function()
      if target then
        target[1] = nil
        target = nil
        dropped = true
        local _ = ("y"):rep(32 << 20)
      end
    end }
    local within = 0
    for attempt = 1, 5000 do
      for _ = 1, 50 do setmetatable({}, mt) end
      local t = { distinct(1 << 17, attempt) }
      for i = 2, 41 do
        t[i] = load("local a = ... return a + " .. attempt * 100 + i .. string.rep(" + a * 2", 30))
      end
      target, dropped = t, false
      local bytes = codec.encode(t)
      local during = dropped
      target = nil
      local back = codec.decode(bytes)
      if during and back[1] ~= nil then
        within = within + 1
        assert.is_true(back[1] == distinct(1 << 17, attempt), "attempt " .. attempt)
        assert.are.equal(1 + attempt * 100 + 41 + 2 * 30, back[41](1))
        if within == 20 then break end
      end
    end
    restore_collector(mode)
    assert.are.equal(20, within)
  end)

  it("leaves the next encode whole after one refused past such strings", function()
    local s = distinct(1 << 16, 7)
    assert.are.equal("cannot send argument #3: a coroutine", error_of(codec.encode, s, { s }, coroutine.create(print)))
    assert.is_true(codec.encode(s, 1) == string.pack("=I4", 2) .. str_bytes(s) .. "\3" .. string.pack("=i8", 1))
  end)
end)

describe("refusals", function()
  local threads, procs
  lazy_setup(function()
    threads = luapool.threadpool.new { max_workers = 1 }
    procs = luapool.processpool.new { max_workers = 1 }
  end)
  lazy_teardown(function()
    threads:shutdown()
    procs:shutdown()
  end)

  local co = coroutine.create(function() end)
  local sock = io.stdout
  local function uses_sock() return sock end
  local function echo(...) return ... end

  it("refuses an unsendable upvalue, naming it and its function", function()
    local expect = "cannot send argument #1: upvalue 'sock' of function " .. where(uses_sock) .. " is a userdata"
    assert.are.equal(expect, error_of(codec.encode, uses_sock))
    for _, pool in ipairs { threads, procs } do
      assert.are.equal(expect, error_of(function() return pool:submit(uses_sock) end))
      assert.are.equal(
        "cannot send argument #2: upvalue 'sock' of function " .. where(uses_sock) .. " is a userdata",
        error_of(function() return pool:submit(echo, uses_sock) end))
      assert.are.equal(expect, error_of(function() return pool:map(uses_sock, { 1 }) end))
    end
  end)

  it("refuses coroutines, light userdata and unknown C functions", function()
    local light = debug.upvalueid(uses_sock, 1)
    assert.are.equal("userdata", type(light))
    local iter = ("x"):gmatch(".")
    assert.are.equal("cannot send argument #1: a coroutine", error_of(codec.encode, co))
    assert.are.equal("cannot send argument #2: a coroutine", error_of(codec.encode, 1, co))
    assert.are.equal("cannot send argument #1: a light userdata", error_of(codec.encode, light))
    assert.are.equal("cannot send argument #1: a userdata", error_of(codec.encode, io.stdout))
    assert.are.equal(
      "cannot send argument #1: a C function that is neither in the standard library nor in luapool",
      error_of(codec.encode, iter))
    for _, pool in ipairs { threads, procs } do
      assert.are.equal("cannot send argument #2: a coroutine",
        error_of(function() return pool:submit(echo, co) end))
      assert.are.equal("cannot send argument #3: a light userdata",
        error_of(function() return pool:submit(echo, 1, light) end))
      assert.are.equal(
        "cannot send argument #1: a C function that is neither in the standard library nor in luapool",
        error_of(function() return pool:submit(iter) end))
      assert.are.equal(
        "cannot send argument #2: field 'it' is a C function that is neither in the standard library nor in luapool",
        error_of(function() return pool:submit(echo, { it = iter }) end))
      -- a refusal leaves the pool (and its message buffer) fit for use
      assert.are.same({ 5, "x" }, { pool:submit(echo, 5, "x"):result(60) })
    end
  end)

  it("names the path from the value to the culprit, inner to outer", function()
    assert.are.equal("cannot send argument #2: field 'b' of field 'a' is a coroutine",
      error_of(codec.encode, 1, { a = { b = co } }))
    assert.are.equal("cannot send argument #1: index 3 is a coroutine",
      error_of(codec.encode, { 1, 2, co }))
    assert.are.equal("cannot send argument #1: index 2 of field 'list' is a coroutine",
      error_of(codec.encode, { list = { 1, co } }))
    assert.are.equal("cannot send argument #1: field '__index' of metatable is a userdata",
      error_of(codec.encode, setmetatable({}, { __index = io.stdout })))
    assert.are.equal("cannot send argument #1: field 'm' of metatable of index 1 is a coroutine",
      error_of(codec.encode, { setmetatable({}, { m = co }) }))
    assert.are.equal("cannot send argument #1: value at a boolean key is a coroutine",
      error_of(codec.encode, { [true] = co }))
    assert.are.equal("cannot send argument #1: value at a number key is a coroutine",
      error_of(codec.encode, { [2.5] = co }))
    assert.are.equal("cannot send argument #1: a key of field 'a' is a userdata",
      error_of(codec.encode, { a = { [io.stdout] = 1 } }))
    assert.are.equal("cannot send argument #1: upvalue 'sock' of function " .. where(uses_sock) ..
      " of field 'cb' of field 'a' is a userdata",
      error_of(codec.encode, { a = { cb = uses_sock } }))
  end)

  it("numbers map items and names them", function()
    for _, pool in ipairs { threads, procs } do
      assert.are.equal("cannot send item #3: a coroutine",
        error_of(function() return pool:map(echo, { 1, 2, co }) end))
      assert.are.equal("cannot send item #2: field 'x' is a coroutine",
        error_of(function() return pool:map(echo, { 1, { x = co } }) end))
    end
  end)

  it("names the right item when a starmap argument cannot travel", function()
    for _, pool in ipairs { threads, procs } do
      assert.are.equal("cannot send argument #2 of item #2: a coroutine",
        error_of(function() return pool:starmap(echo, { { 1 }, { 2, co }, { 3 } }) end))
      assert.are.equal("cannot send argument #1 of item #1: field 'x' is a coroutine",
        error_of(function() return pool:starmap(echo, { { { x = co } } }) end))
    end
  end)

  it("names the path to a value deep down, eliding the middle of a long path", function()
    local deep = nest(1000)
    local cur = deep
    while cur.x do cur = cur.x end
    cur.x = co
    local expect = "cannot send argument #2: " .. string.rep("field 'x' of ", 8) ..
      "... (988 more) ... of " .. string.rep("field 'x' of ", 3) .. "field 'x' is a coroutine"
    assert.are.equal(expect, error_of(codec.encode, 1, deep))
    assert.are.equal(expect, error_of(function() return threads:submit(echo, deep) end))
    assert.are.equal(expect, error_of(function() return procs:submit(echo, deep) end))
    -- twelve steps are named in full
    local twelve = nest(12)
    cur = twelve
    while cur.x do cur = cur.x end
    cur.x = co
    assert.are.equal("cannot send argument #1: " .. string.rep("field 'x' of ", 11) .. "field 'x' is a coroutine",
      error_of(codec.encode, twelve))
    -- the steps elided are counted, whatever their kinds
    local mixed = { { { f = function() return cur end } } }
    for _ = 1, 20 do mixed = { k = mixed } end
    local e = error_of(codec.encode, mixed)
    assert.are.equal("cannot send argument #1: field 'x' of upvalue 'cur' of function " ..
      where(mixed.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k.k[1][1].f) ..
      " of field 'f' of index 1 of index 1 of field 'k' of field 'k' of field 'k' of ... (13 more) ... of " ..
      "field 'k' of field 'k' of field 'k' of field 'k' is a coroutine", e)
  end)

  it("refuses a result that cannot travel back, as a transfer error", function()
    for _, pool in ipairs { threads, procs } do
      local f = pool:submit(function() return 1, coroutine.create(print) end)
      local ok, e = pcall(f.result, f, 60)
      assert.is_false(ok)
      assert.are.equal("transfer", e.kind)
      assert.are.equal("cannot send result #2: a coroutine", e.message)
      assert.are.equal("transfer: cannot send result #2: a coroutine", tostring(e))
    end
  end)
end)

describe("decoding", function()
  it("decodes crafted nesting of any depth, and refuses it cut short", function()
    for _, n in ipairs { 200, 201, 100000 } do
      local t, d = codec.decode(crafted_nest(n)), 0
      while t do
        d = d + 1
        t = t[1]
      end
      assert.are.equal(n, d)
    end
    -- a deep chain that never ends: a clean error, no C stack overflow
    local deep = "\1\0\0\0" .. string.rep("\8\1\0\0\0\0\0\0\0", 100000)
    assert.are.equal("malformed message: table size exceeds message", error_of(codec.decode, deep))
    assert.are.equal("malformed message: truncated", error_of(codec.decode, deep .. "\0"))
    -- array sizes that lie all the way down, each as large as what is left
    -- of the message: refused, without preallocating them all (1.8 GB)
    local levels, parts = 5000, {}
    for k = 1, levels do parts[k] = "\8" .. string.pack("<I4I4", 9 * (levels - k), 0) end
    assert.are.equal("malformed message: truncated", error_of(codec.decode, "\1\0\0\0" .. table.concat(parts)))
  end)

  it("explains malformed messages", function()
    assert.are.equal("malformed message: truncated", error_of(codec.decode, ""))
    assert.are.equal("malformed message: truncated", error_of(codec.decode, "\1\0\0\0"))
    assert.are.equal("malformed message: trailing bytes", error_of(codec.decode, codec.encode(1) .. "x"))
    assert.are.equal("malformed message: unknown tag 99", error_of(codec.decode, "\1\0\0\0\99"))
    assert.are.equal("malformed message: bad reference", error_of(codec.decode, "\1\0\0\0\9\0\0\0\0"))
    assert.are.equal("malformed message: too many values", error_of(codec.decode, "\255\255\255\255"))
    assert.are.equal("malformed message: truncated string", error_of(codec.decode, "\1\0\0\0\6\255\255\255\255"))
  end)

  it("refuses upvalue joins that name no upvalue, or stand outside a function", function()
    local n = 0
    local function get() return n end
    local function set(v) n = v end
    local good = codec.encode(get, set)
    -- set's one upvalue is a join to upvalue number 0 (get's)
    assert.are.equal("\15\0\0\0\0", good:sub(-5))
    local g, s = codec.decode(good)
    s(4)
    assert.are.equal(4, g())
    local head = good:sub(1, -6)
    assert.are.equal("malformed message: bad upvalue reference",
      error_of(codec.decode, head .. "\15\1\0\0\0"))
    assert.are.equal("malformed message: bad upvalue reference",
      error_of(codec.decode, head .. "\15\255\255\255\255"))
    assert.are.equal("malformed message: truncated upvalue reference",
      error_of(codec.decode, head .. "\15\0\0"))
    assert.are.equal("malformed message: upvalue reference outside a function",
      error_of(codec.decode, "\1\0\0\0\15\0\0\0\0"))
    -- the first function cannot join an upvalue: none was met before it
    local lone = codec.encode(get)
    assert.are.equal("malformed message: bad upvalue reference",
      error_of(codec.decode, lone:sub(1, -10) .. "\15\0\0\0\0"))
    -- a reusable function (only _ENV) may be a worker's cached closure:
    -- it takes nothing but _ENV
    local env_only = codec.encode(function() return print end)
    assert.are.equal("\1\14", env_only:sub(-2)) -- flags: reusable; its _ENV
    assert.are.equal("malformed message: upvalue of a reusable function",
      error_of(codec.decode, env_only:sub(1, -2) .. "\0"))
    assert.are.equal("malformed message: upvalue of a reusable function",
      error_of(codec.decode, env_only:sub(1, -2) .. "\15\0\0\0\0"))
    assert.are.equal("malformed message: bad function flags",
      error_of(codec.decode, env_only:sub(1, -3) .. "\2\14"))
  end)

  it("refuses function bytes that are not valid bytecode", function()
    local head = "\1\0\0\0\10" -- one value, a Lua function
    local function lfunc(code, sum)
      -- then no upvalues, no flags
      return head .. string.pack("<i8i8I4", 987654321, sum or fnv1a(code), #code) .. code .. "\0\0"
    end
    assert.are.equal("malformed message: function is not Lua bytecode", error_of(codec.decode, lfunc("garbage!")))
    assert.are.equal("malformed message: function bytecode checksum mismatch",
      error_of(codec.decode, lfunc("\27Luagarbage!", 0)))
    assert.matches("^malformed message: ", error_of(codec.decode, lfunc("\27Luagarbage!")))
    assert.matches("^malformed message: ", error_of(codec.decode, lfunc("\27Lua")))
  end)

  it("names a value it cannot find by name", function()
    -- (%q shows any byte a message may carry beyond the name)
    local b = codec.encode(print, 1):gsub("print", "prinz")
    assert.are.equal(("%q"):format("cannot receive 'prinz': not found here"),
      ("%q"):format(error_of(codec.decode, b)))
    b = codec.encode(string.format, 1):gsub("string%.format", "string.formaz")
    assert.are.equal(("%q"):format("cannot receive 'string.formaz': not found here"),
      ("%q"):format(error_of(codec.decode, b)))
  end)

  -- The fuzzing runs in a separate process: a crash there is reported as a
  -- failure with its exit status instead of killing this spec run.
  local fuzz_prelude = FNV1A_SOURCE .. [[
local luapool = require "luapool"
local codec = luapool.codec
local problems, cases, decoded = {}, 0, 0
local function try(s)
  cases = cases + 1
  local ok, e = pcall(codec.decode, s)
  if ok then
    decoded = decoded + 1
  elseif type(e) ~= "string" then
    problems[#problems + 1] = "non-string error: " .. tostring(e)
  elseif not (e:find("^malformed message") or e:find("^cannot receive '")) then
    problems[#problems + 1] = e
  end
end
local function report()
  for i = 1, math.min(#problems, 20) do print("problem: " .. problems[i]) end
  print(("cases %d, decoded %d, problems %d"):format(cases, decoded, #problems))
end
local up = { 1, 2 }
local function f(x) local t = { x, "konst", 1.5 } return up[x], string.format("%d", x), t end
-- A message holding one Lua function, cut around its bytecode: what comes
-- before its u64 id, u64 checksum and u32 length; the bytecode; the rest.
local function split(msg)
  local pos = assert(msg:find("\27Lua", 1, true))
  local len = string.unpack("<I4", msg, pos - 4)
  return msg:sub(1, pos - 21), msg:sub(pos, pos + len - 1), msg:sub(pos + len)
end
-- Puts a message together again around (changed) bytecode, with a fresh
-- id and a checksum that matches: the bytes reach Lua's loader.
local fresh = 0
local function rebuild(head, code, tail)
  fresh = fresh + 1
  return head .. string.pack("<i8i8I4", 0x5eed0000 + fresh, fnv1a(code), #code) .. code .. tail
end
local head, code, tail = split(codec.encode(f))
-- the cut is right: the message rebuilt as is gives f back
assert(codec.decode(rebuild(head, code, tail))(1) == 1, "rebuilt message does not work")
]]

  it("never crashes on truncated or mutated messages", function()
    local out, err, status = run_script(fuzz_prelude .. [[
local shared = { k = "v" }
local value = { 1, 2.5, "str", true, false, { nested = { deep = {} } }, s1 = shared, s2 = shared,
  [2.5] = "fk", [true] = "bk", big = luapool.int128(12345), f = f,
  k = luapool.kernels.sum_squares, p = print, long = string.rep("x", 300) }
value.self = value
setmetatable(value, { __index = { z = 1 } })
local good = codec.encode(value, nil, 42, -0.0, "tail")
for i = 0, #good - 1 do try(good:sub(1, i)) end
for i = 1, #good do
  for _, v in ipairs { 0, 1, 0x7f, 0x80, 0xff } do
    try(good:sub(1, i - 1) .. string.char(v) .. good:sub(i + 1))
  end
end
math.randomseed(12345)
for _ = 1, 2000 do
  local t = {}
  for j = 1, math.random(0, 64) do t[j] = string.char(math.random(0, 255)) end
  try(table.concat(t))
  local s = good
  for _ = 1, math.random(1, 4) do
    local p = math.random(1, #s)
    s = s:sub(1, p - 1) .. string.char(math.random(0, 255)) .. s:sub(p + 1)
  end
  try(s)
end
report()
]])
    assert.are.equal("", err)
    assert.are.equal(0, status)
    assert.matches("^cases %d+, decoded %d+, problems 0\n$", out)
  end)

  it("never crashes loading mutated function bytecode", function()
    local out, err, status = run_script(fuzz_prelude .. [[
for p = 1, #code do
  for v = 0, 255, 3 do
    try(rebuild(head, code:sub(1, p - 1) .. string.char(v) .. code:sub(p + 1), tail))
  end
  try(rebuild(head, code:sub(1, p - 1), tail)) -- truncated bytecode
end
report()
]])
    assert.are.equal("", err)
    assert.are.equal(0, status)
    assert.matches("^cases %d+, decoded [1-9]%d*, problems 0\n$", out)
  end)

  it("refuses bytecode whose closure upvalue count was altered, without crashing", function()
    -- byte 32 of the bytecode, right after Lua 5.4's 31-byte header: the
    -- number of upvalues of the main closure (f has 2)
    local out, err, status = run_script(fuzz_prelude .. [[
for _, v in ipairs { 0, 1, 3, 255 } do
  local ok, e = pcall(codec.decode, rebuild(head, code:sub(1, 31) .. string.char(v) .. code:sub(33), tail))
  print(v, ok and "decoded" or tostring(e):match("^malformed message") or e)
end
]])
    assert.are.equal("", err)
    assert.are.equal(0, status)
    -- a closure with fewer upvalues than sent cannot take them: an error;
    -- with more, decoding may either fail or succeed
    assert.matches("^0\tmalformed message\n1\tmalformed message\n" ..
      "3\t[%a ]+\n255\t[%a ]+\n$", out)
    for line in out:gmatch("[^\n]+") do
      local what = line:match("^%d+\t(.*)$")
      assert.is_true(what == "decoded" or what == "malformed message", line)
    end
  end)
end)

describe("fresh closures of a function already sent", function()
  -- The function id of a message's first value, a Lua function (codec.encode:
  -- u32 count, the tag, then the id).
  local function fid(fn) return codec.encode(fn):sub(6, 13) end

  it("travel with the function id of the first one, and other functions with their own", function()
    assert.are.equal("prototype", codec.cache().key)
    local seen = {}
    for _ = 1, 3 do
      local a, b = function() return "A" end, function() return "B" end
      seen[#seen + 1] = { fid(a), fid(b) }
      collectgarbage() -- the closures sent before are gone
    end
    for i = 2, 3 do assert.are.same(seen[1], seen[i]) end
    assert.are_not.equal(seen[1][1], seen[1][2])
  end)

  for _, kind in ipairs(helper.engines) do
    it("run the right one of two functions on one line, round after round (" .. kind .. ")", function()
      local pool <close> = luapool[kind].new { max_workers = 2 }
      local fs = {}
      for round = 1, 60 do
        local a, b = function(x) return "A", x end, function(x) return "B", x end
        if round % 2 == 0 then a, b = b, a end
        fs[#fs + 1] = { pool:submit(a, round), pool:submit(b, round), round % 2 == 0 }
        if round % 10 == 0 then collectgarbage() end
      end
      for _, f in ipairs(fs) do
        local swapped = f[3]
        local ta, xa = f[1]:result(60)
        local tb, xb = f[2]:result(60)
        assert.are.same({ swapped and "B" or "A", swapped and "A" or "B" }, { ta, tb })
        assert.are.equal(xa, xb)
      end
    end)

    it("give each closure its own upvalue values (" .. kind .. ")", function()
      local pool <close> = luapool[kind].new { max_workers = 2 }
      local fs = {}
      for i = 1, 200 do
        local s = "v" .. i
        fs[i] = pool:submit(function(x) return s, i + x end, 1000)
      end
      for i = 1, 200 do assert.are.same({ "v" .. i, i + 1000 }, { fs[i]:result(60) }) end
    end)

    it("keep a chunk loaded twice apart, before and after one of them is collected (" .. kind .. ")", function()
      local pool <close> = luapool[kind].new { max_workers = 1 }
      local src = "return function() return debug.getinfo(1, 'S').short_src end"
      local one, two = load(src, "=one")(), load(src, "=two")()
      local same1, same2 = load(src, "=same")(), load(src, "=same")()
      assert.are_not.equal(fid(same1), fid(same2)) -- two prototypes
      assert.are.equal("one", pool:submit(one):result(60))
      assert.are.equal("two", pool:submit(two):result(60))
      assert.are.equal("same", pool:submit(same1):result(60))
      one = nil -- luacheck: ignore 311
      collectgarbage()
      collectgarbage()
      -- new prototypes, maybe at the collected one's address
      for i = 1, 20 do
        local f = load(src, "=new" .. i)()
        assert.are.equal("new" .. i, pool:submit(f):result(60))
        assert.are.equal("two", pool:submit(load(src, "=two")()):result(60))
        assert.are.equal("same", pool:submit(same2):result(60))
      end
      assert.are.equal("two", pool:submit(two):result(60))
    end)

    it("never run a collected function whose address a new one took (" .. kind .. ")", function()
      local pool <close> = luapool[kind].new { max_workers = 1 }
      for i = 1, 300 do
        local f = load("return function() return " .. i .. " end")()
        assert.are.equal(i, pool:submit(f):result(60))
        f = nil -- luacheck: ignore 311
        collectgarbage()
      end
    end)
  end

  it("keep the cache bounded when 5,000 different functions are sent once each", function()
    local limit = codec.cache().limit
    assert.is_true(limit < 5000)
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local fs = {}
    for i = 1, 5000 do
      fs[i] = pool:submit(load("return function() return " .. i .. " end")())
      assert.is_true(codec.cache().prototypes <= limit)
    end
    for i = 1, 5000 do assert.are.equal(i, fs[i]:result(60)) end
    assert.is_true(codec.cache().prototypes <= limit)
    assert.is_true(codec.cache().prototypes > 0)
  end)

  it("are what scripts/bench/inline.lua measures (it runs)", function()
    local out, err, code = helper.run({ helper.source_dir .. "/scripts/bench/inline.lua",
      "--quick", "--runs", "1", "--warmup", "0" })
    assert.are.equal(0, code, err)
    assert.matches("threadpool inline noup", out)
    assert.matches("processpool hoisted upval", out)
    assert.matches("µs/task", out)
  end)
end)
