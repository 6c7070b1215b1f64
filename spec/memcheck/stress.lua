-- A workout for valgrind memcheck (CI runs it under valgrind with
-- --trace-children=yes): every kind of value, error, cancellation,
-- callback, timeout and crash through both pools, then everything closed.
--   valgrind --leak-check=full --error-exitcode=1 --trace-children=yes build/luapool spec/memcheck/stress.lua
local n = tonumber(... or 2000)
local shared = { list = { 1, 2.5, "three" }, flag = true }
shared.self = shared
local function work(i, t)
  if i % 97 == 0 then error({ code = i }) end
  if i % 89 == 0 then error("plain " .. i) end
  return i, t.list[3] .. i, setmetatable({ v = i }, { __index = t })
end

for _, kind in ipairs { "threadpool", "processpool" } do
  local pool <close> = luapool[kind].new { max_workers = 2, task_timeout = 5,
    initializer = function(tag) TAG = tag end, initargs = { kind } }
  local fs, failed, cancelled = {}, 0, 0
  for i = 1, n do
    fs[i] = pool:submit(work, i, shared)
    if i % 50 == 0 and fs[i]:cancel() then cancelled = cancelled + 1 end
    if i % 40 == 0 then fs[i]:add_done_callback(function(f) return f:done() end) end
  end
  for _, f in ipairs(fs) do
    if not f:cancelled() and f:exception() then failed = failed + 1 end
  end
  local mapped = pool:map(function(x) return x * 2 end, { 1, 2, 3, 4, 5 }, { chunksize = 2 })
  local seen = 0
  for _ in pool:imap(function(x) return TAG .. x end, { "a", "b", "c" }, { ordered = false }) do
    seen = seen + 1
  end
  local e = pool:submit(function() return coroutine.create(print) end):exception()
  local slow = pool:submit(function() while true do end end)
  local timed_out = pool:submit(function() luapool.sleep(0.01) end)
  print(kind, "failed", failed, "cancelled", cancelled, "mapped", #mapped, "imap", seen, e.kind)
  slow:cancel()
  timed_out:result()
  if kind == "processpool" then
    local crash = pool:submit(function() os.exit(3) end):exception()
    print(kind, crash.kind)
  end
  pool:shutdown { cancel_futures = true, wait = false }
end
collectgarbage()
