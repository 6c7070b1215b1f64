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
local values = {
  { nil, true, false, 0, -1, math.maxinteger, 1.5, -0.0, 1 / 0, 0 / 0 },
  { "", "short", string.rep("x", 300), "\0\1\2" },
  { { 1, 2, 3, a = { b = { c = {} } } }, { shared, shared }, cyclic },
  { setmetatable({}, { __index = { z = 1 } }) },
  { closure, fact, string.format, print, luapool.kernels.sum_squares },
  { luapool.int128("-170141183460469231731687303715884105728") },
}
for i, v in ipairs(values) do
  local f = assert(io.open(("%s/seed%d"):format(dir, i), "wb"))
  f:write(luapool.codec.encode(table.unpack(v, 1, 10)))
  f:close()
end
