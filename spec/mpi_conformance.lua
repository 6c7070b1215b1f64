-- The conformance suite on mpipool (spec/mpi_conformance_a_spec.lua and
-- _b_spec.lua, two ctest tests so that each stays well inside its timeout):
-- busted runs as rank 0 of `mpiexec -n 3 luapool --mpi busted ...`, with a
-- busted helper that sets helper.engines to mpipool alone, so every case
-- that loops over the engines runs on an mpipool of the job's 2 serving
-- ranks.  What differs on mpipool is data in spec/helper.lua (traits,
-- worker_pattern, at, sized, run's engine).
local h = require "helper"

local M = {}

-- Which file each conformance spec runs in (a spec that loops over
-- helper.engines and is in neither list fails both tests: see check()).
M.parts = {
  a = { "executor_spec.lua", "imap_auto_spec.lua", "stress_spec.lua", "codec_spec.lua" },
  b = { "futures_spec.lua", "failures_spec.lua", "options_spec.lua", "pool_spec.lua", "worker_api_spec.lua" },
}

-- The specs of spec/ that loop over helper.engines (iopool_spec and
-- mpi_spec only talk about them).
local function conformance_specs()
  local found = {}
  local p = io.popen("ls " .. h.shell_quote(h.source_dir .. "/spec"))
  for name in p:lines() do
    if name:match("_spec%.lua$") then
      local text = h.slurp(h.source_dir .. "/spec/" .. name) or ""
      if text:find("ipairs(h.engines)", 1, true) or text:find("ipairs(helper.engines)", 1, true) then
        found[#found + 1] = name
      end
    end
  end
  p:close()
  table.sort(found)
  return found
end

-- "" when every conformance spec is in one of the parts, else what is not.
function M.check()
  local listed = {}
  for _, part in pairs(M.parts) do
    for _, name in ipairs(part) do listed[name] = true end
  end
  local missing = {}
  for _, name in ipairs(conformance_specs()) do
    if not listed[name] then missing[#missing + 1] = name end
  end
  return table.concat(missing, " ")
end

-- Runs the specs of one part on mpipool; returns busted's counts line
-- and the whole output.
function M.run(part)
  local helper = os.tmpname() .. ".lua" -- (busted requires a helper by its name)
  local hf = assert(io.open(helper, "w"))
  hf:write('require("helper").engines = { "mpipool" }\n')
  hf:close()
  local files = {}
  for _, name in ipairs(M.parts[part]) do files[#files + 1] = h.shell_quote("spec/" .. name) end
  local out, err = os.tmpname(), os.tmpname()
  local busted = io.popen("command -v busted"):read("l")
  local line = ("cd %s && timeout 280 %s %s --helper=%s --output=plainTerminal %s >%s 2>%s </dev/null"):format(
    h.shell_quote(h.source_dir), h.mpi_launch(3), h.shell_quote(busted), h.shell_quote(helper),
    table.concat(files, " "), out, err)
  os.execute(line)
  local so, se = h.slurp(out) or "", h.slurp(err) or ""
  os.remove(out); os.remove(err); os.remove(helper); os.remove(helper:sub(1, -5))
  return so:match("%d+ successes / %d+ failures / %d+ errors / %d+ pending"), so .. se
end

-- The pending cases of a run's output that are not a sanitizer build's own
-- (futures_spec skips its RSS check under ASan for every engine): no case
-- may be skipped on mpipool.
function M.pending_not_sanitizer(out)
  local san = os.getenv("LUAPOOL_SANITIZER")
  local wrong = {}
  for what, why in out:gmatch("Pending %-> [^\n]*\n([^\n]*)\n([^\n]*)") do
    if not (san and why:find("under " .. san, 1, true)) then wrong[#wrong + 1] = what .. ": " .. why end
  end
  return table.concat(wrong, "\n")
end

-- The spec of one part (spec/mpi_conformance_PART_spec.lua): every spec in
-- a part, at least `least` cases passed, none failed, none pending but a
-- sanitizer build's own.  env: the spec file's _ENV, where busted put
-- describe, it, pending and assert.
function M.describe_part(part, least, env)
  local describe, it, pending, assert = env.describe, env.it, env.pending, env.assert
  describe("the conformance suite on mpipool, part " .. part, function()
    if not h.mpiexec then
      it("needs MPI", function() pending("this build has no MPI (spec/mpi_spec.lua checks what it says)") end)
      return
    end

    it("runs every spec that loops over helper.engines in one of its parts", function()
      assert.are.equal("", M.check())
    end)

    it("passes " .. table.concat(M.parts[part], ", ") .. " on mpipool", function()
      local counts, out = M.run(part)
      assert.is_truthy(counts, out)
      assert.matches("^%d+ successes / 0 failures / 0 errors / %d+ pending$", counts, out)
      assert.are.equal("", M.pending_not_sanitizer(out))
      assert.is_true(tonumber(counts:match("^%d+")) >= least, out)
    end)
  end)
end

return M
