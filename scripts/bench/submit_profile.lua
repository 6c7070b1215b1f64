-- A fixed workload for instruction counts (callgrind), not for wall time:
-- 20,000 no-op submits on a threadpool of 2, then every result.
--   valgrind --tool=callgrind --separate-threads=yes build/luapool scripts/bench/submit_profile.lua
-- The script's thread is the one running pmain (run_host); its total over
-- 20,000 is the owner's cost per task.
local N = tonumber(... or 20000)
local pool <close> = threadpool.new { max_workers = 2 }
local function noop(x) return x end
local fs = {}
for i = 1, N do fs[i] = pool:submit(noop, i) end
for i = 1, N do assert(fs[i]:result() == i) end
