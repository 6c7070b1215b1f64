-- Packaging, the cheap part (nothing is installed): the man page renders and
-- matches the host, the rockspec lints and matches the build's version and
-- CMake variables, the Debian package's control fields, and the install
-- rules' file list in a staging prefix.  scripts/package-check.sh does the
-- real installs (luarocks make, cpack + dpkg -i/-r).
local h = require "helper"

local src = h.source_dir
local build_dir = h.bin:match("^(.*)/[^/]*$") or "."

local function sh(cmd) -- stdout and stderr together, exit status
  local p = assert(io.popen("(" .. cmd .. ") 2>&1"))
  local out = p:read("a")
  local ok, how, code = p:close()
  if how == "signal" then code = 128 + code end
  return out, ok and 0 or code
end

local function have(tool)
  return select(2, sh("command -v " .. tool .. " >/dev/null")) == 0
end

-- "luapool 0.1.0 (Lua 5.4.4)" -> "0.1.0"
local function host_version()
  local out, _, code = h.run({ "-v" })
  assert.are.equal(0, code)
  return assert(out:match("^luapool (%S+) %(Lua 5%.4%.%d+%)\n$"), out)
end

local rockspec_name = "luapool-0.1.0-1.rockspec"

-- A rockspec is a Lua chunk that sets globals: run it in an empty table.
local function load_rockspec()
  local env = {}
  local chunk = assert(loadfile(src .. "/" .. rockspec_name, "t", env))
  chunk()
  return env
end

local man = src .. "/docs/luapool.1"

describe("packaging", function()
  local with_man = (have("man") and have("groff")) and it or pending
  local with_luarocks = have("luarocks") and it or pending

  with_man("the man page renders with no warning (man --warnings, groff -ww)", function()
    local out, code = sh("MANWIDTH=80 man --warnings -l " .. h.shell_quote(man) .. " 2>&1 >/dev/null")
    assert.are.equal(0, code)
    assert.are.equal("", out)
    out, code = sh("groff -man -ww -z " .. h.shell_quote(man))
    assert.are.equal(0, code)
    assert.are.equal("", out)
    out, code = sh("MANWIDTH=80 man -l " .. h.shell_quote(man) .. " | col -b")
    assert.are.equal(0, code)
    assert.matches("^LUAPOOL%(1%)", out)
    for _, section in ipairs { "NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "POOLS", "EXIT STATUS",
                               "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO" } do
      assert.matches("\n" .. section .. "\n", out, 1, true)
    end
  end)

  it("the man page has the host's version, every --help option and every environment variable", function()
    local text = assert(h.slurp(man))
    assert.are.equal("luapool " .. host_version(), text:match('%.TH LUAPOOL 1 "[^"]*" "([^"]*)"'))
    local help, _, code = h.run({ "--help" })
    assert.are.equal(0, code)
    local options = {}
    for opt in help:gmatch("\n  (%-%S*)") do options[#options + 1] = opt end
    assert.is_true(#options >= 7, help)
    for _, opt in ipairs(options) do
      -- in roff, a minus sign is \-
      assert.truthy(text:find("\n%.B[IR]? " .. opt:gsub("%-", "\\%%-") .. "[ \n]"), "man page lacks " .. opt)
    end
    assert.truthy(text:find("\n.BR \\-v \", \" \\-\\-version\n", 1, true))
    assert.truthy(text:find("\n.BR \\-h \", \" \\-\\-help\n", 1, true))
    -- every variable the C code reads
    local c = sh("find " .. h.shell_quote(src) .. "/src -name '*.c' -exec cat {} +")
    local vars = {}
    for var in c:gmatch('getenv%("([%w_]+)"%)') do vars[#vars + 1] = var end
    assert.truthy(table.concat(vars, " "):find("LUAPOOL_WORKER_EXE", 1, true))
    -- and every variable --help names (a line "  NAME  what it does")
    for var in help:gmatch("\n  ([A-Z][A-Z0-9_]+)") do vars[#vars + 1] = var end
    for _, var in ipairs { "LUA_PATH", "LUA_CPATH", "LUA_INIT" } do vars[#vars + 1] = var end
    for _, var in ipairs(vars) do
      assert.truthy(text:find("\n%.BR? " .. var), "man page lacks " .. var)
    end
  end)

  with_luarocks("the rockspec lints", function()
    local out, code = sh("cd " .. h.shell_quote(src) .. " && luarocks lint " .. rockspec_name)
    assert.are.equal("", out)
    assert.are.equal(0, code)
  end)

  it("the rockspec's version is the build's, and its CMake variables exist", function()
    local rs = load_rockspec()
    local v = host_version()
    assert.are.equal("luapool", rs.package)
    assert.are.equal(v .. "-1", rs.version)
    assert.are.equal(("%s-%s.rockspec"):format(rs.package, rs.version), rockspec_name)
    assert.are.equal("v" .. v, rs.source.tag)
    assert.are.same({ "lua >= 5.4, < 5.5" }, rs.dependencies)
    assert.are.equal("cmake", rs.build.type)
    -- the module looks for its workers' binary in the configured bindir,
    -- $(PREFIX)/bin, which LuaRocks keeps (it copies bin/ into the tree)
    assert.are.same({
      CMAKE_BUILD_TYPE = "Release",
      CMAKE_INSTALL_PREFIX = "$(PREFIX)",
      CMAKE_INSTALL_BINDIR = "bin",
      LUAPOOL_LUA_CMOD_DIR = "$(LIBDIR)",
      LUAPOOL_LUA_LMOD_DIR = "$(LUADIR)",
      LUAPOOL_MPI_PLUGIN_DIR = "$(PREFIX)/libexec/luapool",
      LUAPOOL_MPI_PLUGIN_LOOKUP = "$(PREFIX)/libexec/luapool",
      LUAPOOL_TESTS = "OFF",
    }, rs.build.variables)
    local cmakelists = assert(h.slurp(src .. "/CMakeLists.txt"))
    assert.are.equal(v, cmakelists:match("project%(luapool VERSION (%S+)"))
    for _, var in ipairs { "LUAPOOL_LUA_CMOD_DIR", "LUAPOOL_LUA_LMOD_DIR", "LUAPOOL_MPI_PLUGIN_DIR",
                           "LUAPOOL_MPI_PLUGIN_LOOKUP" } do
      assert.truthy(cmakelists:find("set(" .. var .. " ", 1, true), var)
    end
    assert.truthy(cmakelists:find("option(LUAPOOL_TESTS ", 1, true))
    assert.are.equal(v, require("luapool").version)
  end)

  it("the Debian package's control fields (the build's CPack configuration)", function()
    local cfg = assert(h.slurp(build_dir .. "/CPackConfig.cmake"), "no CPackConfig.cmake in " .. build_dir)
    local function field(name) return cfg:match('\nset%(' .. name .. ' "([^"]*)"%)') end
    assert.are.equal("luapool", field("CPACK_PACKAGE_NAME"))
    assert.are.equal(host_version(), field("CPACK_PACKAGE_VERSION"))
    assert.are.equal("1", field("CPACK_DEBIAN_PACKAGE_RELEASE"))
    -- what one feature loads is recommended: readline for a host built with
    -- it (as --help says: its REPL loads it), and for one with mpipool the
    -- runtime its MPI plugin links
    local readline = h.run({ "--help" }):find("(with readline)", 1, true) and ", libreadline8" or ""
    local plugin = io.open(build_dir .. "/luapool-mpi.so")
    local mpi = plugin and ", libopenmpi3" or ""
    if plugin then plugin:close() end
    assert.are.equal("libc6, liblua5.4-0, libcurl4", field("CPACK_DEBIAN_PACKAGE_DEPENDS"))
    assert.are.equal("lua5.4" .. readline .. mpi, field("CPACK_DEBIAN_PACKAGE_RECOMMENDS"))
    assert.are.equal("DEB-DEFAULT", field("CPACK_DEBIAN_FILE_NAME"))
  end)

  it("installs the binary, the module, the plain Lua files, the man page and the docs", function()
    local stage = os.tmpname()
    os.remove(stage)
    local out, code = sh("cmake --install " .. h.shell_quote(build_dir) .. " --prefix " .. h.shell_quote(stage) ..
      " >/dev/null && cd " .. h.shell_quote(stage) .. " && find . -type f | LC_ALL=C sort")
    local libdir = out:match("%./([^\n]*)/lua/5%.4/luapool%.so\n")
    -- a build with MPI installs its plugin, which the installed binary
    -- looks for relative to itself: with the file gone, --mpi (as if under
    -- mpiexec) names the place it looked at
    local mpi = io.open(build_dir .. "/luapool-mpi.so") and libdir and io.open(stage .. "/" .. libdir
      .. "/luapool/luapool-mpi.so")
    local mpi_out, mpi_err, mpi_code
    if mpi then
      mpi:close()
      os.remove(stage .. "/" .. libdir .. "/luapool/luapool-mpi.so")
      mpi_out, mpi_code = sh("env -u LUAPOOL_MPI_PLUGIN OMPI_COMM_WORLD_SIZE=1 " .. h.shell_quote(stage)
        .. "/bin/luapool --mpi x.lua")
      local real = io.popen("realpath " .. h.shell_quote(stage)):read("l")
      local path = real .. "/bin/../" .. libdir .. "/luapool/luapool-mpi.so"
      mpi_err = ("luapool: --mpi: cannot load the MPI plugin %s (%s: cannot open shared object file: "
        .. "No such file or directory)\n"):format(path, path)
    end
    sh("rm -rf " .. h.shell_quote(stage))
    assert.are.equal(0, code, out)
    assert.truthy(libdir == "lib" or libdir == "lib64" or libdir:match("^lib/[%w_]+%-linux%-gnu[%w_]*$"), out)
    local expected = {
      "./bin/luapool",
      "./" .. libdir .. "/lua/5.4/luapool.so",
      "./share/doc/luapool/README.md",
      "./share/man/man1/luapool.1",
    }
    if io.open(build_dir .. "/luapool-mpi.so") then
      expected[#expected + 1] = "./" .. libdir .. "/luapool/luapool-mpi.so"
      assert.are.equal(mpi_err, mpi_out)
      assert.are.equal(1, mpi_code)
    end
    -- the docs: docs/*.md and docs/*.svg
    local docs = sh("cd " .. h.shell_quote(h.source_dir) .. " && git ls-files 'docs/*.md' 'docs/*.svg'")
    for f in docs:gmatch("[^\n]+") do expected[#expected + 1] = "./share/doc/luapool/" .. f end
    -- every Lua file of lua/luapool but the two compiled in
    local lua_files = sh("cd " .. h.shell_quote(h.source_dir) .. " && git ls-files 'lua/luapool/*.lua'")
    for f in lua_files:gmatch("[^\n]+") do
      if f ~= "lua/luapool/executor.lua" and f ~= "lua/luapool/progress.lua" then
        expected[#expected + 1] = "./share/lua/5.4/" .. f:sub(5)
      end
    end
    table.sort(expected)
    assert.are.equal(table.concat(expected, "\n") .. "\n", out)
  end)
end)
