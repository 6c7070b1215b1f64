-- Writes seed inputs for the codec fuzzer: encodings of varied values.
-- usage: lua5.4 seeds.lua DIR   (with luapool.so on LUA_CPATH)
local luapool = require "luapool"
local dir = assert(arg[1], "usage: seeds.lua DIR")
local shared = { 1, 2 }
local cyclic = {}
cyclic.self = cyclic
local up = { k = "v" }
local function closure(x) return up.k .. x end
local function fact(n) return n <= 1 and 1 or n * fact(n - 1) end
-- closures sharing upvalues (joins), mutual recursion, a join met while
-- the shared upvalue's value is still being written
local count = 0
local function inc() count = count + 1 end
local function get() return count end
local ma, mb
function ma(n) if n == 0 then return 0 end return mb(n - 1) end
function mb(n) if n == 0 then return 1 end return ma(n - 1) end
local held
local function holder() return held end
held = { set = function(v) held = v end }
-- deeper than any fixed limit: a linked list
local list
for i = 1, 300 do list = { v = i, next = list } end
local values = {
  { nil, true, false, 0, -1, math.maxinteger, 1.5, -0.0, 1 / 0, 0 / 0 },
  { "", "short", string.rep("x", 300), "\0\1\2" },
  { { 1, 2, 3, a = { b = { c = {} } } }, { shared, shared }, cyclic },
  { setmetatable({}, { __index = { z = 1 } }) },
  { closure, fact, string.format, print, luapool.kernels.sum_squares },
  { luapool.int128("-170141183460469231731687303715884105728") },
  { inc, get, ma, mb, holder },
  { list, { list, list.next } },
}
for i, v in ipairs(values) do
  local f = assert(io.open(("%s/seed%d"):format(dir, i), "wb"))
  f:write(luapool.codec.encode(table.unpack(v, 1, 10)))
  f:close()
end
