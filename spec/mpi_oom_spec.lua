-- A serving rank with no memory for a reply: the task must not vanish (rank
-- 0 would wait for it forever).  The rank's answer allocations fail on
-- demand in a LUAPOOL_TEST_ALLOC build only (base/alloc.h): the rank reads
-- LUAPOOL_TEST_MPI_REPLY_OOM=N, and its next N answers of a task fail to
-- allocate.  In another build this spec says it needs one.
local luapool = require "luapool"
local h = require "helper"

local q = h.shell_quote

-- Runs script as rank 0 of `mpiexec -n 2`, the rank's first `oom` answer
-- allocations failing; returns stdout, stderr, status.
local function run(script, oom)
  local path = h.tempfile(script)
  local out, err = os.tmpname(), os.tmpname()
  local ok, how, code = os.execute(("LUAPOOL_TEST_MPI_REPLY_OOM=%d timeout 120 %s %s >%s 2>%s </dev/null"):format(
    oom, h.mpi_launch(2), q(path), out, err))
  local so, se = h.slurp(out), h.slurp(err)
  os.remove(out); os.remove(err); os.remove(path)
  if how == "signal" then code = 128 + code end
  return so, se, ok and 0 or code
end

local SCRIPT = [[
  local mp <close> = mpipool.new { max_workers = 1 }
  local f = mp:submit(function() return ("x"):rep(100) end)
  local ok, e = pcall(f.result, f, 30)
  if ok then print(ok, #e) else print(ok, e.kind, e.message) end
  print(mp:submit(function() return "next" end):result(30))]]

describe("a serving rank with no memory for a reply", function()
  if not h.mpiexec or not luapool.testing then
    it("needs an MPI build with -DLUAPOOL_TEST_ALLOC=ON", function()
      pending("the rank's allocations fail on demand only in a LUAPOOL_TEST_ALLOC build")
    end)
    return
  end

  it("fails the task with kind transfer, saying why, and goes on", function()
    -- the reply's allocation fails; the failure's, much smaller, does not
    local out, err, code = run(SCRIPT, 1)
    assert.are.equal(0, code, err)
    assert.are.equal(("false\ttransfer\trank 1 of 2 on %s: not enough memory to send the result of task #1 "
      .. "back (111 bytes)\nnext\n"):format(h.host), out)
  end)

  it("sends the reply later when not even the failure could be sent", function()
    -- both fail: the answer is owed and sent on the rank's next pass
    local out, err, code = run(SCRIPT, 2)
    assert.are.equal(0, code, err)
    assert.are.equal("true\t100\nnext\n", out)
  end)
end)
