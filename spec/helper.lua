-- Shared by the specs: the binary under test, running it, the fixture.
local M = {}

M.bin = os.getenv("LUAPOOL_BIN") or "build/luapool"

-- The conformance suite: every spec that loops over this list (the futures
-- API: submit, result, map, imap, as_completed, wait, cancel, callbacks,
-- shutdown, <close>, errors, deadlines) runs on every engine in it.  A new
-- engine is added here; what only one engine does (a process crash, a
-- memory cap) stays in that engine's own specs.
M.engines = { "threadpool", "processpool", "iopool" }
-- What luapool.current_worker().kind says inside a task of each engine.
M.worker_kinds = { threadpool = "thread", processpool = "process", iopool = "io" }

-- Options for a pool that runs max_workers tasks at a time, as a spec that
-- counts on it wants: on an iopool max_workers counts loop threads, each
-- running many tasks at once, so concurrency says it there.
function M.serial(kind, opts)
  if kind == "iopool" then opts.concurrency = opts.max_workers end
  return opts
end
M.serial_opt = { iopool = ", concurrency = 1" } -- for a pool made in a script's text
M.source_dir = os.getenv("LUAPOOL_SOURCE_DIR") or "."

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.shell_quote = shell_quote

-- Reads a whole file, or nil.
function M.slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- Runs the luapool binary with the given arguments (a list), stdin from
-- `input` when given, extra environment variables from `env` (a table).
-- Returns stdout, stderr, exit status.
function M.run(args, input, env)
  local out, err = os.tmpname(), os.tmpname()
  local cmd = { shell_quote(M.bin) }
  if env then
    local names = {}
    for k in pairs(env) do names[#names + 1] = k end
    table.sort(names)
    for i = #names, 1, -1 do table.insert(cmd, 1, names[i] .. "=" .. shell_quote(env[names[i]])) end
  end
  for _, a in ipairs(args) do cmd[#cmd + 1] = shell_quote(a) end
  local inpath
  if input then
    inpath = os.tmpname()
    local f = assert(io.open(inpath, "wb"))
    f:write(input)
    f:close()
  end
  local line = table.concat(cmd, " ") .. " >" .. out .. " 2>" .. err ..
    (inpath and (" <" .. inpath) or " </dev/null")
  local ok, how, code = os.execute(line)
  local so, se = M.slurp(out), M.slurp(err)
  os.remove(out); os.remove(err)
  if inpath then os.remove(inpath) end
  if how == "signal" then code = 128 + code end
  return so, se, ok and 0 or code
end

-- Writes text to a fresh temporary file and returns its path.
function M.tempfile(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

-- Starts the nginx fixture; a spec that needs it and cannot start it fails.
function M.fixture()
  local fixture = require "luapool.fixture"
  local srv, err = fixture.start()
  assert(srv, err)
  return srv
end

-- The message of the string error f(...) must raise, without its
-- "CHUNK:LINE: " position (positions have tests of their own).
function M.error_of(f, ...)
  local ok, err = pcall(f, ...)
  if ok then error("expected an error", 2) end
  if type(err) ~= "string" then error("expected a string error, got " .. tostring(err), 2) end
  return (err:gsub("^[^:\n]*:%d+: ", "", 1))
end

-- Each case is { function written on one line, message }: calling the
-- function must raise "SRC:LINE: message" naming the line it was written
-- on, SRC being the calling spec's file.  Returns the mismatches, one per
-- line ("" when none).
function M.wrong_positions(cases)
  local src = debug.getinfo(2, "S").short_src
  local wrong = {}
  for _, case in ipairs(cases) do
    local ok, err = pcall(case[1])
    local expect = src .. ":" .. debug.getinfo(case[1], "S").linedefined .. ": " .. case[2]
    if ok or err ~= expect then
      wrong[#wrong + 1] = ("got      %s\nexpected %s"):format(tostring(err), expect)
    end
  end
  return table.concat(wrong, "\n")
end

-- The error object raised by fut:result(timeout).
function M.result_error(fut, timeout)
  local ok, e = pcall(fut.result, fut, timeout)
  if ok then error("expected result() to raise", 2) end
  if type(e) ~= "table" then error("expected an error object, got " .. tostring(e), 2) end
  return e
end

-- Waits until pred() holds, failing after `limit` seconds (default 10).
function M.wait_until(pred, what, limit)
  local now, sleep = require("luapool").now, require("luapool").sleep
  local deadline = now() + (limit or 10)
  while not pred() do
    if now() >= deadline then error("gave up waiting: " .. what, 2) end
    sleep(0.005)
  end
end

-- Is process pid alive (and not a zombie)?
function M.alive(pid)
  local stat = M.slurp("/proc/" .. pid .. "/stat")
  if not stat then return false end
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= "Z" and state ~= "X"
end

return M
