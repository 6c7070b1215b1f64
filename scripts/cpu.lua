-- The CPU-bound reference job: sum of squares of 0..n-1 for each number,
-- on a processpool, printed exactly and in input order.
--
-- usage: luapool scripts/cpu.lua [--workers N] [--sequential] [--progress] [N...]
--   --workers N    processpool size (default: the number of CPUs)
--   --sequential   compute one after the other in the main thread instead
--   --progress     a progress bar on stderr as results come in

local DEFAULT_NUMBERS = { 10000000, 12000000, 11000000, 9000000, 13000000 }

local function usage(msg)
  io.stderr:write("cpu.lua: ", msg, "\n",
    "usage: luapool scripts/cpu.lua [--workers N] [--sequential] [--progress] [N...]\n")
  os.exit(2)
end

local workers, sequential, show_progress, numbers = luapool.cpu_count(), false, false, {}
local args = { ... }
local i = 1
while i <= #args do
  local a = args[i]
  if a == "--workers" then
    workers = math.tointeger(tonumber(args[i + 1]))
    if not workers or workers < 1 then usage("--workers needs a positive integer") end
    i = i + 1
  elseif a == "--sequential" then
    sequential = true
  elseif a == "--progress" then
    show_progress = true
  elseif a:sub(1, 2) == "--" then
    usage("unknown option " .. a)
  else
    local n = math.tointeger(tonumber(a))
    if not n or n < 0 then usage("not a non-negative integer: " .. a) end
    numbers[#numbers + 1] = n
  end
  i = i + 1
end
if #numbers == 0 then numbers = DEFAULT_NUMBERS end

local sum_squares = luapool.kernels.sum_squares
local start = luapool.now()
local results, label
if sequential then
  label, results = "sequential", {}
  for k, n in ipairs(numbers) do results[k] = sum_squares(n) end
else
  label = "processpool"
  -- (a --workers past the pool's range is a usage error, said by the pool
  -- itself: its message names the range)
  local made, pool = pcall(processpool.new, { max_workers = workers, name = "cpu" })
  if not made then usage(tostring(pool)) end
  local _ <close> = pool
  results = pool:map(sum_squares, numbers, { chunksize = 1, progress = show_progress })
end
print(("%s execution time: %.4f seconds"):format(label, luapool.now() - start))
for k, n in ipairs(numbers) do
  print(("Calculation for %d: %s"):format(n, tostring(results[k])))
end
