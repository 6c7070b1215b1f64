/*
** luaopen_luapool: the module table, every type's registration, the worker
** API (current_worker, now, sleep, cpu_count), the hooks the lower layers
** call up through (signal delivery, opening a worker state), and the
** worker states it opens.  Error objects are errors.c's.
*/
#include <errno.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "base/alloc.h"
#include "codec/codec.h"
#include "base/ctrlc.h"
#include "engines/engines.h"
#include "bind/errors.h"
#include "bind/lpool.h"
#include "core/pool.h"
#include "codec/int128.h"
#include "kernels/kernel.h"
#include "bind/lfuture.h"
#include "bind/luapool.h"
#include "base/stop.h"
#include "base/util.h"
#include "worker/wstate.h"
#include "lua_executor.h"
#include "lua_progress.h"

static const char *const WORKER_KEY = "luapool.worker";

/* Ctrl-C reaching the script (luapool__check_signal's hook): every pool
** stops its work, then the script gets an error of kind "interrupted". */
static void deliver_signal(lua_State *L, int sig) {
  luapool__interrupt_all();
  char msg[64];
  snprintf(msg, sizeof msg, "the script received %s", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  luapool__push_error(L, LP_EK_INTERRUPTED, msg, NULL, NULL, 0);
  luapool__mark_signal_error(L, -1); /* (a callback's pcall raises it on) */
  lua_error(L);
}

/* {======================================================
** Time and machine
** ======================================================= */

static int l_now(lua_State *L) {
  lua_pushnumber(L, luapool__now());
  return 1;
}

static int sleep_done(lua_State *L, int status, lua_KContext ctx) {
  (void)L, (void)status, (void)ctx;
  return 0;
}

static int l_sleep(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  if (!(s >= 0)) /* also NaN; the value shown, as every timeout's refusal shows it */
    luaL_argerror(L, 1,
                  lua_pushfstring(L, "non-negative number expected, got %s", luapool__got(L, 1)));
  if (s > 1e9) s = 1e9;
  /* In an iopool task: a timer of its loop, which runs other tasks
  ** meanwhile (its deadline and stops end the wait there). */
  lp_wstate *io = luapool__io_task(L, "luapool.sleep");
  if (io) return luapool__io_await_timer(io, L, luapool__now() + s, 0, sleep_done);
  /* Sleep in slices so that a stop (deadline, closing pool) in a worker, or
  ** Ctrl-C in the main state, ends it: no hook runs while C code sleeps. */
  double deadline;
  const lp_interrupt *intr = luapool__lua_interrupt(L, &deadline);
  int sliced = intr || atomic_load(&luapool__signals_handled);
  double end = luapool__now() + s;
  for (;;) {
    double left = end - luapool__now();
    if (left <= 0) break;
    if (sliced && left > 0.01) left = 0.01;
    struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
    /* (the task's own deadline too, should the watchdog be late) */
    if (intr && deadline > 0 && luapool__now() >= deadline && !luapool__interrupted(intr))
      luapool__stop_self(intr);
    if (luapool__interrupted(intr)) return luaL_error(L, "%s", luapool__stop_message(intr));
    if (intr == NULL && atomic_load(&luapool__signal)) luapool__check_signal(L);
  }
  return 0;
}

static int l_cpu_count(lua_State *L) {
  lua_pushinteger(L, luapool__cpu_count());
  return 1;
}

static int l_current_worker(lua_State *L) {
  lua_createtable(L, 0, 4);
  if (lua_getfield(L, LUA_REGISTRYINDEX, WORKER_KEY) == LUA_TTABLE) {
    lua_getfield(L, -1, "name");
    lua_setfield(L, -3, "name");
    lua_getfield(L, -1, "index");
    lua_setfield(L, -3, "index");
    lua_getfield(L, -1, "kind");
    lua_setfield(L, -3, "kind");
    static const char *const mpi_fields[] = {"rank", "size", "host", NULL};
    for (int i = 0; mpi_fields[i]; i++) { /* (an MPI rank's worker only) */
      lua_getfield(L, -1, mpi_fields[i]);
      lua_setfield(L, -3, mpi_fields[i]);
    }
    lua_pop(L, 1);
  } else {
    lua_pop(L, 1);
    lua_pushliteral(L, "main");
    lua_setfield(L, -2, "name");
    lua_pushinteger(L, 0);
    lua_setfield(L, -2, "index");
    lua_pushliteral(L, "main");
    lua_setfield(L, -2, "kind");
  }
  lua_pushinteger(L, (lua_Integer)getpid());
  lua_setfield(L, -2, "pid");
  return 1;
}

/* }====================================================== */

/* {======================================================
** Worker states
** ======================================================= */

/* print that writes each line with one fwrite, so lines printed by tasks
** running at once never interleave mid-line. */
static int l_print(lua_State *L) {
  int n = lua_gettop(L);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (int i = 1; i <= n; i++) {
    luaL_tolstring(L, i, NULL);
    luaL_addvalue(&b);
    if (i < n) luaL_addchar(&b, '\t');
  }
  luaL_addchar(&b, '\n');
  luaL_pushresult(&b);
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  fwrite(s, 1, len, stdout);
  fflush(stdout);
  return 0;
}

void luapool__open_worker_state(lua_State *L, const char *kind, const char *name, int index) {
  luaL_requiref(L, "luapool", luaopen_luapool, 1);
  for (int i = 0; luapool__engines[i]; i++) {
    lua_getfield(L, -1, luapool__engines[i]->kind);
    lua_setglobal(L, luapool__engines[i]->kind);
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, l_print);
  lua_setglobal(L, "print");
  if (kind == NULL) return; /* the host's main state */
  lua_createtable(L, 0, 3);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, name);
  lua_setfield(L, -2, "name");
  lua_pushinteger(L, index);
  lua_setfield(L, -2, "index");
  const char *mpi = luapool__mpi_identity(); /* "RANK SIZE HOST" */
  int rank, size, at;
  if (mpi && strcmp(kind, "mpi") == 0 && sscanf(mpi, "%d %d %n", &rank, &size, &at) == 2) {
    lua_pushinteger(L, rank);
    lua_setfield(L, -2, "rank");
    lua_pushinteger(L, size);
    lua_setfield(L, -2, "size");
    lua_pushstring(L, mpi + at);
    lua_setfield(L, -2, "host");
  }
  lua_setfield(L, LUA_REGISTRYINDEX, WORKER_KEY);
}

/* }====================================================== */

/* {======================================================
** Module
** ======================================================= */

/* kind.new(options): upvalue 1 is the engine. */
static int engine_new(lua_State *L) {
  return luapool__pool_new(L, lua_touserdata(L, lua_upvalueindex(1)));
}

/* luapool.info(): what a benchmark report says about the machine. */
static int l_info(lua_State *L) {
  struct utsname u;
  lua_createtable(L, 0, 6);
  lua_pushliteral(L, LUAPOOL_VERSION);
  lua_setfield(L, -2, "luapool");
  lua_pushliteral(L, LUA_RELEASE);
  lua_setfield(L, -2, "lua");
  lua_pushstring(L, luapool__curl_version()); /* (loads libcurl) */
  lua_setfield(L, -2, "curl");
  lua_pushinteger(L, luapool__cpu_count());
  lua_setfield(L, -2, "cpus");
  if (uname(&u) == 0) {
    lua_pushfstring(L, "%s %s %s", u.sysname, u.release, u.machine);
    lua_setfield(L, -2, "os");
  }
  return 1;
}

#ifdef LUAPOOL_TEST_ALLOC
/* luapool.testing.fail_c_alloc(n [, once]), test builds only (spec/oom):
** this thread's C allocations (base/alloc.h) succeed n more times, then
** fail (only the next one when once); n < 0 disarms.  Returns how many
** the previous arming failed. */
static int l_fail_c_alloc(lua_State *L) {
  long n = (long)luaL_checkinteger(L, 1);
  lua_pushinteger(L, (lua_Integer)luapool__test_fail_c_alloc(n, lua_toboolean(L, 2)));
  return 1;
}
#endif

static const luaL_Reg module_funcs[] = {{"now", l_now},
                                        {"info", l_info},
                                        {"sleep", l_sleep},
                                        {"cpu_count", l_cpu_count},
                                        {"current_worker", l_current_worker},
                                        {NULL, NULL}};

/* Runs the compiled-in Lua layer: progress first (as luapool.progress),
** then the executor, which adds map, starmap, imap, as_completed and wait.
** Module table at -1. */
static void open_lua_layer(lua_State *L) {
  int mod = lua_gettop(L);
  luapool__push_prims(L); /* mod+1 */
  if (luaL_loadbuffer(L, lua_progress, sizeof lua_progress, "=[luapool] progress.lua"))
    lua_error(L);
  lua_pushvalue(L, mod);
  lua_pushvalue(L, mod + 1);
  lua_call(L, 2, 1); /* mod+2: progress */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_pushvalue(L, mod + 2);
  lua_setfield(L, -2, "luapool.progress");
  lua_pop(L, 1);
  if (luaL_loadbuffer(L, lua_executor, sizeof lua_executor, "=[luapool] executor.lua"))
    lua_error(L);
  lua_pushvalue(L, mod);
  luaL_getmetatable(L, LUAPOOL_POOL_MT);
  lua_getfield(L, -1, "methods");
  lua_remove(L, -2);
  lua_pushvalue(L, mod + 1);
  lua_pushvalue(L, mod + 2);
  lua_call(L, 4, 0);
  lua_settop(L, mod);
}

static pthread_once_t global_once = PTHREAD_ONCE_INIT;

/* Once per process: the hooks the lower layers call up through.  libcurl
** is not touched here: kernels/http.c loads and initialises it the first
** time a script needs HTTP, so a script (or process worker) that never
** fetches never pays for it.
** The soft limit on open files goes up to the hard one: an iopool keeps
** a socket per request in flight (10,000 need more than the usual soft
** 1024), and nothing in luapool uses select(), the one reason the soft
** limit stays low.  Where it cannot be raised a request fails with a
** message that names RLIMIT_NOFILE (kernels/httploop.c). */
static void global_init(void) {
  luapool__set_signal_delivery(deliver_signal);
  luapool__set_state_opener(luapool__open_worker_state);
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl); /* (a failure leaves the old limit: harmless) */
  }
}

int luaopen_luapool(lua_State *L) {
  pthread_once(&global_once, global_init);
  luapool__future_open(L);
  luapool__cq_open(L);
  luapool__pool_open(L);
  luapool__error_open(L);
  luaL_newlib(L, module_funcs);
  lua_pushliteral(L, LUAPOOL_VERSION);
  lua_setfield(L, -2, "version");
  for (int i = 0; luapool__engines[i]; i++) { /* luapool.threadpool.new, ... */
    lua_createtable(L, 0, 1);
    lua_pushlightuserdata(L, (void *)luapool__engines[i]);
    lua_pushcclosure(L, engine_new, 1);
    lua_setfield(L, -2, "new");
    lua_setfield(L, -2, luapool__engines[i]->kind);
  }
  lua_newtable(L);
  for (int i = 0; luapool__kernels[i].name; i++) {
    lua_pushcfunction(L, luapool__kernels[i].lua_fn);
    lua_setfield(L, -2, luapool__kernels[i].name);
  }
  lua_setfield(L, -2, "kernels");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, luapool__http_get);
  lua_setfield(L, -2, "get");
  lua_pushcfunction(L, luapool__http_request), lua_setfield(L, -2, "request");
  lua_setfield(L, -2, "http");
  lua_createtable(L, 0, 3);
  lua_pushcfunction(L, luapool__codec_cache);
  lua_setfield(L, -2, "cache");
  lua_pushcfunction(L, luapool__codec_encode);
  lua_setfield(L, -2, "encode");
  lua_pushcfunction(L, luapool__codec_decode);
  lua_setfield(L, -2, "decode");
  lua_setfield(L, -2, "codec");
  luapool__int128_open(L);
  lua_setfield(L, -2, "int128");
#ifdef LUAPOOL_TEST_ALLOC
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, l_fail_c_alloc);
  lua_setfield(L, -2, "fail_c_alloc");
  lua_setfield(L, -2, "testing");
#endif
  open_lua_layer(L);
  return 1;
}

/* }====================================================== */
