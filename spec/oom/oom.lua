-- Out-of-memory paths: run by a luapool host built with LUAPOOL_TEST_ALLOC
-- (and ASan, so a leak or a bad access fails the run).  For each operation,
-- the main state's allocations fail from the n-th on, for n = 0, 1, 2...
-- until the operation succeeds with room to spare.  Every failure must be
-- a Lua error saying the memory ran out: never a crash, a hang or a leak.
--   build-oom/luapool spec/oom/oom.lua
-- The C allocations of the core and the bindings (src/base/alloc.h) are
-- failed the same way, from the n-th on and then the n-th alone (the code
-- must recover from one failed allocation): each failure is a clean "not
-- enough memory" error, or the operation recovers and returns what it
-- returns without any failure.
local fail = assert(__luapool_fail_alloc, "needs a luapool built with -DLUAPOOL_TEST_ALLOC=ON")
local fail_c = assert(luapool.testing and luapool.testing.fail_c_alloc,
  "needs a luapool built with -DLUAPOOL_TEST_ALLOC=ON")

local threads = threadpool.new { max_workers = 2 }
local procs = processpool.new { max_workers = 2 }
local shared = { 1, 2, { 3 } }
local up = { k = string.rep("v", 100) }
local function job(x) return up.k .. x, shared end
-- big strings: joined into the result, or put in place when the other
-- bytes (10,000 floats) outweigh them (codec.c, split_string)
local big = string.rep("b", 1 << 16)
local floats = {}
for i = 1, 10000 do floats[i] = i + 0.5 end

local operations = {
  { "codec.encode", function() return luapool.codec.encode({ a = shared, b = shared, f = job }) end },
  { "codec.encode (a fresh dump)", function() return luapool.codec.encode(load("return function() end")()) end },
  { "codec.encode (big strings joined)", function() return #luapool.codec.encode(big, { big, 1 }, big) end },
  { "codec.encode (big strings put in place)", function() return #luapool.codec.encode(floats, big) end },
  { "codec.decode", function()
    return luapool.codec.decode(luapool.codec.encode({ a = shared, f = job, s = string.rep("x", 300) }))
  end },
  { "threadpool.new", function() local p = threadpool.new { max_workers = 1 } p:shutdown() end },
  { "a new pool's first task", function()
    local p <close> = threadpool.new { max_workers = 1 }
    return p:submit(job, 4):result()
  end },
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
  { "http.request (a refused connection, retried)", function()
    -- no server needed: port 1 of the loopback refuses at once
    local r, e = luapool.http.request { url = "http://127.0.0.1:1/", retries = 1, retry_delay = 0.001 }
    if e and e:find("not enough memory", 1, true) then error(e) end
    return r == nil and e:match("^GET http://127.0.0.1:1/: ") ~= nil
  end },
  { "int128", function() return tostring(luapool.kernels.sum_squares(100000)) end },
}

local function is_memory_error(e)
  local text = type(e) == "table" and tostring(e.message) or tostring(e)
  return text:find("not enough memory", 1, true) ~= nil
end

local failures = 0
local function failed(name, how, n, err)
  failures = failures + 1
  print(("FAIL %s (%s) at n=%d: %s"):format(name, how, n, tostring(err)))
end

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
      if not is_memory_error(err) then failed(name, "Lua", n, err) end
    end
    n = n + 1
    if n > 20000 then error(name .. ": never succeeded") end
  end
  print(("%-28s %5d allocation points, %4d failures injected"):format(name, n, injected))
end

-- C allocations: fail_c returns how many the arming failed; n is past what
-- the operation allocates in C when none failed three times in a row.
for _, op in ipairs(operations) do
  local name, fn = op[1], op[2]
  local want = fn() -- what it returns with memory to spare
  for _, once in ipairs { false, true } do
    local how = once and "C, once" or "C"
    local n, clean, injected = 0, 0, 0
    while clean < 3 do
      collectgarbage()
      local ok, got = pcall(function() fail_c(n, once) return fn() end)
      local nfailed = fail_c(-1)
      if nfailed > 0 then
        clean = 0
        injected = injected + 1
        if not ok and not is_memory_error(got) then failed(name, how, n, got) end
      else
        clean = clean + 1
        if not ok then failed(name, how .. ", nothing failed", n, got) end
      end
      -- a call that got through returns what it returns with memory to spare
      -- (an encoding's bytes differ from one call to the next: not compared)
      if ok and type(want) ~= "table" and not name:find("^codec%.encode") and got ~= want then
        failed(name, how, n, ("returned %s, not %s"):format(tostring(got), tostring(want)))
      end
      n = n + 1
      if n > 20000 then error(name .. ": never got through") end
    end
    print(("%-28s %5d C allocation points, %4d failures injected (%s)"):format(name, n, injected, how))
  end
end
threads:shutdown()
procs:shutdown()
collectgarbage()
print(failures == 0 and "oom: clean" or ("oom: %d failures"):format(failures))
if failures > 0 then os.exit(1) end
