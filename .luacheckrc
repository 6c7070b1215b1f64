-- luacheck configuration: `luacheck lua scripts spec`
std = "lua54"
max_line_length = 120

-- Scripts run in the luapool host, where these are globals.
files["scripts/**/*.lua"] = { read_globals = { "threadpool", "processpool", "iopool", "mpipool", "luapool" } }
files["spec/**/*.lua"] = { std = "+busted" }
-- Scripts the luapool host runs directly (not busted specs).
files["spec/oom/*.lua"] = {
  std = "lua54", read_globals = { "threadpool", "processpool", "iopool", "mpipool", "luapool", "__luapool_fail_alloc" },
}
files["spec/memcheck/*.lua"] = {
  std = "lua54", read_globals = { "threadpool", "processpool", "iopool", "mpipool", "luapool" }, globals = { "TAG" },
}
-- Task functions there use the globals a worker's initializer sets, and
-- one spec takes string.format away from the main state on purpose.
files["spec/worker_api_spec.lua"] = {
  globals = { "INIT_COUNT", "CONFIG", "HELPER_GLOBAL", string = { fields = { "format" } } },
}
