-- Shared by the specs: the binary under test, running it, the fixture.
local luapool = require "luapool"
local M = {}

M.bin = os.getenv("LUAPOOL_BIN") or "build/luapool"

-- The conformance suite: every spec that loops over this list (the futures
-- API: submit, result, map, imap, as_completed, wait, cancel, callbacks,
-- shutdown, <close>, errors, deadlines) runs on every engine in it.  A new
-- engine is added here; what only one engine does (a process crash, a
-- memory cap) stays in that engine's own specs.
M.engines = { "threadpool", "processpool", "iopool" }
-- What luapool.current_worker().kind says inside a task of each engine.
M.worker_kinds = { threadpool = "thread", processpool = "process", iopool = "io", mpipool = "mpi" }

-- {====== per-engine expectations
-- What the conformance specs expect that differs by engine, as data, so
-- that a spec asks (h.traits[kind].kills, h.worker_pattern(kind, "io"))
-- instead of naming engines.  spec/mpi_spec.lua runs the suite with
-- M.engines = { "mpipool" } as rank 0 of `mpiexec -n 3 luapool --mpi busted`.
--   kills: a task past its deadline (or a looping initializer) is stopped by
--     killing its worker process, and the message says so; a chunk then
--     fails as a whole.
--   own_process: tasks run in the spec's own process (threads, loops).
--   ranked: workers are MPI ranks: an error's `worker` is "rank r of n on
--     host", crash, deadline and initializer messages start "rank r of n on
--     host: ", and worker indexes repeat on each rank.
M.traits = {
  threadpool = { own_process = true },
  processpool = { kills = true },
  iopool = { own_process = true },
  mpipool = { kills = true, ranked = true },
}

local function read_line(path)
  local f = io.open(path)
  if not f then return nil end
  local l = f:read("l")
  f:close()
  return l
end
M.host = read_line("/proc/sys/kernel/hostname") or "?"
-- The ranks of the MPI job this process is rank 0 of (nil outside one).
M.mpi_size = tonumber(os.getenv("OMPI_COMM_WORLD_SIZE") or os.getenv("PMI_SIZE") or "")

local function pquote(s) return (s:gsub("%p", "%%%0")) end

-- The pattern a task error's `worker` matches on a pool named `name`.
function M.worker_pattern(kind, name)
  if M.traits[kind].ranked then
    return ("^rank %%d+ of %d on %s$"):format(M.mpi_size or 0, pquote(M.host))
  end
  return "^" .. pquote(name) .. "%-%d+$"
end

-- The `worker` of a task error from worker i of a pool named `name` (on a
-- ranked engine: from rank i).
function M.worker_name(kind, name, i)
  if M.traits[kind].ranked then return ("rank %d of %d on %s"):format(i, M.mpi_size or 0, M.host) end
  return name .. "-" .. i
end

-- What starts a crash, deadline or initializer message (a pattern): the
-- rank it happened on, for a ranked engine; "" otherwise.
function M.at(kind)
  if M.traits[kind].ranked then
    return ("rank %%d+ of %d on %s: "):format(M.mpi_size or 0, pquote(M.host))
  end
  return ""
end

-- The largest max_workers a pool may have: an mpipool has one worker per
-- serving rank (more are refused when the pool is made).
function M.largest(kind)
  if kind == "mpipool" then return (M.mpi_size or 2) - 1 end
  return 4096
end

-- Options for a pool that runs opts.max_workers tasks at once on every
-- engine: an mpipool of more workers than the job has serving ranks takes
-- fewer ranks with more slots each (3 on 2 ranks: 1 rank of 3 slots; 4:
-- 2 of 2), so the same count runs at once.  pool.max_workers then says the
-- ranks: a spec reads it from the options this returns.
function M.sized(kind, opts)
  local n, ranks = opts.max_workers, M.largest(kind)
  if kind == "mpipool" and n and n > ranks then
    local r = ranks
    while n % r ~= 0 do r = r - 1 end
    opts.max_workers, opts.slots = r, n // r
  end
  return opts
end
-- }======

-- Options for a pool that runs max_workers tasks at a time, as a spec that
-- counts on it wants: on an iopool max_workers counts loop threads, each
-- running many tasks at once, so concurrency says it there.
function M.serial(kind, opts)
  if kind == "iopool" then opts.concurrency = opts.max_workers end
  return M.sized(kind, opts)
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

-- What an MPI launch started by a spec needs (spec/mpi_spec.lua, M.run):
-- root is refused unless both are set; 2 cores hold 3 ranks only when
-- oversubscribed; shared memory between the ranks (vader, without the
-- single-copy mechanism a container's ptrace rules forbid).  Under
-- AddressSanitizer, Open MPI's own leaks are not ours to report.
M.mpiexec = os.getenv("LUAPOOL_MPIEXEC")
M.mpi_env = {
  "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
  "OMPI_MCA_rmaps_base_oversubscribe=true", "OMPI_MCA_btl=self,vader",
  "OMPI_MCA_btl_vader_single_copy_mechanism=none", "OMPI_MCA_mpi_yield_when_idle=true",
  os.getenv("ASAN_OPTIONS") and shell_quote("ASAN_OPTIONS=" .. os.getenv("ASAN_OPTIONS") .. ":detect_leaks=0") or nil,
}

-- The words that start `mpiexec -n n luapool --mpi` from any process: inside
-- a rank (the conformance suite runs as rank 0), the job's own variables
-- are taken away first, or the new mpiexec and its ranks would take them
-- for theirs (and luapool refuses --mpi where LUAPOOL_MPI_CHILD is set).
function M.mpi_launch(n)
  local words = { "env" }
  local p = io.popen("env -0")
  local all = p:read("a")
  p:close()
  for name in all:gmatch("([^%z=]+)=[^%z]*%z") do
    if name:match("^OMPI_") or name:match("^PMIX_") or name:match("^PMI_") or name:match("^LUAPOOL_MPI_") then
      words[#words + 1] = "-u " .. name
    end
  end
  for _, e in ipairs(M.mpi_env) do words[#words + 1] = e end
  words[#words + 1] = shell_quote(assert(M.mpiexec, "LUAPOOL_MPIEXEC is not set"))
  words[#words + 1] = "-n " .. n
  words[#words + 1] = shell_quote(M.bin)
  words[#words + 1] = "--mpi"
  return table.concat(words, " ")
end

-- Runs the luapool binary with the given arguments (a list), stdin from
-- `input` when given, extra environment variables from `env` (a table).
-- With `engine` "mpipool" (a conformance spec running a script on its
-- engine), as rank 0 of `mpiexec -n 3 luapool --mpi ARGS`.
-- Returns stdout, stderr, exit status.
function M.run(args, input, env, engine)
  local out, err = os.tmpname(), os.tmpname()
  local cmd = { engine == "mpipool" and M.mpi_launch(3) or shell_quote(M.bin) }
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

-- Gates: a path that does not exist yet, opened when the spec makes the
-- file (touch); a task waits for it with wait_file.
function M.fresh_path()
  local path = os.tmpname()
  os.remove(path)
  return path
end

function M.touch(path) assert(io.open(path, "w")):close() end

function M.exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

-- In a task (it travels to any worker, luapool by its name): waits until
-- the file at path exists, at most `limit` seconds (default 20), so that a
-- gate left shut ends the task instead of hanging the spec.  True once it
-- exists.
function M.wait_file(path, limit)
  local deadline = luapool.now() + (limit or 20)
  while luapool.now() < deadline do
    local f = io.open(path)
    if f then
      f:close()
      return true
    end
    luapool.sleep(0.01)
  end
  return false
end

-- Is process pid alive (and not a zombie)?
-- The script of "Ctrl-C in a pool's initializer" (signals_spec, mpi_spec):
-- `new` (such as "threadpool.new") makes a pool of one worker named "in"
-- whose initializer hangs on its first run only (it creates the file
-- `marker` first); the script sends itself SIGINT meanwhile and prints what
-- its pcall, the task and a next task say (that one: "next" and the
-- initializer's run count in its worker), then runs `tail` (Lua, with `f`
-- and `pool` in scope).
function M.initializer_ctrl_c_script(marker, new, tail)
  return ([[
    local marker = %q
    local pool <close> = %s { max_workers = 1, name = "in", initializer = function()
      _G.RUNS = (_G.RUNS or 0) + 1
      if not io.open(marker) then
        assert(io.open(marker, "w")):close()
        luapool.sleep(30)
      end
    end }
    local f = pool:submit(function() return "finished" end)
    while not io.open(marker) do luapool.sleep(0.005) end
    -- (from the background: system() ignores SIGINT while its command runs)
    os.execute(("(sleep 0.2; kill -INT %%d) &"):format(luapool.current_worker().pid))
    print(pcall(f.exception, f, 20))
    print(f:exception(20).kind, (f:exception().message:gsub("pid %%d+", "pid PID")))
    print(pool:submit(function() return "next", _G.RUNS end):result(20))
    %s]]):format(marker, new, tail or "")
end

function M.alive(pid)
  local stat = M.slurp("/proc/" .. pid .. "/stat")
  if not stat then return false end
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= "Z" and state ~= "X"
end

return M
