-- LuaRocks: from a clone,  luarocks --lua-version 5.4 make --tree DIR  (or --local).
-- Debian's luarocks defaults to Lua 5.1, hence --lua-version 5.4.
rockspec_format = "3.0"
package = "luapool"
version = "0.1.0-1"

source = {
   -- `luarocks make` builds the clone it runs in and fetches nothing; this
   -- names the release tag for `luarocks build` once the project is published.
   url = "git+https://example.invalid/luapool.git",
   tag = "v0.1.0",
}

description = {
   summary = "concurrent.futures-style thread, process, event-loop and MPI pools for Lua 5.4",
   detailed = [[
luapool gives Lua 5.4 four executors under one futures API: threadpool (OS
threads, one Lua state per worker, no global lock), processpool (worker
processes: isolation and crash containment), iopool (event-loop threads:
thousands of HTTP requests and Lua coroutine tasks in flight) and mpipool
(MPI ranks, when the build found MPI and the script runs under mpiexec), with
futures, map, imap, as_completed, wait, deadlines, and native HTTP and integer
kernels. It installs the luapool module for stock lua5.4 and the luapool
interpreter, which process pools start as workers.]],
   license = "none declared yet (the project has no license file)",
   maintainer = "luapool maintainers",
   labels = { "concurrency", "threads", "processes", "http", "mpi" },
}

dependencies = {
   "lua >= 5.4, < 5.5",
}

-- Needs, from the system: CMake, pkg-config, the Lua 5.4 headers with their
-- lua5.4.pc and libcurl's development files (Debian: cmake pkg-config
-- liblua5.4-dev libcurl4-openssl-dev); for mpipool, Open MPI's
-- (openmpi-bin libopenmpi-dev), else the build has no MPI.
build = {
   type = "cmake",
   variables = {
      CMAKE_BUILD_TYPE = "Release",
      -- LuaRocks installs into the rock's directory $(PREFIX), then moves
      -- $(LIBDIR) into the tree's lib/lua/5.4 and $(LUADIR) into its
      -- share/lua/5.4, and copies $(BINDIR) into the tree's bin/ (the
      -- original stays).  The module looks for the binary its process
      -- workers run in the configured bindir, $(PREFIX)/bin: it is there.
      CMAKE_INSTALL_PREFIX = "$(PREFIX)",
      CMAKE_INSTALL_BINDIR = "bin",
      LUAPOOL_LUA_CMOD_DIR = "$(LIBDIR)",
      LUAPOOL_LUA_LMOD_DIR = "$(LUADIR)",
      -- The MPI plugin (a build with MPI) stays in the rock's directory,
      -- outside $(LIBDIR) (not a Lua module), where the host looks for it:
      -- the tree's bin/luapool is a copy, elsewhere.
      LUAPOOL_MPI_PLUGIN_DIR = "$(PREFIX)/libexec/luapool",
      LUAPOOL_MPI_PLUGIN_LOOKUP = "$(PREFIX)/libexec/luapool",
      LUAPOOL_TESTS = "OFF",
   },
}
