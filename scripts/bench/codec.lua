-- Codec throughput: encode and decode rates by value shape (median of runs).
-- usage: luapool scripts/bench/codec.lua [--runs N]
local codec = luapool.codec
local runs = 9
local args = { ... }
if args[1] == "--runs" then runs = assert(math.tointeger(tonumber(args[2])), "--runs N") end

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

-- Times f over enough repetitions to last >= 20 ms; seconds per call.
local function time_per_call(f)
  local reps = 1
  while true do
    local t0 = luapool.now()
    for _ = 1, reps do f() end
    local elapsed = luapool.now() - t0
    if elapsed >= 0.02 then return elapsed / reps end
    reps = reps * 2
  end
end

local numbers, mixed = {}, {}
for i = 1, 100000 do numbers[i] = i * 0.5 end
for i = 1, 10000 do mixed[i] = { id = i, name = "item" .. i, tags = { "a", "b" }, ok = i % 2 == 0 } end
local cases = {
  { "string 1 MB", string.rep("x", 1 << 20), 1 << 20, "bytes" },
  { "flat table, 100k floats", numbers, 100000, "values" },
  { "10k records (4 fields, nested)", mixed, 10000, "records" },
  { "closure with upvalues",
    (function() local a, b = { 1, 2, 3 }, "s"; return function() return a, b end end)(), 1, "functions" },
}

print(("%-32s %14s %14s"):format("shape", "encode", "decode"))
for _, c in ipairs(cases) do
  local name, value, units, unit = table.unpack(c)
  local bytes = codec.encode(value)
  local enc, dec = {}, {}
  for r = 1, runs do
    enc[r] = time_per_call(function() codec.encode(value) end)
    dec[r] = time_per_call(function() codec.decode(bytes) end)
  end
  local function rate(s)
    local per = units / s
    if unit == "bytes" then return ("%.2f GB/s"):format(per / 1e9) end
    if per >= 1e6 then return ("%.1f M %s/s"):format(per / 1e6, unit) end
    return ("%.0f k %s/s"):format(per / 1e3, unit)
  end
  print(("%-32s %14s %14s"):format(name, rate(median(enc)), rate(median(dec))))
end
