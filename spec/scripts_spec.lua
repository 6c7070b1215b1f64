-- The reference jobs end to end, through the luapool binary.
local h = require "helper"

local function script(name) return h.source_dir .. "/scripts/" .. name end

describe("scripts/cpu.lua", function()
  it("prints the timing line and exact results in input order", function()
    local out, err, code = h.run({ script("cpu.lua") })
    assert.are.equal(0, code, err)
    assert.matches("^processpool execution time: %d+%.%d+ seconds\n", out)
    assert.are.equal(out:match("\n(.*)$"), table.concat({
      "Calculation for 10000000: 333333283333335000000",
      "Calculation for 12000000: 575999928000002000000",
      "Calculation for 11000000: 443666606166668500000",
      "Calculation for 9000000: 242999959500001500000",
      "Calculation for 13000000: 732333248833335500000", "" }, "\n"))
  end)

  it("draws progress on stderr with --progress, stdout unchanged", function()
    local out, err, code = h.run({ script("cpu.lua"), "--progress", "10", "20" })
    assert.are.equal(0, code)
    assert.matches("\nCalculation for 10: 285\nCalculation for 20: 2470\n$", out)
    assert.matches("^map: 2/2  100%.0%%  ", err)
  end)

  it("takes numbers and --workers, and refuses bad ones", function()
    local out, _, code = h.run({ script("cpu.lua"), "--workers", "3", "10", "0" })
    assert.are.equal(0, code)
    assert.matches("\nCalculation for 10: 285\nCalculation for 0: 0\n$", out)
    local _, err
    _, err, code = h.run({ script("cpu.lua"), "ten" })
    assert.are.equal(2, code)
    assert.matches("^cpu%.lua: not a non%-negative integer: ten\n", err)
    _, err, code = h.run({ script("cpu.lua"), "--bogus" })
    assert.are.equal(2, code)
    assert.matches("^cpu%.lua: unknown option %-%-bogus\nusage: ", err)
    -- past the pool's range: a usage error in the pool's words, no traceback
    _, err, code = h.run({ script("cpu.lua"), "--workers", "100000", "10" })
    assert.are.equal(2, code)
    assert.are.equal("cpu.lua: bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got 100000)\n",
      err:match("^[^\n]*\n"))
  end)
end)

describe("scripts/io.lua", function()
  local srv
  setup(function() srv = h.fixture() end)
  teardown(function() if srv then srv:stop() end end)

  it("fetches on named threads and prints lengths in input order", function()
    local urls = { srv:url("/bytes?n=10"), srv:url("/sleep?s=0.2"), srv:url("/bytes?n=7"),
      srv:url("/status/404") }
    local out, err, code = h.run({ script("io.lua"), "--workers", "3", table.unpack(urls) })
    assert.are.equal(0, code, err)
    local fetching, tail = {}, out:match("threadpool execution time: [%d.]+ seconds\n(.*)$")
    for url, w in out:gmatch("Fetching (%S+) in thread (%S+)\n") do
      fetching[#fetching + 1] = url
      assert.matches("^io%-[123]$", w)
    end
    table.sort(fetching)
    local sorted = { table.unpack(urls) }
    table.sort(sorted)
    assert.are.same(sorted, fetching)
    local lines = {}
    for line in tail:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.are.equal(urls[1] .. ": 10", lines[1])
    assert.are.equal(urls[2] .. ": 3", lines[2])
    assert.are.equal(urls[3] .. ": 7", lines[3])
    assert.matches("^" .. urls[4]:gsub("%p", "%%%0") .. ": %d+$", lines[4])
    assert.are.equal(4, #lines)
  end)

  it("prints failures as errors, the others still, and exits 1", function()
    local urls = { srv:url("/bytes?n=1"), "http://127.0.0.1:1/", srv:url("/drop") }
    local file = h.tempfile("# urls\n" .. table.concat(urls, "\n") .. "\n\n")
    local out, _, code = h.run({ script("io.lua"), "--urls", file })
    os.remove(file)
    assert.are.equal(1, code)
    assert.matches("\n" .. urls[1]:gsub("%p", "%%%0") .. ": 1\n", out)
    assert.matches("\nhttp://127%.0%.0%.1:1/: error: Couldn't connect to server %(", out)
    assert.matches("\n" .. urls[3]:gsub("%p", "%%%0") ..
      ": error: Server returned nothing %(no headers, no data%) %(Empty reply from server%)\n", out)
  end)

  it("draws progress on stderr with --progress", function()
    local out, err, code = h.run({ script("io.lua"), "--progress", srv:url("/bytes?n=3"), srv:url("/bytes?n=4") })
    assert.are.equal(0, code)
    assert.matches("\n" .. srv:url("/bytes?n=4"):gsub("%p", "%%%0") .. ": 4\n$", out)
    assert.matches("^fetch: 2/2  100%.0%%  ", err)
  end)

  it("runs sequentially in the main thread with --sequential", function()
    local out, _, code = h.run({ script("io.lua"), "--sequential", srv:url("/bytes?n=2") })
    assert.are.equal(0, code)
    assert.matches("^Fetching [^\n]+ in thread main\nsequential execution time: ", out)
  end)

  it("refuses a --urls file with no URL in it, never falling back to the public sites", function()
    local file = os.tmpname()
    local f = assert(io.open(file, "w"))
    f:write("# only a comment\n\n   \n")
    f:close()
    local out, err, code = h.run({ script("io.lua"), "--urls", file })
    os.remove(file)
    assert.are.equal(2, code)
    assert.are.equal("", out)
    assert.are.equal("io.lua: " .. file .. ": no URLs in it\n", err:match("^[^\n]*\n"))
    out, err, code = h.run({ script("io.lua"), "--urls", "/tmp" })
    assert.are.equal("", out)
    assert.are.equal(2, code)
    assert.are.equal("io.lua: /tmp: Is a directory\n", err:match("^[^\n]*\n"))
  end)

  it("refuses --workers or --concurrency past the pool's range in the pool's words, exit 2", function()
    local out, err, code = h.run({ script("io.lua"), "--workers", "5000", srv:url("/bytes?n=2") })
    assert.are.equal(2, code)
    assert.are.equal("", out)
    assert.are.equal("io.lua: bad option 'max_workers' to 'new' (integer from 1 to 4096 expected, got 5000)\n",
      err:match("^[^\n]*\n"))
    out, err, code = h.run({ script("io.lua"), "--pool", "iopool", "--concurrency", "1e12", srv:url("/bytes?n=2") })
    assert.are.equal(2, code)
    assert.are.equal("", out)
    assert.are.equal("io.lua: bad option 'concurrency' to 'new' (integer from 1 to 1000000 expected, got "
      .. "1000000000000)\n", err:match("^[^\n]*\n"))
  end)

  it("refuses a bad option with usage, exit 2", function()
    local _, err, code = h.run({ script("io.lua"), "--workers", "zero" })
    assert.are.equal(2, code)
    assert.matches("^io%.lua: %-%-workers needs a positive integer\nusage: ", err)
  end)
end)
