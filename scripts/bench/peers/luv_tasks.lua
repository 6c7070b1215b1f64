-- luv's peer of luapool's per-task and big-value jobs (scripts/bench/peers.lua),
-- run by stock lua5.4 with Debian's lua-luv: libuv's thread pool through
-- uv.new_work / uv.queue_work.
--
-- usage: UV_THREADPOOL_SIZE=2 lua5.4 luv_tasks.lua MODE N [SIZE]
--   noop N         N no-op tasks (each returns its argument), all queued, then
--                  every result taken in its after-work callback
--   string N SIZE  N tasks, each returning a string of SIZE bytes made in the
--                  worker (a 1 KiB string repeated: string.rep of one byte
--                  costs a memcpy call per byte, 3.5 ms a MiB, which would
--                  hide what moving the value costs); each result's length is
--                  checked, then dropped
--   table N SIZE   N tasks, each returning a table of SIZE numbers: luv cannot
--                  (a work function returns nil, booleans, numbers, strings
--                  and userdata only); prints luv's refusal and exits with 2
-- The pool has UV_THREADPOOL_SIZE threads (libuv reads it when the pool first
-- starts, so it must be in the environment).  luv sends the work function as
-- bytecode, without upvalues: each function here uses only its arguments and
-- globals.
local uv = require "luv"

local mode, n, size = arg[1], math.tointeger(tonumber(arg[2] or "")), math.tointeger(tonumber(arg[3] or "0"))
if not (mode and n and n > 0 and size) then
  io.stderr:write("usage: UV_THREADPOOL_SIZE=2 lua5.4 luv_tasks.lua noop|string|table N [SIZE]\n")
  os.exit(1)
end

local done, failure = 0, nil

if mode == "noop" then
  local results = {}
  local work = uv.new_work(function(i, x) return i, x end, function(i, x)
    results[i] = x
    done = done + 1
  end)
  for i = 1, n do uv.queue_work(work, i, 1) end
  uv.run()
  for i = 1, n do
    if results[i] ~= 1 then failure = ("task %d gave %s"):format(i, tostring(results[i])) break end
  end
elseif mode == "string" then
  local work = uv.new_work(function(i, len) return i, string.rep(string.rep("x", 1024), len // 1024) end, function(i, s)
    if type(s) ~= "string" or #s ~= size then failure = failure or ("task %d: bad result"):format(i) end
    done = done + 1
  end)
  for i = 1, n do uv.queue_work(work, i, size) end
  uv.run()
elseif mode == "table" then
  local refusal
  local work = uv.new_work(function(len)
    local t = {}
    for i = 1, len do t[i] = i end
    return t
  end, function(t)
    refusal = type(t) == "table" and "" or ("the result arrived as %s"):format(type(t))
    done = done + 1
  end)
  -- luv reports the refusal on stderr ("thread arg not support type
  -- 'table'") and calls the after-work callback with nothing
  local ok, err = pcall(uv.queue_work, work, size)
  if ok then err = select(2, pcall(uv.run)) end
  if refusal == "" then
    print("luv carried a table: this script needs a real table job")
    os.exit(0)
  end
  print("cannot: luv does not carry tables (" .. tostring(refusal or err) .. ")")
  os.exit(2)
else
  io.stderr:write("unknown mode " .. mode .. "\n")
  os.exit(1)
end

if failure or done ~= n then
  io.stderr:write(("luv %s: %s (%d of %d done)\n"):format(mode, failure or "missing results", done, n))
  os.exit(1)
end
print(("luv %s: %d tasks"):format(mode, n))
