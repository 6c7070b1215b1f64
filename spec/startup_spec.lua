-- Start-up: libcurl (and OpenSSL behind it) is not linked; it is loaded the
-- first time a script needs HTTP, in the host and in each process worker.
-- Every check runs a fresh luapool host (h.run), so that "the first use" is
-- really the first in that process, and reads its /proc/self/maps.
local h = require "helper"

-- Prepended to every script: is libcurl mapped in this process?
local PRELUDE = [[
local luapool = require "luapool"
local K = luapool.kernels
local function mapped()
  local f = assert(io.open("/proc/self/maps"))
  local maps = f:read("a")
  f:close()
  return maps:find("/libcurl", 1, true) ~= nil
end
local url = arg[1]
]]

-- Runs PRELUDE .. body in a fresh host with arg[1] = url; its stdout, which
-- must come with an empty stderr and exit status 0.
local function host(body, url, env)
  local path = h.tempfile(PRELUDE .. body)
  local out, err, code = h.run({ path, url or "" }, nil, env)
  os.remove(path)
  assert.are.equal("", err)
  assert.are.equal(0, code)
  return out
end

describe("start-up", function()
  local srv
  setup(function() srv = h.fixture() end)
  teardown(function() if srv then srv:stop() end end)

  it("links no libcurl into the binary or the module", function()
    local dir = h.bin:match("^(.*)/[^/]*$") or "."
    for _, file in ipairs { h.bin, dir .. "/luapool.so" } do
      local p = assert(io.popen("ldd " .. h.shell_quote(file)))
      local out = p:read("a")
      p:close()
      assert.truthy(out:find("libc.so.6", 1, true), out)
      assert.falsy(out:find("libcurl", 1, true), out)
      assert.falsy(out:find("libssl", 1, true), out)
    end
  end)

  it("the host maps libcurl only once a script fetches (fetch_length)", function()
    assert.are.equal("false\t7\t200\ttrue\n", host([[
      local before = mapped()
      local n, status = K.fetch_length(url)
      print(before, n, status, mapped())
    ]], srv:url("/bytes?n=7")))
  end)

  it("the host maps libcurl only once a script fetches (http.get)", function()
    assert.are.equal("false\t200\txxxxx\ttrue\n", host([[
      local before = mapped()
      local r = assert(luapool.http.get(url))
      print(before, r.status, r.body, mapped())
    ]], srv:url("/bytes?n=5")))
  end)

  it("a thread pool that does not fetch does not load it", function()
    assert.are.equal("6\tfalse\n", host([[
      local pool <close> = luapool.threadpool.new { max_workers = 2 }
      print(pool:submit(function(a, b) return a * b end, 2, 3):result(), mapped())
    ]]))
  end)

  it("a process worker maps it only for an HTTP task, the host not at all", function()
    -- one worker: every task runs in the same process
    assert.are.equal("false\t7\ttrue\tfalse\n", host([[
      local pool <close> = luapool.processpool.new { max_workers = 1 }
      local before = pool:submit(mapped):result()
      local n = pool:submit(K.fetch_length, url):result()
      print(before, n, pool:submit(mapped):result(), mapped())
    ]], srv:url("/bytes?n=7")))
  end)

  it("first fetches from 8 threads at once all succeed (one load, one curl_global_init)", function()
    -- every task waits for the same instant, then fetches: the first use
    -- of libcurl in the process is 8 threads racing for it
    local out = host([[
      local pool <close> = luapool.threadpool.new { max_workers = 8 }
      local t0 = luapool.now() + 0.5
      local function job(i, u, at)
        local lp = require "luapool"
        while lp.now() < at do lp.sleep(0.001) end
        if i % 2 == 0 then
          local n, status = lp.kernels.fetch_length(u)
          return n .. " " .. status
        end
        local r = assert(lp.http.get(u))
        return #r.body .. " " .. r.status
      end
      local fs = {}
      for i = 1, 8 do fs[i] = pool:submit(job, i, url, t0) end
      for i = 1, 8 do io.write(fs[i]:result(10), "\n") end
      print(mapped())
    ]], srv:url("/bytes?n=9"))
    assert.are.equal(("9 200\n"):rep(8) .. "true\n", out)
  end)

  it("luapool.info().curl still reports libcurl's version, loading it", function()
    local p = assert(io.popen("pkg-config --modversion libcurl"))
    local version = p:read("l")
    p:close()
    assert.matches("^%d+%.%d+%.%d+", version)
    assert.are.equal("false\t" .. version .. "\ttrue\n", host([[
      local before = mapped()
      print(before, luapool.info().curl, mapped())
    ]]))
  end)

  it("when libcurl cannot be loaded: task errors, nil and a message, never a crash", function()
    local why = "cannot load libcurl (libluapool-missing.so.4: cannot open shared object file: " ..
      "No such file or directory)"
    local url = srv:url("/bytes?n=3")
    local out = host([[
      print(luapool.info().curl)
      print(luapool.http.get(url))
      print(luapool.http.get(url, { headers = { ["X-A"] = "b" } }))
      print(pcall(K.fetch_length, url))
      for _, new in ipairs { luapool.threadpool.new, luapool.processpool.new } do
        local pool <close> = new { max_workers = 1 }
        local e = pool:submit(K.fetch_length, url):exception()
        print(e.kind, e.message)
        print(pool:submit(function(u) return select(2, require("luapool").http.get(u)) end, url):result())
      end
      print(mapped())
    ]], url, { LUAPOOL_LIBCURL = "libluapool-missing.so.4" })
    local fetch = "fetch_length: " .. url .. ": " .. why
    local get = "GET " .. url .. ": " .. why
    assert.are.equal(table.concat({
      "?",
      "nil\t" .. get,
      "nil\t" .. get,
      "false\t" .. fetch,
      "task\t" .. fetch,
      get,
      "task\t" .. fetch,
      get,
      "false",
    }, "\n") .. "\n", out)
  end)
end)

-- MPI is a plugin (luapool-mpi.so, the only part linked to libmpi) that
-- only `luapool --mpi` loads: a plain run and every process worker (an
-- exec of the host) start without libmpi and what it loads.
describe("start-up without libmpi", function()
  local dir = h.bin:match("^(.*)/[^/]*$") or "."
  local plugin = dir .. "/luapool-mpi.so"
  local with_mpi = h.mpiexec and it or pending
  local MAPS = [[
    local function mpi_mapped()
      local f = assert(io.open("/proc/self/maps"))
      local maps = f:read("a")
      f:close()
      return maps:find("/libmpi%.so") ~= nil, maps:find("/luapool%-mpi%.so") ~= nil
    end
  ]]

  local function ldd(file)
    local p = assert(io.popen("ldd " .. h.shell_quote(file)))
    local out = p:read("a")
    p:close()
    return out
  end

  it("links no libmpi into the binary or the module", function()
    for _, file in ipairs { h.bin, dir .. "/luapool.so" } do
      local out = ldd(file)
      assert.truthy(out:find("libc.so.6", 1, true), out)
      assert.falsy(out:find("libmpi", 1, true), out)
      assert.falsy(out:find("libopen%-pal"), out)
    end
  end)

  with_mpi("the MPI plugin links libmpi and exports one symbol", function()
    assert.truthy(ldd(plugin):find("libmpi%.so"))
    local p = assert(io.popen("nm -D --defined-only " .. h.shell_quote(plugin)))
    local syms = {}
    for line in p:lines() do
      -- (an AddressSanitizer build adds the symbol's ODR indicator)
      if not line:find(" __odr_asan.", 1, true) then syms[#syms + 1] = line end
    end
    p:close()
    assert.are.equal(1, #syms, table.concat(syms, "\n"))
    assert.matches("^%x+ [DR] luapool_mpi_plugin$", syms[1])
  end)

  it("a plain run and its process workers map no libmpi", function()
    local path = h.tempfile(MAPS .. [[
      local pool <close> = processpool.new { max_workers = 1 }
      print(mpi_mapped())
      print(pool:submit(mpi_mapped):result())
    ]])
    local out, err, code = h.run({ path })
    os.remove(path)
    assert.are.equal("", err)
    assert.are.equal(0, code)
    assert.are.equal("false\tfalse\nfalse\tfalse\n", out)
  end)

  with_mpi("--mpi maps the plugin and libmpi (mpiexec -n 1), its workers neither", function()
    local path = h.tempfile(MAPS .. [[
      local pool <close> = processpool.new { max_workers = 1 }
      print(mpi_mapped())
      print(pool:submit(mpi_mapped):result())
    ]])
    local p = assert(io.popen(h.mpi_launch(1) .. " " .. h.shell_quote(path) .. " 2>&1 </dev/null"))
    local out = p:read("a")
    local ok = p:close()
    os.remove(path)
    assert.is_true(ok, out)
    assert.are.equal("true\ttrue\nfalse\tfalse\n", out)
  end)

  -- (OMPI_COMM_WORLD_SIZE: as if under mpiexec; the plugin is loaded before MPI starts)
  with_mpi("--mpi with no loadable plugin says which file and why", function()
    local missing = dir .. "/no-such-luapool-mpi.so"
    local out, err, code = h.run({ "--mpi", "x.lua" }, nil,
      { OMPI_COMM_WORLD_SIZE = "1", LUAPOOL_MPI_PLUGIN = missing })
    assert.are.equal("", out)
    assert.are.equal(1, code)
    assert.are.equal(("luapool: --mpi: cannot load the MPI plugin %s (%s: cannot open shared object file: "
      .. "No such file or directory)\n"):format(missing, missing), err)
    local text = h.tempfile("not a shared object")
    out, err, code = h.run({ "--mpi", "x.lua" }, nil, { OMPI_COMM_WORLD_SIZE = "1", LUAPOOL_MPI_PLUGIN = text })
    os.remove(text)
    assert.are.equal("", out)
    assert.are.equal(1, code)
    assert.are.equal(("luapool: --mpi: cannot load the MPI plugin %s (%s: file too short)\n"):format(text, text), err)
    -- a shared object, and no plugin: the libm the host links (as ldd finds
    -- it, the name dlerror gives; not luapool.so, a second copy of the core)
    local libm = assert(ldd(h.bin):match("libm%.so%.6 => (%S+)"))
    out, err, code = h.run({ "--mpi", "x.lua" }, nil, { OMPI_COMM_WORLD_SIZE = "1", LUAPOOL_MPI_PLUGIN = libm })
    assert.are.equal("", out)
    assert.are.equal(1, code)
    assert.are.equal(("luapool: --mpi: %s is no MPI plugin of luapool (%s: undefined symbol: luapool_mpi_plugin)\n")
      :format(libm, libm), err)
    -- a plugin of another build (its fingerprint differs): refused before it runs
    local other = dir .. "/luapool-otherbuild-mpi.so"
    out, err, code = h.run({ "--mpi", "x.lua" }, nil, { OMPI_COMM_WORLD_SIZE = "1", LUAPOOL_MPI_PLUGIN = other })
    assert.are.equal("", out)
    assert.are.equal(1, code)
    assert.matches("^luapool: %-%-mpi: " .. other:gsub("%p", "%%%0") .. " is the MPI plugin of another luapool "
      .. "build %(the plugin's is 0%.0%.0%+0000000000000000, this luapool is %d+%.%d+%.%d+%+%x+%)\n$", err)
    -- a bare file name is the current directory's file, not a library path search
    local cwd_out, cwd_err, cwd_code = h.run({ "--mpi", "x.lua" }, nil,
      { OMPI_COMM_WORLD_SIZE = "1", LUAPOOL_MPI_PLUGIN = "no-such-luapool-mpi.so" })
    assert.are.same({ "", 1 }, { cwd_out, cwd_code })
    assert.are.equal("luapool: --mpi: cannot load the MPI plugin ./no-such-luapool-mpi.so "
      .. "(./no-such-luapool-mpi.so: cannot open shared object file: No such file or directory)\n", cwd_err)
  end)

  it("--mpi outside an MPI launch says so without loading the plugin", function()
    local out, err, code = h.run({ "--mpi", "x.lua" }, nil, { LUAPOOL_MPI_PLUGIN = dir .. "/no-such-luapool-mpi.so" })
    assert.are.equal("", out)
    assert.are.equal(1, code)
    if h.mpiexec then
      assert.matches("^luapool: %-%-mpi needs an MPI launch: run `mpiexec %-n N luapool %-%-mpi script%.lua", err)
    else
      assert.matches("^luapool: %-%-mpi: this build of luapool has no MPI", err)
    end
  end)
end)
