/*
** luaopen_luapool: the module table, every type's registration, the worker
** API (current_worker, now, sleep, cpu_count) and error objects.
*/
#include <errno.h>
#include <sched.h>
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

#include "luapool.h"
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
  lua_error(L);
}

static const char WSTATE_KEY = 0; /* its address keys the registry entry */

/* The worker a Lua state belongs to, NULL in a main state.  (Kept in the
** registry, not the state's extra space: Lua leaves a main state's extra
** space uninitialised, and it may belong to the embedding program.) */
static lp_wstate *state_worker(lua_State *L) {
  lua_rawgetp(L, LUA_REGISTRYINDEX, &WSTATE_KEY);
  lp_wstate *ws = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return ws;
}

static lp_interrupt *state_intr(lua_State *L) {
  lp_wstate *ws = state_worker(L);
  return ws ? ws->intr : NULL;
}

static const char *stop_message(const lp_interrupt *i) {
  if (atomic_load(&i->closing)) return "interrupted: the pool was closed";
  if (atomic_load(&i->reason) == LP_STOP_SIGNAL) return "interrupted: Ctrl-C";
  return "interrupted: the task's deadline passed";
}

const lp_interrupt *luapool__lua_interrupt(lua_State *L, double *deadline) {
  lp_wstate *ws = state_worker(L);
  *deadline = ws ? ws->deadline : 0;
  return ws ? ws->intr : NULL;
}

/* {======================================================
** Time and machine
** ======================================================= */

static int l_now(lua_State *L) {
  lua_pushnumber(L, luapool__now());
  return 1;
}

static int l_sleep(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  luaL_argcheck(L, s >= 0 && s == s, 1, "non-negative number expected");
  if (s > 1e9) s = 1e9;
  /* Sleep in slices so that a stop (deadline, closing pool) in a worker, or
  ** Ctrl-C in the main state, ends it: no hook runs while C code sleeps. */
  lp_interrupt *intr = state_intr(L);
  lp_wstate *ws = state_worker(L);
  double deadline = ws ? ws->deadline : 0;
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
    if (luapool__interrupted(intr)) return luaL_error(L, "%s", stop_message(intr));
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
** Error objects
** ======================================================= */

void luapool__push_error(lua_State *L, lp_ekind kind, const char *message, const char *traceback,
                         const char *worker, int value_idx) {
  if (value_idx) value_idx = lua_absindex(L, value_idx);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, luapool__ekind_name(kind));
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, message);
  lua_setfield(L, -2, "message");
  if (traceback && *traceback) {
    lua_pushstring(L, traceback);
    lua_setfield(L, -2, "traceback");
  }
  if (worker && *worker) {
    lua_pushstring(L, worker);
    lua_setfield(L, -2, "worker");
  }
  if (value_idx) {
    lua_pushvalue(L, value_idx);
    lua_setfield(L, -2, "value");
  }
  luaL_setmetatable(L, LUAPOOL_ERROR_MT);
}

/* "task failed in worker io-2: job.lua:7: boom" and the worker's traceback
** ("task failed in worker io-2 (item #7): ..." when the error has an
** integer `item`, the index of a map/imap/starmap item); other kinds read
** "kind: message". */
static int error_tostring(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "kind");
  lua_getfield(L, 1, "message");
  lua_getfield(L, 1, "worker");
  lua_getfield(L, 1, "traceback");
  lua_getfield(L, 1, "item"); /* 6: set by map/imap/starmap on an item's error */
  const char *kind = luaL_optstring(L, 2, "error");
  const char *msg = luaL_optstring(L, 3, "?");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  if (strcmp(kind, "task") == 0 && lua_isinteger(L, 6)) {
    lua_pushfstring(L, "task failed in worker %s (item #%I): %s", luaL_optstring(L, 4, "?"),
                    lua_tointeger(L, 6), msg);
  } else if (strcmp(kind, "task") == 0) {
    lua_pushfstring(L, "task failed in worker %s: %s", luaL_optstring(L, 4, "?"), msg);
  } else {
    lua_pushfstring(L, "%s: %s", kind, msg);
  }
  luaL_addvalue(&b);
  if (lua_isstring(L, 5)) {
    luaL_addstring(&b, "\nworker ");
    lua_pushvalue(L, 5);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  return 1;
}

static void error_open(lua_State *L) {
  if (luaL_newmetatable(L, LUAPOOL_ERROR_MT)) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
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

/* {====== stopping Lua code in a thread worker
** Lua 5.4 runs every instruction on a slower path while any hook is set,
** so a thread worker keeps none while its task runs freely.  A task with
** a deadline gets a count hook (coroutines it creates inherit it, so even
** a loop inside one is stopped in time).  Any other stop (the pool is
** closing, Ctrl-C) sends the worker's thread STOP_SIGNAL, whose handler
** sets the hook on that thread's own state, as lua.c does from its SIGINT
** handler: lua_sethook is safe there.  Process workers need no hook: their
** stop is a kill. */

static void interrupt_hook(lua_State *L, lua_Debug *ar);

/* The state of the task running on this thread and its worker (thread
** workers only). */
static _Thread_local lua_State *tl_task_state;
static _Thread_local lp_wstate *tl_task_ws;
/* The host's main state, on the host's script thread only. */
static _Thread_local lua_State *tl_signal_state;

/* On a worker thread: the task notices its stop.  On the host's script
** thread (the host's signal thread sends STOP_SIGNAL there when it takes a
** SIGINT/SIGTERM): the script notices the signal, as lua.c's handler does. */
static void on_stop_signal(int sig) {
  (void)sig;
  lua_State *L = tl_task_state;
  if (L) {
    lua_sethook(L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  } else if ((L = tl_signal_state) != NULL && atomic_load(&luapool__signal)) {
    lua_sethook(L, luapool__signal_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  }
}

static pthread_once_t stop_signal_once = PTHREAD_ONCE_INIT;

static void stop_signal_install(void) { luapool__on_signal(LUAPOOL_STOP_SIGNAL, on_stop_signal); }

void luapool__stop_signal_install(void) { pthread_once(&stop_signal_once, stop_signal_install); }

void luapool__set_task_state(lua_State *L) {
  tl_task_state = L;
  tl_task_ws = L ? state_worker(L) : NULL;
}

void luapool__set_signal_state(lua_State *L) {
  luapool__stop_signal_install();
  tl_signal_state = L;
}

const lp_interrupt *luapool__thread_interrupt(double *deadline) {
  lp_wstate *ws = tl_task_ws;
  *deadline = ws ? ws->deadline : 0;
  return ws ? ws->intr : NULL;
}

/* Once it sees the stop, the hook re-arms itself to fire on every
** instruction: a pcall in the task catches the first error, and the very
** next instruction of the caller raises again, so the stop climbs out
** frame by frame and no pcall (or loop of pcalls) can swallow it.  Without
** a stop (a signal that arrived late) it goes back to how the task runs. */
static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lp_wstate *ws = state_worker(L);
  lp_interrupt *i = ws ? ws->intr : NULL;
  /* Between calls (the worker's own code building a reply) a stop must
  ** not raise: it is seen when the next call begins, or by the caller. */
  if (ws && !ws->in_call) {
    luapool__arm_interrupt_hook(L);
    return;
  }
  if (luapool__interrupted(i)) {
    lua_sethook(L, interrupt_hook, LUA_MASKCOUNT, 1);
    luaL_error(L, "%s", stop_message(i));
  }
  luapool__arm_interrupt_hook(L);
}

void luapool__arm_interrupt_hook(lua_State *L) {
  lp_wstate *ws = state_worker(L);
  if (ws && ws->deadline > 0 && strcmp(ws->kind, "thread") == 0)
    lua_sethook(L, interrupt_hook, LUA_MASKCOUNT, 1000);
  else
    lua_sethook(L, NULL, 0, 0);
}

/* }====== */

void luapool__open_worker_state(lua_State *L, const char *kind, const char *name, int index) {
  luaL_requiref(L, "luapool", luaopen_luapool, 1);
  lua_getfield(L, -1, "threadpool");
  lua_setglobal(L, "threadpool");
  lua_getfield(L, -1, "processpool");
  lua_setglobal(L, "processpool");
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
  lua_setfield(L, LUA_REGISTRYINDEX, WORKER_KEY);
}

/* os.exit of a thread worker's state: a thread task cannot end the
** process (it would take the script and every other result with it), so
** it fails the task instead.  Process workers keep the real os.exit. */
static int l_thread_exit(lua_State *L) {
  lp_wstate *ws = state_worker(L);
  return luaL_error(L,
                    "os.exit called in a thread task (worker %s): a thread cannot end the "
                    "process; use a processpool for code that exits",
                    ws ? ws->name : "?");
}

static int init_worker_state(lua_State *L) {
  lp_wstate *ws = lua_touserdata(L, 1);
  lua_pushlightuserdata(L, ws);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &WSTATE_KEY);
  luaL_openlibs(L);
  if (strcmp(ws->kind, "thread") == 0) {
    /* In the os table itself: a task that captured os.exit gets it by name
    ** from here (codec.c resolves names in the receiver's tables). */
    lua_getglobal(L, "os");
    lua_pushcfunction(L, l_thread_exit);
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);
  }
  lua_getglobal(L, "package");
  lua_pushstring(L, ws->path);
  lua_setfield(L, -2, "path");
  lua_pushstring(L, ws->cpath);
  lua_setfield(L, -2, "cpath");
  lua_pop(L, 1);
  luapool__open_worker_state(L, ws->kind, ws->name, ws->index);
  return 0;
}

static int set_paths(lua_State *L) {
  lp_wstate *ws = lua_touserdata(L, 1);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "package") == LUA_TTABLE) {
    lua_pushstring(L, ws->path);
    lua_setfield(L, -2, "path");
    lua_pushstring(L, ws->cpath);
    lua_setfield(L, -2, "cpath");
  }
  return 0;
}

int luapool__wstate_set_paths(lp_wstate *ws, const char *path, const char *cpath) {
  const char *old_path = ws->path, *old_cpath = ws->cpath;
  ws->path = path;
  ws->cpath = cpath;
  if (ws->L == NULL) return 0; /* init_worker_state reads them */
  lua_pushcfunction(ws->L, set_paths);
  lua_pushlightuserdata(ws->L, ws);
  if (lua_pcall(ws->L, 1, 0, 0) == LUA_OK) return 0;
  lua_pop(ws->L, 1);
  ws->path = old_path;
  ws->cpath = old_cpath;
  return -1;
}

int luapool__worker_state_init(lua_State *L, lp_wstate *ws) {
  lua_pushcfunction(L, init_worker_state);
  lua_pushlightuserdata(L, ws);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) return -1;
  return 0;
}

void luapool__wstate_close(lp_wstate *ws) {
  if (ws->L) lua_close(ws->L);
  ws->L = NULL;
}

/* }====================================================== */

/* {======================================================
** Module
** ======================================================= */

static int threadpool_new(lua_State *L) { return luapool__pool_new(L, &luapool__thread_backend); }

static int processpool_new(lua_State *L) { return luapool__pool_new(L, &luapool__process_backend); }

/* luapool.info(): what a benchmark report says about the machine. */
static int l_info(lua_State *L) {
  struct utsname u;
  lua_createtable(L, 0, 6);
  lua_pushliteral(L, LUAPOOL_VERSION);
  lua_setfield(L, -2, "luapool");
  lua_pushliteral(L, LUA_RELEASE);
  lua_setfield(L, -2, "lua");
  lua_pushstring(L, luapool__curl_version());
  lua_setfield(L, -2, "curl");
  lua_pushinteger(L, luapool__cpu_count());
  lua_setfield(L, -2, "cpus");
  if (uname(&u) == 0) {
    lua_pushfstring(L, "%s %s %s", u.sysname, u.release, u.machine);
    lua_setfield(L, -2, "os");
  }
  return 1;
}

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
static int global_ok;

/* Once per process, before any pool thread exists. */
static void global_init(void) {
  luapool__set_signal_delivery(deliver_signal);
  global_ok = luapool__http_global_init() == 0;
}

int luaopen_luapool(lua_State *L) {
  pthread_once(&global_once, global_init);
  if (!global_ok) return luaL_error(L, "luapool: libcurl initialisation failed");
  luapool__future_open(L);
  luapool__cq_open(L);
  luapool__pool_open(L);
  error_open(L);
  luaL_newlib(L, module_funcs);
  lua_pushliteral(L, LUAPOOL_VERSION);
  lua_setfield(L, -2, "version");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, threadpool_new);
  lua_setfield(L, -2, "new");
  lua_setfield(L, -2, "threadpool");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, processpool_new);
  lua_setfield(L, -2, "new");
  lua_setfield(L, -2, "processpool");
  lua_newtable(L);
  for (int i = 0; luapool__kernels[i].name; i++) {
    lua_pushcfunction(L, luapool__kernels[i].lua_fn);
    lua_setfield(L, -2, luapool__kernels[i].name);
  }
  lua_setfield(L, -2, "kernels");
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, luapool__http_get);
  lua_setfield(L, -2, "get");
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
  open_lua_layer(L);
  return 1;
}

/* }====================================================== */
