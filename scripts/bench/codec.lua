-- Codec throughput: how fast luapool.codec turns values into bytes and back
-- (what every task argument and result goes through on its way between Lua
-- states and processes), by value shape.
--
-- usage: luapool scripts/bench/codec.lua [--quick] [--runs N] [--warmup N]
--                                         [--json FILE] [--csv FILE]
--
-- Shapes: a 1 MiB string (rate in bytes/s), a flat table of 100k floats
-- (values/s), 10k records of 4 fields with a nested list (records/s), a
-- closure with two upvalues (closures/s).  Each run repeats the operation
-- enough times to last about 20 ms (calibrated once per shape, before the
-- runs, the same count for encode and decode); the ratio is decode against
-- encode of the same shape.
local bench = require "luapool.bench"

local suite = bench.suite { name = "codec", title = "encode and decode rates by value shape", runs = 9, args = { ... } }
local quick = suite.quick
local codec = luapool.codec
local TARGET = quick and 0.001 or 0.02 -- seconds per timed run

-- Each shape's value exists only while its own cases run (made in setup,
-- after the runner's full collection): the garbage a 1 MiB encode makes
-- starts collection cycles, and with the other shapes' values alive (10k
-- records, 100k floats) each cycle traversed them, which halved the
-- string rates on a machine of slow memory (session 22: 4.5 GB/s against
-- 13 with the string alone), a cost of the collector, not of the codec.
local STRING_BYTES = quick and 1 << 12 or 1 << 20
local function make_numbers()
  local numbers = {}
  for i = 1, quick and 1000 or 100000 do numbers[i] = i * 0.5 end
  return numbers
end
local function make_records()
  local records = {}
  for i = 1, quick and 100 or 10000 do
    records[i] = { id = i, name = "item" .. i, tags = { "a", "b" }, ok = i % 2 == 0 }
  end
  return records
end
local function make_closure()
  local a, b = { 1, 2, 3 }, "s"
  return function() return a, b end
end

local SHAPES = {
  { "string", function() return ("x"):rep(STRING_BYTES) end, STRING_BYTES, "B" },
  { "floats", make_numbers, quick and 1000 or 100000, "value" },
  { "records", make_records, quick and 100 or 10000, "record" },
  { "closure", make_closure, 1, "closure" },
}

-- How many repetitions make a run last about TARGET seconds.
local function calibrate(f)
  local reps = 1
  while true do
    local t0 = luapool.now()
    for _ = 1, reps do f() end
    local elapsed = luapool.now() - t0
    if elapsed >= TARGET or reps >= 1 << 24 then
      return math.max(1, math.floor(reps * TARGET / math.max(elapsed, 1e-9) + 0.5))
    end
    reps = reps * 2
  end
end

-- The value and its bytes, checked to round trip.
local function prepare(name, make)
  local value = make()
  local bytes = codec.encode(value)
  local check = codec.decode(bytes)
  assert(type(check) == type(value), "codec round trip changed the type of " .. name)
  return { value = value, bytes = bytes }
end

local OPS = {
  encode = function(st) return codec.encode(st.value) end,
  decode = function(st) return codec.decode(st.bytes) end,
}

for _, shape in ipairs(SHAPES) do
  local name, make, size, unit = shape[1], shape[2], shape[3], shape[4]
  local reps, encoded_bytes
  do -- one repetition count for both, so that the ratio compares like with like
    local st = prepare(name, make)
    encoded_bytes = #st.bytes
    reps = 2 * calibrate(function() OPS.encode(st) OPS.decode(st) end)
  end
  collectgarbage("collect")
  for _, op in ipairs { "encode", "decode" } do
    local f = OPS[op]
    suite:case {
      group = name, name = ("%s %s"):format(name, op), baseline = name .. " encode",
      params = { shape = name, op = op, reps = reps, size = size, encoded_bytes = encoded_bytes },
      units = reps * size, unit = unit,
      setup = function() return prepare(name, make) end,
      body = function(st)
        for _ = 1, reps do f(st) end
      end,
    }
  end
end

suite:note("per unit and rate: median wall time over (repetitions x units per value); "
  .. "ratio: decode time / encode time of the same shape")
suite:run()
