-- Part b of the conformance suite on mpipool under `mpiexec -n 3`
-- (spec/mpi_conformance.lua says how, and which specs each part runs).
local h = require "helper"
local conf = require "mpi_conformance"

describe("the conformance suite on mpipool, part b", function()
  if not h.mpiexec then
    it("needs MPI", function() pending("this build has no MPI (spec/mpi_spec.lua checks what it says)") end)
    return
  end

  it("runs every spec that loops over helper.engines in one of its parts", function()
    assert.are.equal("", conf.check())
  end)

  it("passes " .. table.concat(conf.parts.b, ", ") .. " on mpipool", function()
    local counts, out = conf.run("b")
    assert.is_truthy(counts, out)
    assert.matches("^%d+ successes / 0 failures / 0 errors / %d+ pending$", counts, out)
    assert.are.equal("", conf.pending_not_sanitizer(out))
    assert.is_true(tonumber(counts:match("^%d+")) >= 140, out)
  end)
end)
