-- mpipool under a real MPI launch: every test starts `mpiexec` itself
-- (Open MPI from Debian's openmpi-bin), with the settings a root CI job on
-- a 2-core container needs (OMPI_ENV).  LUAPOOL_MPIEXEC (set by
-- spec/CMakeLists.txt when CMake found MPI) names mpiexec; without it the
-- build has no MPI, and only what such a build says is checked.
local luapool = require "luapool"
local h = require "helper"

local q = h.shell_quote
local MPIEXEC = h.mpiexec
local BIN = h.bin
local OTHER = BIN:gsub("luapool$", "luapool-otherwire")
local OTHER_ORDER = BIN:gsub("luapool$", "luapool-otherorder") -- (spec/CMakeLists.txt)
local HOST = io.popen("hostname"):read("l")

-- (helper.lua's mpi_env: what a root CI job on a 2-core container needs)
local OMPI_ENV = table.concat(h.mpi_env, " ")

-- Runs `mpiexec -n N luapool --mpi SCRIPT ARGS...` (mpmd: more of the
-- command line after the script's, such as ": -n 1 other --mpi"; bin: a
-- binary other than luapool for those N; env: "NAME=value ..." for the
-- launch; limit: seconds before timeout(1) ends the job, 120 unless given).
-- Returns stdout, stderr, exit status.
local function mpirun(n, script, args, mpmd, bin, env, limit)
  local path = h.tempfile(script)
  local out, err = os.tmpname(), os.tmpname()
  local words = {}
  for _, a in ipairs(args or {}) do words[#words + 1] = q(a) end
  local line = ("env %s %s timeout %d %s -n %d %s --mpi %s %s %s >%s 2>%s </dev/null"):format(
    OMPI_ENV, env or "", limit or 120, q(MPIEXEC), n, q(bin or BIN), q(path), table.concat(words, " "), mpmd or "",
    out, err)
  local ok, how, code = os.execute(line)
  local so, se = h.slurp(out), h.slurp(err)
  os.remove(out); os.remove(err); os.remove(path)
  if how == "signal" then code = 128 + code end
  return so, se, ok and 0 or code
end

-- Runs a script that must succeed; returns its stdout.
local function mpiok(n, script, args, env)
  local out, err, code = mpirun(n, script, args, nil, nil, env)
  assert(code == 0, ("mpiexec exited %s\nstdout:\n%s\nstderr:\n%s"):format(code, out, err))
  return out
end

if not MPIEXEC then
  describe("mpipool in a build without MPI", function()
    it("says so", function()
      local out, err, code = h.run({ "-e", "print(select(2, pcall(mpipool.new)))" })
      assert.are.equal(0, code, err)
      assert.matches("^mpipool: this build of luapool has no MPI", out)
      local _, err2, code2 = h.run({ "--mpi", "x.lua" })
      assert.are.equal(1, code2)
      assert.matches("this build of luapool has no MPI", err2)
    end)
  end)
  return
end

describe("mpipool", function()
  it("runs tasks on the serving ranks: results in order, closures, kernels", function()
    local out = mpiok(3, [[
      local mp <close> = mpipool.new {}
      print(mp, mp.kind, mp.max_workers, mp.chunking)
      local base = 10
      local function add(x) return x + base end        -- an upvalue travels
      local fs = {}
      for i = 1, 50 do fs[i] = mp:submit(add, i) end
      local got = {}
      for i = 1, 50 do got[i] = fs[i]:result() end
      print(table.concat(got, ","))
      print(table.concat(mp:map(function(x) return x * x end, { 1, 2, 3, 4, 5 }), ","))
      print(table.concat(mp:starmap(function(a, b) return a .. b end, { { "a", 1 }, { "b", 2 } }), ","))
      local sq = mp:map(luapool.kernels.sum_squares, { 10000000, 12000000 })
      print(tostring(sq[1]), tostring(sq[2]))
      local big = {}
      for i = 1, 5000 do big[i] = i end
      local r = mp:map(function(x) return x + 1 end, big)
      print(#r, r[1], r[5000])
      local n = 0
      for _, v in mp:imap(function(x) return -x end, { 1, 2, 3 }) do n = n + v end
      print(n)]])
    local expect = {}
    for i = 1, 50 do expect[i] = i + 10 end
    assert.are.equal(table.concat({
      "mpipool 'mpipool' (2 workers max)\tmpipool\t2\ttrue",
      table.concat(expect, ","),
      "1,4,9,16,25",
      "a1,b2",
      "333333283333335000000\t575999928000002000000",
      "5000\t2\t5001",
      "-6", "" }, "\n"), out)
  end)

  it("tells a task where it runs, and names the rank as the worker", function()
    local out = mpiok(3, [[
      local mp <close> = mpipool.new { slots = 2 }
      local ws = mp:map(function() luapool.sleep(0.05) return luapool.current_worker() end,
                        { 1, 2, 3, 4, 5, 6, 7, 8 }, { chunksize = 1 })
      local me = luapool.current_worker().pid
      local ranks, pids = {}, {}
      for _, w in ipairs(ws) do
        assert(w.kind == "mpi" and w.size == 3 and w.pid ~= me and w.name:match("^mpipool%-[12]$"))
        ranks[w.rank] = w.host
        pids[w.pid] = true
      end
      local npid = 0
      for _ in pairs(pids) do npid = npid + 1 end
      print(ranks[1], ranks[2], npid <= 4)
      local f = mp:submit(function() return 1 end)
      f:result()
      print(luapool.current_worker().kind)]])
    assert.are.equal(("%s\t%s\ttrue\nmain\n"):format(HOST, HOST), out)
  end)

  it("raises task errors with the rank as worker and the traceback kept", function()
    local out = mpiok(3, [[
      local mp <close> = mpipool.new { max_workers = 1 }
      local function deep() error("boom") end
      local ok, e = pcall(function() return mp:submit(function() deep() end):result() end)
      print(ok, e.kind, e.message, e.worker)
      print(e.traceback:find("deep", 1, true) ~= nil)
      print(tostring(e):match("^[^\n]*"))
      local ok2, e2 = pcall(mp.map, mp, function(x) if x == 3 then error({ code = x }) end return x end,
                            { 1, 2, 3, 4 })
      print(ok2, e2.kind, e2.item, e2.value.code)]])
    local w = "rank 1 of 3 on " .. HOST
    local src = out:match("\t([^\t]-):%d+: boom\t")
    assert.is_truthy(src, out)
    assert.are.equal(table.concat({
      ("false\ttask\t%s:2: boom\t%s"):format(src, w),
      "true",
      ("task failed in worker %s: %s:2: boom"):format(w, src),
      "false\ttask\t3\t3", "" }, "\n"), out)
  end)

  it("fails a task whose worker crashes with kind crashed, and goes on", function()
    local out = mpiok(2, [[
      local mp <close> = mpipool.new { slots = 2 }
      local f = mp:submit(function() os.exit(3) end)
      local ok, e = pcall(f.result, f)
      print(ok, e.kind)
      print(e.message)
      print(mp:submit(function() return "after" end):result())
      local fs = {}
      for i = 1, 4 do fs[i] = mp:submit(function(x) if x == 2 then os.exit(1) end return x end, i) end
      print(fs[1]:result(), fs[2]:exception().kind, fs[3]:result(), fs[4]:result())]])
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("false\tcrashed", lines[1])
    assert.matches(("^rank 1 of 2 on %s: worker mpipool%%-%%d %%(pid %%d+%%) exited with status 3 "
      .. "while running task #1$"):format(HOST:gsub("%p", "%%%0")), lines[2])
    assert.are.equal("after", lines[3])
    assert.are.equal("1\tcrashed\t3\t4", lines[4])
  end)

  it("enforces max_memory_mb on a rank's workers", function()
    local out = mpiok(2, [[
      local mp <close> = mpipool.new { max_memory_mb = 64 }
      local f = mp:submit(function() local t = {} while true do t[#t + 1] = ("x"):rep(1000) .. #t end end)
      local ok, e = pcall(f.result, f)
      print(ok, e.kind, e.message)
      print(mp:submit(function() return "next" end):result())]])
    assert.matches(("^false\tcrashed\trank 1 of 2 on %s: worker mpipool%%-1 %%(pid %%d+%%) ran out of "
      .. "memory %%(max_memory_mb = 64%%) while running task #1\nnext\n$"):format(HOST:gsub("%p", "%%%0")), out)
  end)

  it("kills a task past its deadline with kind timeout, and goes on", function()
    local out = mpiok(2, [[
      local mp <close> = mpipool.new { task_timeout = 0.3 }
      local t0 = luapool.now()
      local f = mp:submit(function() while true do end end)
      local ok, e = pcall(f.result, f)
      print(ok, e.kind, luapool.now() - t0 < 10)
      print(e.message)
      print(mp:submit(function() return "fine" end):result())
      local ok2, e2 = pcall(mp.map, mp, function(x) if x == 2 then while true do end end return x end,
                            { 1, 2, 3 }, { chunksize = 3 })
      print(ok2, e2.kind, e2.message:match("^[^;]*"))]])
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal("false\ttimeout\ttrue", lines[1])
    assert.matches(("^rank 1 of 2 on %s: task #1 exceeded its deadline of 0.3 seconds in worker "
      .. "mpipool%%-1; the worker %%(pid %%d+%%) was killed and will be replaced$"):format(HOST:gsub("%p", "%%%0")),
      lines[2])
    assert.are.equal("fine", lines[3])
    assert.are.equal(("false\ttimeout\trank 1 of 2 on %s: item #2 exceeded its deadline of 0.3 seconds "
      .. "in worker mpipool-1"):format(HOST), lines[4])
  end)

  it("gives up a rank that stops answering: its task with a deadline fails timeout, the rest go elsewhere, "
    .. "<close> returns", function()
    -- rank 1 is stopped (SIGSTOP, as a hung host) while it holds a task:
    -- only rank 0 can end that task, by its own bound (the deadline, a
    -- second for the worker's start, 5 s of grace); the rank then gets no
    -- more tasks, and the pool closes without waiting for it.  It is
    -- continued at the end, so that the job finalizes (and nothing is left).
    local out, err, code = mpirun(3, [[
      local t0 = luapool.now()
      local rank1
      do
        local mp <close> = mpipool.new { task_timeout = 0.5 }
        local function where() -- the task's rank, and that rank's pid
          local w = luapool.current_worker()
          return w.rank, tonumber(io.open("/proc/self/stat"):read("a"):match("^%d+ %b() %a (%d+)"))
        end
        repeat
          local r, pid = mp:submit(where):result()
          if r == 1 then rank1 = pid end
        until rank1
        local xs = {}
        for i = 1, 2 do xs[i] = mp:submit(function() luapool.sleep(0.3) return luapool.current_worker().rank end) end
        os.execute("kill -STOP " .. rank1)
        local t1 = luapool.now()
        for i = 1, 2 do
          local ok, v = pcall(xs[i].result, xs[i], 60)
          if ok then print("done", v) else print(v.kind, v.message) end
        end
        local took = luapool.now() - t1
        print("bounded", took > 6 and took < 20)
        print("workers", mp:stats().workers)
        local rs = mp:map(function(x) return x * 10, luapool.current_worker().rank end, { 1, 2, 3 })
        print("later", table.concat(rs, ","))
        local ranks = {}
        for i = 1, 3 do
          ranks[i] = select(2, mp:submit(function() return 0, luapool.current_worker().rank end):result())
        end
        print("on", table.concat(ranks, ","))
      end
      print("closed", luapool.now() - t0 < 40)
      os.execute("kill -CONT " .. rank1)]], nil, nil, nil, nil, 60)
    assert.are.equal(0, code, err)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    -- (either task may be the one rank 1 held)
    if lines[2] and lines[2]:sub(1, 4) == "done" then lines[1], lines[2] = lines[2], lines[1] end
    assert.are.same({
      "done\t2",
      ("timeout\ttask #%d exceeded its deadline of 0.5 seconds on rank 1 of 3 on %s, and the rank did not "
        .. "answer within 5 seconds after it (stopped, or its host hung): it gets no more tasks of this pool")
        :format(tonumber(out:match("task #(%d+) exceeded")), HOST),
      "bounded\ttrue", "workers\t1", "later\t10,20,30", "on\t2,2,2", "closed\ttrue",
    }, lines)
    assert.matches(("^luapool: mpipool 'mpipool': rank 1 of 3 on %s did not answer %%(task #%%d+ was not "
      .. "reported within 5 seconds of its deadline%%); its tasks were failed, and it was left as it is\n$")
      :format(HOST:gsub("%p", "%%%0")), err)
  end)

  it("gives futures in completion order to as_completed and wait", function()
    -- Task x ends once the file gate .. x exists, and the loop over
    -- as_completed opens the next gate only when it was given the last
    -- task: 4 first, then 3, 2, 1 (sleeps of different lengths lose their
    -- order on a loaded machine, where a worker may start late).  The slow
    -- task of wait ends once the script printed the stats.
    local gate = os.tmpname()
    local out = mpiok(3, ([[
      local gate = %q
      local function open(name) io.open(gate .. name, "w"):close() end
      local function held(name)
        local t = luapool.now()
        while luapool.now() - t < 30 do
          local f = io.open(gate .. name)
          if f then f:close() return end
          luapool.sleep(0.005)
        end
      end
      local mp <close> = mpipool.new { slots = 2 }
      local fs = {}
      for i = 1, 4 do fs[i] = mp:submit(function(x) held(tostring(x)) return x end, i) end
      local order = {}
      open("4")
      for f in luapool.as_completed(fs) do
        order[#order + 1] = f:result()
        if f:result() > 1 then open(tostring(f:result() - 1)) end
      end
      print(table.concat(order, " "))
      local slow = mp:submit(function() held("slow") return 1 end)
      local quick = mp:submit(function() return 2 end)
      local done, not_done = luapool.wait({ slow, quick }, { return_when = "FIRST_COMPLETED" })
      print(#done, #not_done, done[1] == quick)
      local s = mp:stats()
      print(s.workers, s.done, s.running)
      open("slow")
      print(slow:result())
      for _, name in ipairs { "1", "2", "3", "4", "slow" } do os.remove(gate .. name) end]]):format(gate))
    os.remove(gate)
    assert.are.equal("4 3 2 1\n1\t1\ttrue\n4\t5\t1\n1\n", out)
  end)

  it("cancels queued tasks, also those already sent to a rank", function()
    -- (the busy task holds the rank's one slot until the file go exists,
    -- made once both cancels were asked: the queued task cannot have
    -- started before, however late the script gets to its cancel)
    local go = os.tmpname()
    os.remove(go)
    local out = mpiok(2, ([[
      local go = %q
      local mp <close> = mpipool.new { max_workers = 1 }
      local busy = mp:submit(function()
        local t = luapool.now()
        while not io.open(go) and luapool.now() - t < 30 do luapool.sleep(0.005) end
        return "busy"
      end)
      local queued = mp:submit(function() return "queued" end)
      while not busy:running() do luapool.sleep(0.01) end
      io.write(tostring(busy:cancel()), "\t", tostring(queued:cancel()), "\t", tostring(queued:cancelled()), "\t")
      io.open(go, "w"):close()
      print(busy:result())
      os.remove(go)
      -- a long queue: tasks are sent ahead to the rank, and still cancelled
      local fs = {}
      for i = 1, 200 do fs[i] = mp:submit(function(x) luapool.sleep(0.005) return x end, i) end
      while not fs[1]:done() do luapool.sleep(0.005) end
      local c = 0
      for i = 200, 2, -1 do if fs[i]:cancel() then c = c + 1 end end
      local ran = 0
      for i = 1, 200 do
        if not fs[i]:cancelled() then assert(fs[i]:result() == i) ran = ran + 1 end
      end
      local s = mp:stats()
      print(c + ran, c > 150, s.cancelled == c + 1, s.running, s.pending)]]):format(go))
    assert.are.equal("false\ttrue\ttrue\tbusy\n200\ttrue\ttrue\t0\t0\n", out)
  end)

  it("does not cancel a task sent to a free slot, though its rank has yet to start it", function()
    -- rank 0 says it runs from its sending; the rank, stopped meanwhile
    -- (SIGSTOP), takes it and the cancel in one pass, before its fresh
    -- local pool started it: a running task is not cancelled (pool_spec's
    -- cancel case met this now and then)
    local out = mpiok(2, [[
      local rank_pid
      do
        local a <close> = mpipool.new { max_workers = 1 }
        rank_pid = a:submit(function()
          return tonumber(io.open("/proc/self/stat"):read("a"):match("^%d+ %b() %a (%d+)"))
        end):result()
      end
      local mp <close> = mpipool.new { max_workers = 1 }
      os.execute("kill -STOP " .. rank_pid)
      local f = mp:submit(function() return "ran" end)
      while not f:running() do luapool.sleep(0.005) end
      luapool.sleep(0.1)
      os.execute("(sleep 0.3; kill -CONT " .. rank_pid .. ") >/dev/null 2>&1 &")
      print(f:cancel(), f:cancelled(), f:cancelled() or f:result())]])
    assert.are.equal("false\tfalse\tran\n", out)
  end)

  it("starts a task as it takes it for a rank: shutdown{cancel_futures = true} finds it running", function()
    -- (LUAPOOL_TEST_MPI_SEND_DELAY: the progress thread waits a second
    -- between taking the task from the queue and sending it.  Started only
    -- at its sending, the task was neither queued nor running meanwhile:
    -- the shutdown did not cancel it, it read as pending, and it ran after)
    local out = mpiok(2, [[
      local mp <close> = mpipool.new { max_workers = 1 }
      local f = mp:submit(function() return "ran" end)
      while mp:stats().idle > 0 do luapool.sleep(0.001) end -- taken for the rank
      mp:shutdown { cancel_futures = true, wait = false }
      print(f:running(), f:cancelled(), f:done())
      print(f:result(20))]], nil, "LUAPOOL_TEST_MPI_SEND_DELAY=1")
    assert.are.equal("true\tfalse\tfalse\nran\n", out)
  end)

  it("sends a map's chunks ahead on a short queue: exact results, and a failed map's rest cancelled or run", function()
    -- one rank of one slot, its pace known (quick tasks first): a chunk
    -- goes to the rank while the one before it runs.  When chunk 1 fails
    -- the map cancels the rest; one already started on the rank (its
    -- worker takes the next chunk at once, as a processpool's does) runs:
    -- each of chunks 2 and 3 is either cancelled or run, never lost
    local mark = os.tmpname()
    local out = mpiok(2, ([[
      local mp <close> = mpipool.new { max_workers = 1 }
      mp:map(function(x) return x end, { 1, 2, 3, 4, 5, 6, 7, 8 }, { chunksize = 1 })
      local sq = mp:map(luapool.kernels.sum_squares, { 10000000, 12000000, 11000000, 9000000, 13000000 })
      for i = 1, 5 do sq[i] = tostring(sq[i]) end
      print(table.concat(sq, " "))
      local ok, e = pcall(mp.map, mp, function(x)
        if x == 1 then luapool.sleep(0.2) error("first") end
        io.open(%q, "a"):write(x, "\n"):close()
        return x
      end, { 1, 2, 3 }, { chunksize = 1 })
      print(ok, e.kind, e.item)
      local s = mp:stats()
      while s.running + s.pending > 0 do luapool.sleep(0.01) s = mp:stats() end
      local ran = 0
      for _ in io.open(%q):lines() do ran = ran + 1 end
      print(ran + s.cancelled, s.failed)]]):format(mark, mark))
    os.remove(mark)
    assert.are.equal("333333283333335000000 575999928000002000000 443666606166668500000 "
      .. "242999959500001500000 732333248833335500000\nfalse\ttask\t1\n2\t1\n", out)
  end)

  -- Two ranks of one slot and a map of five chunks that wait for a file:
  -- how many run at once (stats().running, which counts a chunk sent
  -- ahead), and on which rank each ran.  A rank's pace, which decides how
  -- far ahead it is sent (AHEAD_SECONDS of its recent answers, capped at
  -- CHUNKS_AHEAD a slot: mpi_owner.c), is fixed by LUAPOOL_TEST_MPI_PACE:
  -- measured, it follows the load of the machine, and on a busy CI machine
  -- the answers of a stream of quick tasks came more than 1 ms apart.  The
  -- progress output makes the file once it saw `want` running and then
  -- `hold` seconds more (or after 5 s).  Prints the most seen running and
  -- the ranks in the map's order.
  local function short_map(pace, want, hold)
    local go = os.tmpname()
    os.remove(go)
    local out = mpiok(3, ([[
      local mp <close> = mpipool.new {}
      local t0, path, most, since = luapool.now(), %q, 0, nil
      local function seen()
        most = math.max(most, mp:stats().running)
        if most >= %d and not since then since = luapool.now() end
        local f = io.open(path)
        if f then
          f:close()
        elseif (since and luapool.now() - since >= %g) or luapool.now() - t0 > 5 then
          io.open(path, "w"):close()
        end
      end
      local r = mp:map(function(p)
        local t = luapool.now()
        while luapool.now() - t < 20 do
          local f = io.open(p)
          if f then f:close() break end
          luapool.sleep(0.005)
        end
        return luapool.current_worker().rank
      end, { path, path, path, path, path },
        { chunksize = 1, progress = { tty = true, interval = 0.02, output = seen } })
      os.remove(path)
      print(most, table.concat(r, " "))]]):format(go, want, hold), nil, "LUAPOOL_TEST_MPI_PACE=" .. pace)
    os.remove(go)
    return out
  end

  it("sends a short map's chunks to its ranks at once, up to two a slot", function()
    -- a pace of 0.1 ms: 20 tasks in AHEAD_SECONDS, capped at two ahead:
    -- all five go at once, three to one rank and two to the other (where
    -- one a slot left the fifth on rank 0 until an answer came)
    local out = short_map("0.0001", 5, 0)
    local most, a, b = out:match("^(%d+)\t(%d) (%d) %2 %3 %2\n$")
    assert(most, out)
    assert.are.equal("5", most)
    assert.are_not.equal(a, b)
  end)

  it("sends a short map's chunks ahead only as far as the ranks' pace covers", function()
    -- a pace of 1.5 ms: one task ahead in AHEAD_SECONDS: two a rank, and
    -- the fifth waits on rank 0 for the first answer (0.3 s seen so)
    local out = short_map("0.0015", 4, 0.3)
    local most, a, b = out:match("^(%d+)\t(%d) (%d) %2 %3 [12]\n$")
    assert(most, out)
    assert.are.equal("4", most)
    assert.are_not.equal(a, b)
  end)

  it("polls MPI slowly on a rank whose slots are all busy, and on rank 0 with nothing queued", function()
    -- (counts, not speed: the voluntary context switches of the rank's
    -- loop, read by its worker, and of rank 0's threads other than the
    -- script's, over a task of 20 ms, per millisecond of the window each
    -- was counted in.  Polling every 50 us, as both did for 10 ms after a
    -- message, they took 110-160, 5.5-8 a ms; the rank now polls every
    -- 1 ms (about 20: 1 a ms) and rank 0 backs off (about 60 with MPI's
    -- threads: 3 a ms).  A rate, since on a loaded machine the window
    -- stretches and so does a count, while a loop that sleeps 1 ms wakes
    -- less often a ms, not more)
    local out = mpiok(3, [[
      local mp <close> = mpipool.new {}
      local me = luapool.current_worker().pid
      local function switches(pid, tid)
        local n = 0
        local f = io.popen(tid and ("cat /proc/%d/task/%d/status"):format(pid, tid)
          or ("cat /proc/%d/task/*/status"):format(pid))
        for v in f:read("a"):gmatch("\nvoluntary_ctxt_switches:%s*(%d+)") do n = n + tonumber(v) end
        f:close()
        return n
      end
      local task = function(d)
        local rank = io.open("/proc/self/stat"):read("a"):match("^%d+ %b() %a (%d+)")
        local function loop()
          local s = io.open("/proc/" .. rank .. "/task/" .. rank .. "/status"):read("a")
          return tonumber(s:match("\nvoluntary_ctxt_switches:%s*(%d+)"))
        end
        local a, t = loop(), luapool.now()
        luapool.sleep(d)
        return (loop() - a) / ((luapool.now() - t) * 1e3)
      end
      mp:submit(task, 0.001):result()
      local worst_rank, worst_owner = 0, 0
      for _ = 1, 3 do
        luapool.sleep(0.05)
        local a, am, t = switches(me), switches(me, me), luapool.now()
        local r = mp:submit(task, 0.02):result()
        local b, bm, ms = switches(me), switches(me, me), (luapool.now() - t) * 1e3
        worst_rank = math.max(worst_rank, r)
        worst_owner = math.max(worst_owner, ((b - a) - (bm - am)) / ms)
      end
      print(worst_rank <= 3 or worst_rank, worst_owner <= 5 or worst_owner)]])
    assert.are.equal("true\ttrue\n", out)
  end)

  it("leaves idle ranks and rank 0 at almost no CPU", function()
    -- (no speed here: utime + stime from /proc over 2 s, well after the last
    -- task; a loop that spun would take most of a core, an idle one takes
    -- about 1 %, and the bound is generous for a loaded machine)
    local out = mpiok(3, [[
      local mp <close> = mpipool.new {}
      local who = mp:map(function()
        luapool.sleep(0.05)
        return tonumber(io.open("/proc/self/stat"):read("a"):match("^%d+ %b() %a (%d+)"))
      end, { 1, 2, 3, 4 }, { chunksize = 1 })
      for i = 1, 200 do mp:submit(function() return i end):result() end
      local pids, seen = { luapool.current_worker().pid }, {}
      for _, p in ipairs(who) do
        if not seen[p] then seen[p] = true pids[#pids + 1] = p end
      end
      local function ticks(pid) -- utime + stime, in clock ticks (100 a second)
        local f = {}
        for w in io.open("/proc/" .. pid .. "/stat"):read("a"):gsub("^%d+ %b() ", ""):gmatch("%S+") do
          f[#f + 1] = w
        end
        return tonumber(f[12]) + tonumber(f[13])
      end
      luapool.sleep(0.5)
      local t0, a = luapool.now(), {}
      for i, p in ipairs(pids) do a[i] = ticks(p) end
      luapool.sleep(2)
      local dt, busy = luapool.now() - t0, {}
      for i, p in ipairs(pids) do
        local share = (ticks(p) - a[i]) / 100 / dt
        busy[#busy + 1] = share < 0.1 and "low" or ("%.0f%%"):format(share * 100)
      end
      print(#pids, table.concat(busy, " "))]])
    assert.are.equal("3\tlow low low\n", out)
  end)

  it("runs the initializer in each worker and follows package.path", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. q(dir)))
    local f = assert(io.open(dir .. "/mpimod.lua", "w"))
    f:write("return { v = 'from mpimod' }\n")
    f:close()
    local out = mpiok(3, [[
      local mp <close> = mpipool.new { initializer = function(v) _G.V = v end, initargs = { 42 } }
      print(mp:submit(function() return V end):result())
      package.path = ... .. "/?.lua;" .. package.path
      print(mp:submit(function() return require("mpimod").v end):result())]], { dir })
    os.remove(dir .. "/mpimod.lua")
    os.remove(dir)
    assert.are.equal("42\nfrom mpimod\n", out)
  end)

  it("fails clearly, never hangs, with no serving rank (mpiexec -n 1)", function()
    local out = mpiok(1, [[
      local ok, err = pcall(mpipool.new, {})
      print(ok, err)
      print(processpool.new{ max_workers = 1 }:submit(function() return "processpool works" end):result())]])
    assert.are.equal("false\tcannot create an mpipool: no rank serves tasks (this job has 1 rank); "
      .. "launch at least 2, as `mpiexec -n N luapool --mpi script.lua [args]`: rank 0 runs the "
      .. "script, ranks 1..N-1 serve its tasks\nprocesspool works\n", out)
  end)

  it("refuses max_workers above the serving ranks", function()
    local out = mpiok(3, [[print(select(2, pcall(mpipool.new, { max_workers = 3 })))]])
    assert.matches("cannot create an mpipool of max_workers = 3: 2 ranks serve tasks in this job "
      .. "%(mpiexec %-n 3%)\n$", out)
  end)

  it("refuses what it cannot do: cancelling running tasks, iopool options", function()
    -- (the conformance specs check these refusals on threadpools and
    -- processpools by name only: iopool_spec)
    local out = mpiok(2, [[
      local p <close> = mpipool.new {}
      print(select(2, pcall(p.shutdown, p, { cancel_running = true })))
      print(select(2, pcall(mpipool.new, { concurrency = 2 })))
      print(p:submit(function() return "still open" end):result())]])
    assert.are.equal("bad option 'cancel_running' to 'shutdown' (an mpipool cannot cancel a running task)\n"
      .. "bad option 'concurrency' to 'new' (an iopool option)\nstill open\n", out)
  end)

  it("says how to launch outside mpiexec", function()
    local out, _, code = h.run({ "-e", "print(select(2, pcall(mpipool.new)))" })
    assert.are.equal(0, code)
    assert.are.equal("mpipool: not in an MPI launch: run the script as `mpiexec -n N luapool --mpi "
      .. "script.lua [args]` (rank 0 runs it, ranks 1..N-1 serve its tasks)\n", out)
    local _, err, code2 = h.run({ "--mpi", "x.lua" })
    assert.are.equal(1, code2)
    assert.matches("^luapool: %-%-mpi needs an MPI launch: run `mpiexec %-n N luapool %-%-mpi script%.lua", err)
    local script = h.tempfile("print('ran')")
    local out3 = os.tmpname()
    local ok = os.execute(("env %s %s -n 1 %s %s >%s 2>&1"):format(OMPI_ENV, q(MPIEXEC), q(BIN), q(script), out3))
    local se = h.slurp(out3)
    os.remove(out3); os.remove(script)
    assert.is_not_true(ok)
    assert.is_nil(se:find("ran\n", 1, true))
    assert.matches("luapool: started by an MPI launcher %(OMPI_COMM_WORLD_SIZE is set%) without %-%-mpi", se)
  end)

  it("refuses a rank of another luapool build, naming both", function()
    local out, err, code = mpirun(1, [[
      local ok, e = pcall(mpipool.new, {})
      print(e)]], nil, ": -n 1 " .. q(OTHER) .. " --mpi")
    assert.are.equal(0, code, err)
    assert.matches("cannot create an mpipool: rank 1 of 2 is luapool [%d.]+ %(wire 0, [^)]*%), and rank 0 "
      .. "is luapool [%d.]+ %(wire 1, [^)]*%): every rank must run the same luapool build", out)
  end)
  it("refuses a rank 0 of the other byte order at once, naming both", function()
    -- (rank 0 is a build that writes its M_OPEN as a big-endian machine
    -- would: the ranks read its byte-order mark first, not its numbers,
    -- which they would misread, waiting for the open's 30 s timeout)
    local out, err, code = mpirun(1, [[
      local t0 = luapool.now()
      local ok, e = pcall(mpipool.new, {})
      print(ok, e)
      print(luapool.now() - t0 < 10)]], nil, ": -n 1 " .. q(BIN) .. " --mpi", OTHER_ORDER)
    assert.are.equal(0, code, err)
    local build = "luapool [%d.]+ %(wire 1, Lua 5%.4%.%d+, ENDIAN%-endian, 8%-byte integers and floats, kernels %x+%)"
    assert.matches("^false\tcannot create an mpipool: rank 1 of 2 is " .. build:gsub("ENDIAN", "little") ..
      ", and rank 0 is " .. build:gsub("ENDIAN", "big") .. ": every rank must run the same luapool build " ..
      "%(the binary mpiexec starts on each host%)\ntrue\n$", out)
  end)

  it("ends cleanly when a pool's progress thread is still out at exit", function()
    -- the rank is stopped (SIGSTOP) under a running task: the pool left open
    -- is collected at exit, and its stop gives up on its progress thread
    -- after 5 s, leaving it polling MPI; the exit then makes it leave its
    -- loop before MPI_Finalize (which waits for the rank, continued at 8 s)
    local out, err, code = mpirun(2, [[
      local mp = mpipool.new { max_workers = 1 }
      local rank_pid = mp:submit(function()
        return tonumber(io.open("/proc/self/stat"):read("a"):match("^%d+ %b() %a (%d+)"))
      end):result()
      local g = mp:submit(function() luapool.sleep(30) end)
      while not g:running() do luapool.sleep(0.01) end
      luapool.sleep(0.2)
      os.execute("kill -STOP " .. rank_pid)
      os.execute("(sleep 8; kill -CONT " .. rank_pid .. ") >/dev/null 2>&1 &")
      print("end of script")]])
    assert.are.equal(0, code, err)
    assert.are.equal("end of script\n", out)
    assert.are.equal("luapool: pool 'mpipool' was collected while still open: 0 queued tasks cancelled, 1 "
      .. "running task interrupted (close it, or call shutdown(), to wait for its work)\n"
      .. "luapool: 1 worker thread(s) of pool 'mpipool' did not stop within 5 seconds and were left running\n",
      err)
  end)

  it("ends with the script's os.exit status, MPI finalized (no 'exiting improperly')", function()
    -- (helper-55: os.exit skipped MPI_Finalize, and mpiexec made every
    -- os.exit(0) a 1 with its banner)
    for _, c in ipairs {
      { "print('hi') os.exit(0)", 0 },
      { "print('hi') os.exit(true)", 0 },
      { "local mp <close> = mpipool.new {} print('hi', mp:submit(function() return 7 end):result()) "
        .. "os.exit(0, true)", 0 },
      { "local mp = mpipool.new {} print('hi', mp:submit(function() return 7 end):result()) os.exit(3)", 3 },
      { "local mp = mpipool.new {} mp:submit(luapool.sleep, 30) luapool.sleep(0.5) print('hi') os.exit(0)", 0 },
    } do
      local t0 = luapool.now()
      local out, err, code = mpirun(2, c[1])
      assert.are.equal(c[2], code, c[1] .. "\n" .. err)
      assert.matches("^hi", out)
      assert.not_matches("improperly", err)
      assert.not_matches("finalize", err)
      assert.is_true(luapool.now() - t0 < 25, c[1])
    end
  end)

  it("lets a rank's idle workers exit at the pool's close: their last output and finalizers stay", function()
    -- (helper-55: the close killed them, and a task's output with no
    -- newline yet, or a __gc at the worker's end, was lost)
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir " .. q(dir)))
    local out = mpiok(3, [[
      local dir = ...
      do
        local mp <close> = mpipool.new {}
        mp:map(function(i)
          io.write("p" .. i .. ";")
          G = setmetatable({}, { __gc = function()
            local f = io.open(dir .. "/gc_" .. luapool.current_worker().pid, "w") f:write("bye") f:close()
          end })
          return i
        end, { 1, 2, 3, 4, 5, 6, 7, 8 }, { chunksize = 1 })
      end
      io.stdout:flush()]], { dir })
    local seen = {}
    for i in out:gmatch("p(%d+);") do seen[#seen + 1] = tonumber(i) end
    table.sort(seen)
    assert.are.same({ 1, 2, 3, 4, 5, 6, 7, 8 }, seen)
    local p = io.popen("ls " .. q(dir) .. " | grep -c '^gc_'")
    local n = tonumber(p:read("a"))
    p:close()
    os.execute("rm -rf " .. q(dir))
    assert.is_true(n >= 1 and n <= 2, "gc files: " .. tostring(n))
  end)

  -- (the conformance suite on mpipool: spec/mpi_conformance_a_spec.lua, _b_spec.lua)
end)

describe("mpipool and signals", function()
  if os.getenv("LUAPOOL_SANITIZER") == "tsan" then
    it("are not run under tsan", function() pending("signals are deferred under tsan") end)
    return
  end

  -- Starts a job in the background whose tasks record their pids and spin;
  -- returns a handle once every task runs.
  local function start_job()
    local run = { script = h.tempfile([[
      local out = ...
      local me = assert(io.open(out .. ".0", "w")) me:write(luapool.current_worker().pid, "\n") me:close()
      local mp <close> = mpipool.new { slots = 2 }
      local fs = {}
      for i = 1, 4 do fs[i] = mp:submit(function(path)
        local f = io.open(path, "a") f:write(luapool.current_worker().pid, "\n") f:close()
        while true do end
      end, out) end
      fs[1]:result()]]), pids = os.tmpname(), rc = os.tmpname(), mpid = os.tmpname(), log = os.tmpname() }
    os.remove(run.rc)
    local inner = ("env %s %s -n 3 %s --mpi %s %s >%s 2>&1 </dev/null & echo $! >%s; wait $!; "
      .. "echo $? >%s.tmp; mv %s.tmp %s"):format(OMPI_ENV, q(MPIEXEC), q(BIN), q(run.script), q(run.pids),
      q(run.log), q(run.mpid), q(run.rc), q(run.rc), q(run.rc))
    assert(os.execute("sh -c " .. q(inner) .. " >/dev/null 2>&1 &"))
    -- On a failed wait the job (its tasks spin forever) is killed, every
    -- rank and worker it recorded too, before the error goes on.
    local function or_kill(ok, err)
      if ok then return end
      -- (mpiexec ends the ranks it started on TERM; what is left then is killed)
      local mpid = tonumber(h.slurp(run.mpid) or "")
      if mpid then os.execute("kill -TERM " .. mpid .. " 2>/dev/null; sleep 2") end
      local all = (h.slurp(run.mpid) or "") .. (h.slurp(run.pids) or "") .. (h.slurp(run.pids .. ".0") or "")
      for pid in all:gmatch("%d+") do os.execute("kill -KILL " .. pid .. " 2>/dev/null") end
      error(err, 0)
    end
    or_kill(pcall(h.wait_until, function()
      local s = h.slurp(run.pids) or ""
      local _, n = s:gsub("\n", "")
      return n >= 4 and h.slurp(run.pids .. ".0")
    end, "the tasks to run", 60))
    function run:finish()
      or_kill(pcall(h.wait_until, function() return h.slurp(self.rc) ~= nil end, "mpiexec to exit", 30))
      local took = luapool.now() - self.killed_at
      local pids = {}
      for p in (h.slurp(self.pids) .. h.slurp(self.pids .. ".0")):gmatch("%d+") do pids[#pids + 1] = tonumber(p) end
      or_kill(pcall(h.wait_until, function()
        for _, p in ipairs(pids) do if h.alive(p) then return false end end
        return true
      end, "every rank and worker to be gone", 10))
      local code = tonumber(h.slurp(self.rc))
      for _, f in ipairs { self.script, self.pids, self.pids .. ".0", self.rc, self.mpid, self.log } do os.remove(f) end
      return code, took
    end
    return run
  end

  it("ends the task as interrupted on a Ctrl-C in the pool's initializer, which runs it again for the next", function()
    -- (as on every pool: signals_spec; the rank's local processpool kills
    -- its worker, is not broken, and starts a new one, with its first run)
    local marker = os.tmpname()
    os.remove(marker)
    finally(function() os.remove(marker) end)
    local out, err, code = mpirun(2, h.initializer_ctrl_c_script(marker, "mpipool.new", [[
      local rank, worker = pool:submit(function()
        return tonumber(io.open("/proc/self/stat"):read("a"):match("^%d+ %b() %a (%d+)")),
          luapool.current_worker().pid
      end):result(20)
      print("pids", rank, worker, f:exception().message:match("pid (%d+)"))]]))
    assert.are.equal(0, code, err)
    local pids = {}
    out = out:gsub("pids\t(%d+)\t(%d+)\t(%d+)\n$", function(...)
      pids = { ... }
      return ""
    end)
    assert.are.equal("false\tinterrupted: the script received SIGINT\n" ..
      "interrupted\trank 1 of 2 on " .. HOST .. ": task #1 was interrupted: worker in-1 (pid PID) was " ..
      "stopped in the initializer\n" ..
      "next\t1\n", out)
    assert.are.equal("", err)
    assert.are.equal(3, #pids)
    h.wait_until(function() -- the rank, its new worker and the killed one
      for _, pid in ipairs(pids) do if h.alive(pid) then return false end end
      return true
    end, "the rank and its workers to be gone", 10)
  end)

  it("runs a task submitted once the script caught a Ctrl-C: the interrupt reaches the rank ahead of it", function()
    -- (LUAPOOL_TEST_MPI_SEND_DELAY: the progress thread, sending the
    -- running task, is still away when the Ctrl-C comes and the next task
    -- is submitted, and takes both at its next round.  It sent the
    -- interrupt after that round's tasks, and the rank stopped the new one
    -- with the old: "the task was interrupted before it started")
    local out, err, code = mpirun(2, [[
      local mp <close> = mpipool.new { max_workers = 1, slots = 2 }
      local f = mp:submit(function() local t = luapool.now() while luapool.now() - t < 30 do end end)
      while mp:stats().idle > 1 do luapool.sleep(0.001) end -- taken for the rank
      os.execute(("(sleep 0.2; kill -INT %d) &"):format(luapool.current_worker().pid))
      print(pcall(f.exception, f, 20))
      local g = mp:submit(function() return "submitted after the Ctrl-C" end)
      print(f:exception(20).kind)
      print(pcall(g.result, g, 20))]], nil, nil, nil, "LUAPOOL_TEST_MPI_SEND_DELAY=2")
    assert.are.equal(0, code, err)
    assert.are.equal("false\tinterrupted: the script received SIGINT\ninterrupted\n" ..
      "true\tsubmitted after the Ctrl-C\n", out)
  end)

  it("Ctrl-C on mpiexec stops every rank and worker within seconds", function()
    local run = start_job()
    run.killed_at = luapool.now()
    assert(os.execute("kill -INT " .. tonumber(h.slurp(run.mpid))))
    local code, took = run:finish()
    -- mpiexec sends every rank SIGTERM (rank 0 exits 143, the serving ranks
    -- kill their workers), and reports 1 itself when it was interrupted
    assert.are.equal(1, code)
    assert.is_true(took < 15, "took " .. took)
  end)

  for _, c in ipairs { { "INT", 130 }, { "TERM", 143 } } do
    it("SIG" .. c[1] .. " to rank 0 ends the job with status " .. c[2], function()
      local run = start_job()
      run.killed_at = luapool.now()
      assert(os.execute(("kill -%s %d"):format(c[1], tonumber(h.slurp(run.pids .. ".0")))))
      local code, took = run:finish()
      assert.are.equal(c[2], code)
      assert.is_true(took < 15, "took " .. took)
    end)
  end
end)
