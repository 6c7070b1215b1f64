-- Offline demo of both reference jobs.  Starts a local nginx with real
-- latency (the project's fixture), fetches the same URLs sequentially and
-- on a threadpool so the speedup shows, then runs the CPU job.
--
-- usage: luapool scripts/demo.lua [--urls N] [--delay SECONDS]

local fixture = require "luapool.fixture"

local nurls, delay = 20, 0.2
local args = { ... }
for i = 1, #args, 2 do
  if args[i] == "--urls" then nurls = math.tointeger(tonumber(args[i + 1]))
  elseif args[i] == "--delay" then delay = tonumber(args[i + 1])
  else error("unknown option " .. tostring(args[i])) end
end
assert(nurls and nurls > 0 and delay and delay >= 0, "bad --urls or --delay")

local srv <close> = assert(fixture.start())
local here = (arg and arg[0] or "scripts/demo.lua"):match("^(.*)/[^/]*$") or "."
-- the interpreter is arg's lowest index (options such as -W come between)
local exe = "luapool"
if arg and arg[-1] then
  local k = -1
  while arg[k - 1] do k = k - 1 end
  exe = arg[k]
end

local urlfile = os.tmpname()
local _ <close> = setmetatable({}, { __close = function() os.remove(urlfile) end })
do
  local f = assert(io.open(urlfile, "w"))
  for i = 1, nurls do
    -- every URL waits `delay` seconds server-side; n only makes them distinct
    f:write(srv:url(("/sleep?s=%g&n=%d"):format(delay, i)), "\n")
  end
  f:close()
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

-- Runs a script, echoes its output, returns the seconds it reported.
local function run(title, script, ...)
  print(("== %s"):format(title))
  local cmd = { q(exe), q(here .. "/" .. script) }
  for _, a in ipairs { ... } do cmd[#cmd + 1] = q(a) end
  local p = assert(io.popen(table.concat(cmd, " ") .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  io.write(out)
  if not ok then error(title .. " failed") end
  return tonumber(out:match("execution time: ([%d.]+) seconds"))
end

local t_seq = run(("I/O job, sequential: %d URLs x %g s"):format(nurls, delay),
  "io.lua", "--sequential", "--urls", urlfile)
local t_pool = run(("I/O job, threadpool of 10: the same %d URLs"):format(nurls),
  "io.lua", "--workers", "10", "--urls", urlfile)
print(("== I/O speedup: %.1fx (sequential %.3f s, threadpool %.3f s, ideal %.3f s)")
  :format(t_seq / t_pool, t_seq, t_pool, math.ceil(nurls / 10) * delay))
run("CPU job, processpool of " .. luapool.cpu_count(), "cpu.lua")
