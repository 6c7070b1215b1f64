-- Ctrl-C and SIGTERM on the luapool host: sent with kill to luapool's pid
-- alone (not its process group), whatever a task or the script is doing.
local luapool = require "luapool"
local h = require "helper"

local q = h.shell_quote

-- Starts the binary on a script in the background.  The script gets a
-- file name as its first argument and writes a line to it whenever it is
-- ready for the next signal.  Returns a handle with :ready(n), :kill(sig),
-- :finish() -> stdout, stderr, exit status, seconds since the last kill.
local function start(script_text, ...)
  local run = {
    script = h.tempfile(script_text),
    out = os.tmpname(), err = os.tmpname(), rc = os.tmpname(),
    pidf = os.tmpname(), ready_f = os.tmpname(),
  }
  os.remove(run.rc)
  local args = { q(run.ready_f) }
  for _, a in ipairs { ... } do args[#args + 1] = q(a) end
  local inner = ("%s %s %s >%s 2>%s </dev/null & echo $! >%s; wait $!; echo $? >%s.tmp; mv %s.tmp %s")
    :format(q(h.bin), q(run.script), table.concat(args, " "), q(run.out), q(run.err),
      q(run.pidf), q(run.rc), q(run.rc), q(run.rc))
  assert(os.execute("sh -c " .. q(inner) .. " >/dev/null 2>&1 &"))
  function run:ready(n)
    h.wait_until(function()
      local s = h.slurp(self.ready_f) or ""
      local _, lines = s:gsub("\n", "")
      return lines >= n
    end, "the script to be ready (" .. n .. ")", 30)
  end
  function run:kill(sig)
    local pid = tonumber(h.slurp(self.pidf))
    assert(pid, "no pid")
    self.killed_at = luapool.now()
    assert(os.execute(("kill -%s %d"):format(sig, pid)))
  end
  function run:finish()
    h.wait_until(function() return h.slurp(self.rc) ~= nil end, "luapool to exit", 60)
    local took = luapool.now() - (self.killed_at or 0)
    local so, se, code = h.slurp(self.out), h.slurp(self.err), tonumber(h.slurp(self.rc))
    for _, f in ipairs { self.script, self.out, self.err, self.rc, self.pidf, self.ready_f } do
      os.remove(f)
    end
    return so, se, code, took
  end
  return run
end

-- Lines the scripts start with: `ready()` tells the spec to send a signal.
local PRELUDE = [[
local ready_file = ...
local function ready()
  local f = assert(io.open(ready_file, "a")) f:write("ready\n") f:close()
end
]]

describe("signals on the host", function()
  if os.getenv("LUAPOOL_SANITIZER") == "tsan" then
    -- TSan holds a signal back until the thread calls an intercepted function
    it("are not run under tsan", function() pending("signals are deferred under tsan") end)
    return
  end

  -- glibc's system() ignores SIGINT for the whole process while its child
  -- runs; before, the signal was dropped and the script ended with 0 after
  -- 20 s.  And a stop that interrupts nothing (shutdown, <close>) joined its
  -- threads with no limit: the Ctrl-C stopped the task's Lua, not system(),
  -- and the script waited the 20 s out (a task stuck for good held it for
  -- ever: helper-49).
  for _, case in ipairs {
    { "threadpool", "f:result()" }, { "threadpool", "p:shutdown()" }, { "iopool", "p:shutdown()" },
    { "threadpool", "do local q <close> = p end" },
  } do
    local kind, how = case[1], case[2]
    it("SIGINT reaches the script in " .. how .. " while a " .. kind ..
      " task runs os.execute: exit 130 at once", function()
      local child = os.tmpname()
      local run = start(PRELUDE .. [[
        local child, kind, how = select(2, ...)
        local p = _G[kind].new { max_workers = 1, name = "sh" }
        local f = p:submit(function(path)
          return os.execute("echo $$ > " .. path .. "; exec sleep 20")
        end, child)
        while not (io.open(child) and io.open(child):read("n")) do luapool.sleep(0.01) end
        ready()
        assert(load(how, "=how", "t", { p = p, f = f }))()
        print("not reached")]], child, kind, how)
      run:ready(1)
      luapool.sleep(0.3) -- (in the wait by then)
      run:kill("INT")
      local out, err, code, took = run:finish()
      local pid = tonumber(h.slurp(child))
      if pid then os.execute("kill " .. pid .. " 2>/dev/null") end
      os.remove(child)
      assert.are.equal(130, code)
      assert.are.equal("", out)
      assert.matches("^luapool: interrupted: the script received SIGINT\nstack traceback:\n", err)
      -- the thread stuck in system() is left behind, and said so, without the 5 s wait
      assert.matches("\nluapool: 1 worker thread%(s%) of pool 'sh' did not stop within 0%.5 " ..
        "seconds and were left running\n$", err)
      assert.is_true(took < 10, ("took %.1f s"):format(took))
    end)
  end

  -- A pool left open is stopped while the state closes, and its joins give
  -- up on a thread stuck in system() half a second after a signal: the
  -- host then exited 0, as if the script had finished, and said the
  -- threads "did not stop within 5 seconds".
  for _, sig in ipairs { { "INT", 130 }, { "TERM", 143 } } do
    it("SIG" .. sig[1] .. " while the script's end stops a pool left open: exit " .. sig[2],
      function()
        local child = os.tmpname()
        local run = start(PRELUDE .. [[
          local child = select(2, ...)
          local p = threadpool.new { max_workers = 1, name = "left" }
          p:submit(function(path)
            return os.execute("echo $$ > " .. path .. "; exec sleep 20")
          end, child)
          while not (io.open(child) and io.open(child):read("n")) do luapool.sleep(0.01) end
          ready()]], child)
        run:ready(1)
        luapool.sleep(0.3) -- (the script has ended: its pool's join waits out the 5 s)
        run:kill(sig[1])
        local out, err, code, took = run:finish()
        local pid = tonumber(h.slurp(child))
        if pid then os.execute("kill " .. pid .. " 2>/dev/null") end
        os.remove(child)
        assert.are.equal(sig[2], code)
        assert.are.equal("", out)
        local waited = assert(err:match(
          "^luapool: pool 'left' was collected while still open: 0 queued tasks cancelled, " ..
          "1 running task interrupted %(close it, or call shutdown%(%), to wait for its work%)\n" ..
          "luapool: 1 worker thread%(s%) of pool 'left' did not stop within ([%d.]+) seconds " ..
          "and were left running\nluapool: interrupted: the script received SIG" .. sig[1] ..
          "\n$"), err)
        -- half a second after the signal, which came about 0.3 s into the join
        assert.is_true(tonumber(waited) >= 0.5 and tonumber(waited) < 5, waited)
        assert.is_true(took < 4, ("took %.1f s"):format(took))
      end)
  end

  -- The loop stopped every task it held at its next stops pass, taken
  -- after the Ctrl-C or not: a task submitted right after a caught one
  -- ended "interrupted: task #2 was interrupted in worker iopool-1"
  -- (helper-51: every time with the loop busy in os.execute, 18 of 20
  -- with it idle on a timer).
  for _, hog in ipairs {
    { "busy in os.execute", [[coroutine.yield(); os.execute("touch " .. path .. "; sleep 1")]] },
    { "idle on a timer", [[io.open(path, "w"):close(); luapool.sleep(5)]] },
  } do
    it("lets an iopool task submitted right after a caught SIGINT run (the loop " .. hog[1] .. ")",
      function()
        local started = os.tmpname()
        os.remove(started)
        local run = start(PRELUDE .. [[
          local path = select(2, ...)
          local p <close> = iopool.new {}
          local first = p:submit(function() ]] .. hog[2] .. [[ end)
          while not io.open(path) do luapool.sleep(0.01) end
          ready()
          print("first", pcall(first.result, first))
          print("new", pcall(function() return p:submit(function() return 42 end):result() end))
          print("map", #p:map(function(x) luapool.sleep(0.01) return x end, { 1, 2, 3 }))]],
          started)
        run:ready(1)
        run:kill("INT")
        local out, err, code = run:finish()
        os.remove(started)
        assert.are.equal("", err)
        assert.are.equal(0, code)
        assert.are.equal("first\tfalse\tinterrupted: the script received SIGINT\nnew\ttrue\t42\n" ..
          "map\t3\n", out)
      end)
  end

  it("leaves an iopool's later tasks free to wait after a caught SIGINT", function()
    -- (the stop stayed set in the loop's stop block, which its tasks wait
    -- under: every later task's wait failed "interrupted: Ctrl-C": helper-50)
    local run = start(PRELUDE .. [[
      local io <close> = iopool.new {}
      local function nested()
        local tp <close> = threadpool.new { max_workers = 1 }
        return tp:submit(function() return "nested ok" end):result()
      end
      print("before", io:submit(nested):result())
      local f = io:submit(luapool.sleep, 30)
      while not f:running() do luapool.sleep(0.01) end
      ready()
      print("ctrl-c", pcall(f.result, f))
      print("task", f:exception().kind)
      print("after", io:submit(nested):result())]])
    run:ready(1)
    run:kill("INT")
    local out, err, code = run:finish()
    assert.are.equal("", err)
    assert.are.equal(0, code)
    assert.are.equal("before\tnested ok\nctrl-c\tfalse\tinterrupted: the script received SIGINT\n" ..
      "task\tinterrupted\nafter\tnested ok\n", out)
  end)

  it("delivers a second SIGINT after a caught one as a new, catchable interruption", function()
    local run = start(PRELUDE .. [[
      local p <close> = threadpool.new { max_workers = 2 }
      for batch = 1, 2 do
        local fs = {}
        for i = 1, 3 do fs[i] = p:submit(luapool.sleep, 30) end
        while p:stats().running < 2 do luapool.sleep(0.01) end -- two run, one queued
        ready()
        local ok, e = pcall(function() for _, f in ipairs(fs) do f:result() end end)
        print(batch, ok, e.kind, e.message)
        for _, f in ipairs(fs) do io.write(f:exception().kind, " ") end
        print()
      end
      print("done")]])
    run:ready(1)
    run:kill("INT")
    run:ready(2)
    run:kill("INT")
    local out, err, code = run:finish()
    assert.are.equal("", err)
    assert.are.equal(0, code)
    assert.are.equal("1\tfalse\tinterrupted\tthe script received SIGINT\n" ..
      "interrupted interrupted cancelled \n" ..
      "2\tfalse\tinterrupted\tthe script received SIGINT\n" ..
      "interrupted interrupted cancelled \n" ..
      "done\n", out)
  end)

  it("exits 143 on an uncaught SIGTERM, also while a thread task runs os.execute", function()
    local run = start(PRELUDE .. [[
      local p <close> = threadpool.new { max_workers = 2 }
      local f = p:submit(luapool.sleep, 30)
      p:submit(os.execute, "sleep 3")
      luapool.sleep(0.2)
      ready()
      f:result()]])
    run:ready(1)
    run:kill("TERM")
    local out, err, code, took = run:finish()
    assert.are.equal(143, code)
    assert.are.equal("", out)
    assert.matches("^luapool: interrupted: the script received SIGTERM\nstack traceback:\n", err)
    assert.is_true(took < 5, ("took %.1f s"):format(took))
  end)

  describe("during HTTP in the main script", function()
    local srv
    setup(function() srv = h.fixture() end)
    teardown(function() if srv then srv:stop() end end)

    for _, call in ipairs { "luapool.http.get", "luapool.kernels.fetch_length" } do
      it("ends " .. call .. " and raises the interrupted error", function()
        -- before, the call waited for the whole 10 s transfer
        local run = start(PRELUDE .. [[
          local url = select(2, ...)
          local t0 = luapool.now()
          local ok, e = pcall(function()
            ready()
            return ]] .. call .. [[(url)
          end)
          print(ok, e.kind, e.message, luapool.now() - t0 < 5)]], srv:url("/sleep?s=10"))
        run:ready(1)
        luapool.sleep(0.2) -- into the transfer
        run:kill("INT")
        local out, err, code, took = run:finish()
        assert.are.equal("", err)
        assert.are.equal(0, code)
        assert.are.equal("false\tinterrupted\tthe script received SIGINT\ttrue\n", out)
        assert.is_true(took < 5, ("took %.1f s"):format(took))
      end)
    end
  end)

  it("exits 130 on a SIGINT at any moment of its start, also before the script runs", function()
    -- 180 starts, each sent SIGINT 0-4 ms after the exec of luapool (seen
    -- in /proc/PID/comm; the delay a loop of the shell's builtins, about
    -- 1 us a turn): before the host blocks the signal it dies of it (130,
    -- nothing said), after that the script is interrupted (130, the
    -- message).  A signal taken while the host set up its state, after
    -- the module opened and before the script's call, once left "(error
    -- object is not a string)" and exit 1; one taken before the module
    -- could deliver it waited for a wait that the script (a loop that
    -- never waits, but ends after 20 s of CPU: nothing is left behind)
    -- does not make: it ran on to its end, and the outer timeout failed.
    -- (env --default-signal: sh starts a background command with SIGINT
    -- ignored, and one that came before the host took SIGINT over was lost)
    local script = h.tempfile("while os.clock() < 20 do end\n")
    local log = os.tmpname()
    local inner = ([[
      for d in 0 100 200 300 400 600 800 1000 1200 1500 2000 4000; do
        for k in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
          : >%s.err
          env --default-signal=INT %s %s 2>%s.err </dev/null >/dev/null & p=$!
          until read c </proc/$p/comm 2>/dev/null && [ "$c" = luapool ]; do :; done
          j=0
          while [ $j -lt $d ]; do j=$((j + 1)); done
          kill -INT $p
          wait $p
          echo "$? $(head -n 1 %s.err)"
        done
      done >%s]]):format(q(log), q(h.bin), q(script), q(log), q(log), q(log))
    local ok = os.execute("timeout 120 sh -c " .. q(inner))
    local out = h.slurp(log) or ""
    os.remove(script); os.remove(log); os.remove(log .. ".err")
    assert(ok, "the starts did not all end within 120 s:\n" .. out)
    local n, wrong = 0, {}
    for line in out:gmatch("[^\n]+") do
      n = n + 1
      if line ~= "130 " and line ~= "130 luapool: interrupted: the script received SIGINT" then
        wrong[#wrong + 1] = line
      end
    end
    assert.are.equal(180, n)
    assert.are.equal("", table.concat(wrong, "\n"))
  end)
end)

describe("Ctrl-C in a pool's initializer", function()
  if os.getenv("LUAPOOL_SANITIZER") == "tsan" then
    it("is not run under tsan", function() pending("signals are deferred under tsan") end)
    return
  end
  -- It broke the pool ("the initializer failed in worker in-1: interrupted:
  -- Ctrl-C"; processes: "... killed by signal 9") and every later task
  -- failed broken.
  local said = {
    threadpool = "task #1 was interrupted in worker in-1, in the pool's initializer",
    iopool = "task #1 was interrupted in worker in-1, in the pool's initializer",
    processpool = "task #1 was interrupted: worker in-1 (pid PID) was stopped in the initializer",
  }
  for _, kind in ipairs { "threadpool", "iopool", "processpool" } do
    it("ends the task as interrupted on a " .. kind .. ", which runs it again for the next", function()
      local marker = os.tmpname()
      os.remove(marker)
      finally(function() os.remove(marker) end)
      local out, err, code = h.run({ "-e", h.initializer_ctrl_c_script(marker, kind .. ".new") })
      assert.are.equal(0, code, err)
      -- (a process worker is a new process, with its first run)
      assert.are.equal("false\tinterrupted: the script received SIGINT\n" ..
        "interrupted\t" .. said[kind] .. "\n" ..
        "next\t" .. (kind == "processpool" and 1 or 2) .. "\n", out)
    end)
  end
end)
