-- Out-of-memory paths: run by a luapool host built with LUAPOOL_TEST_ALLOC
-- (and ASan, so a leak or a bad access fails the run).  For each operation,
-- the main state's allocations fail from the n-th on, for n = 0, 1, 2...
-- until the operation succeeds with room to spare.  Every failure must be
-- a Lua error saying the memory ran out: never a crash, a hang or a leak.
--   build-oom/luapool spec/oom/oom.lua
local fail = assert(__luapool_fail_alloc, "needs a luapool built with -DLUAPOOL_TEST_ALLOC=ON")

local threads = threadpool.new { max_workers = 2 }
local procs = processpool.new { max_workers = 2 }
local shared = { 1, 2, { 3 } }
local up = { k = string.rep("v", 100) }
local function job(x) return up.k .. x, shared end

local operations = {
  { "codec.encode", function() return luapool.codec.encode({ a = shared, b = shared, f = job }) end },
  { "codec.encode (a fresh dump)", function() return luapool.codec.encode(load("return function() end")()) end },
  { "codec.decode", function()
    return luapool.codec.decode(luapool.codec.encode({ a = shared, f = job, s = string.rep("x", 300) }))
  end },
  { "threadpool.new", function() local p = threadpool.new { max_workers = 1 } p:shutdown() end },
  { "submit+result (threads)", function() return threads:submit(job, 1):result() end },
  { "submit+result (processes)", function() return procs:submit(job, 2):result() end },
  { "task error object", function() return threads:submit(error, { code = 1 }):exception() end },
  { "map (processes)", function() return procs:map(job, { 1, 2, 3, 4, 5 }) end },
  { "imap (threads)", function()
    local n = 0
    for _ in threads:imap(job, { 1, 2, 3 }) do n = n + 1 end
    return n
  end },
  { "as_completed", function()
    local fs = { threads:submit(job, 1), threads:submit(job, 2) }
    for _ in luapool.as_completed(fs) do end
  end },
  { "add_done_callback", function()
    local f = threads:submit(job, 3)
    local hit = 0
    f:add_done_callback(function() hit = hit + 1 end)
    f:result()
    return hit
  end },
  { "int128", function() return tostring(luapool.kernels.sum_squares(100000)) end },
}

local function is_memory_error(e)
  local text = type(e) == "table" and tostring(e.message) or tostring(e)
  return text:find("not enough memory", 1, true) ~= nil
end

local failures = 0
for _, op in ipairs(operations) do
  local name, fn = op[1], op[2]
  local n, successes, injected = 0, 0, 0
  -- success three times in a row: n is past what the operation allocates
  while successes < 3 do
    collectgarbage()
    -- armed inside the protected call: pcall itself may need memory
    local ok, err = pcall(function() fail(n) return fn() end)
    fail(-1)
    if ok then
      successes = successes + 1
    else
      successes = 0
      injected = injected + 1
      if not is_memory_error(err) then
        failures = failures + 1
        print(("FAIL %s at n=%d: %s"):format(name, n, tostring(err)))
      end
    end
    n = n + 1
    if n > 20000 then error(name .. ": never succeeded") end
  end
  print(("%-28s %5d allocation points, %4d failures injected"):format(name, n, injected))
end
threads:shutdown()
procs:shutdown()
collectgarbage()
print(("%d passed, %d failed"):format(#operations - (failures > 0 and 1 or 0), failures > 0 and 1 or 0))
if failures > 0 then os.exit(1) end
