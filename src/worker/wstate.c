/*
** A worker's Lua state and the task running in it: which worker a Lua state
** belongs to, the stop block and deadline of its task (for kernels, sleep
** and nested waits), stopping Lua code in a thread worker (a hook set from
** STOP_SIGNAL's handler), and creating the state a worker runs tasks in.
** The luapool module itself is opened into that state through a hook the
** module sets (luapool__set_state_opener): this file sits below it.
*/
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "base/ctrlc.h"
#include "base/stop.h"
#include "base/util.h"
#include "worker/wstate.h"

static _Atomic(luapool__state_opener_fn) state_opener;

void luapool__set_state_opener(luapool__state_opener_fn open) { atomic_store(&state_opener, open); }

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

const char *luapool__stop_message(const lp_interrupt *i) {
  if (atomic_load(&i->closing)) return "interrupted: the pool was closed";
  if (atomic_load(&i->reason) == LP_STOP_SIGNAL) return "interrupted: Ctrl-C";
  return "interrupted: the task's deadline passed";
}

const lp_interrupt *luapool__lua_interrupt(lua_State *L, double *deadline) {
  lp_wstate *ws = state_worker(L);
  *deadline = ws ? ws->deadline : 0;
  return ws ? ws->intr : NULL;
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
** workers only), and the host's main state (the script thread only).
** on_stop_signal reads them in a signal handler: initial-exec, so that
** reading them never allocates.  (In a module dlopen'ed by lua5.4 a
** thread's first read of a dynamic-model variable allocates its TLS
** block with malloc: a signal landing inside malloc then deadlocked the
** thread on malloc's own lock.) */
#define LP_SIGNAL_TLS __attribute__((tls_model("initial-exec")))
static _Thread_local lua_State *tl_task_state LP_SIGNAL_TLS;
static _Thread_local lp_wstate *tl_task_ws LP_SIGNAL_TLS;
static _Thread_local lua_State *tl_signal_state LP_SIGNAL_TLS;

/* On a worker thread: the task notices its stop.  On the host's script
** thread (the host's signal thread sends STOP_SIGNAL there when it takes a
** SIGINT/SIGTERM): the script notices the signal, as lua.c's handler does. */
static void on_stop_signal(int sig) {
  (void)sig;
  lua_State *L = tl_task_state;
  if (L) {
    lua_Hook h = tl_task_ws && tl_task_ws->signal_hook ? tl_task_ws->signal_hook : interrupt_hook;
    lua_sethook(L, h, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
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
  luapool__set_thread_stop(tl_task_ws ? tl_task_ws->intr : NULL,
                           tl_task_ws ? &tl_task_ws->deadline : NULL);
}

void luapool__set_signal_state(lua_State *L) {
  luapool__stop_signal_install();
  tl_signal_state = L;
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
    luaL_error(L, "%s", luapool__stop_message(i));
  }
  luapool__arm_interrupt_hook(L);
}

void luapool__arm_interrupt_hook(lua_State *L) { luapool__arm_hook_of(L, state_worker(L)); }

void luapool__arm_hook_of(lua_State *L, lp_wstate *ws) {
  if (ws && ws->arm_hook) {
    ws->arm_hook(L, ws);
    return;
  }
  if (ws && ws->deadline > 0 && strcmp(ws->kind, "thread") == 0)
    lua_sethook(L, interrupt_hook, LUA_MASKCOUNT, 1000);
  else
    lua_sethook(L, NULL, 0, 0);
  /* A stop that came before this arming (its STOP_SIGNAL found no state
  ** yet, or set a hook the line above replaced) raises at the next
  ** instruction: a task that never waits would not see it.  Checked after
  ** the arming, so that a signal handled between a check and the arming
  ** cannot be lost either; one handled after it sets its own hook. */
  atomic_thread_fence(memory_order_seq_cst);
  if (ws && luapool__interrupted(ws->intr)) lua_sethook(L, interrupt_hook, LUA_MASKCOUNT, 1);
}

/* }====== */

/* os.exit of a thread worker's state: a thread task cannot end the
** process (it would take the script and every other result with it), so
** it fails the task instead.  Process workers keep the real os.exit. */
static int l_thread_exit(lua_State *L) {
  lp_wstate *ws = state_worker(L);
  int io = ws && ws->io;
  return luaL_error(L,
                    "os.exit called in %s task (worker %s): a thread cannot end the "
                    "process; use a processpool for code that exits",
                    io ? "an iopool" : "a thread", ws ? ws->name : "?");
}

static int init_worker_state(lua_State *L) {
  lp_wstate *ws = lua_touserdata(L, 1);
  lua_pushlightuserdata(L, ws);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &WSTATE_KEY);
  luaL_openlibs(L);
  if (!ws->own_process) { /* threads, event loops */
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
  atomic_load (&state_opener)(L, ws->kind, ws->name, ws->index);
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
  if (atomic_load(&state_opener) == NULL) return -1; /* (no module: cannot happen) */
  lua_pushcfunction(L, init_worker_state);
  lua_pushlightuserdata(L, ws);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) return -1;
  return 0;
}

void luapool__wstate_close(lp_wstate *ws) {
  if (ws->L) lua_close(ws->L);
  ws->L = NULL;
}

/* {====== waiting inside an iopool task */

int luapool__io_nested(lua_State *L) {
  lp_wstate *ws = state_worker(L);
  return ws != NULL && ws->io != NULL && !ws->io_ops->is_task(ws->io, L);
}

lp_wstate *luapool__io_task(lua_State *L, const char *what) {
  lp_wstate *ws = state_worker(L);
  if (ws == NULL || ws->io == NULL || !ws->io_ops->is_task(ws->io, L)) return NULL;
  if (!lua_isyieldable(L))
    luaL_error(L,
               "%s: cannot yield here (inside a metamethod or a C function such as "
               "table.sort's comparator); call it from the task's own code",
               what);
  return ws;
}

lp_wstate *luapool__state_worker(lua_State *L) { return state_worker(L); }

int luapool__io_await_timer(lp_wstate *ws, lua_State *L, double until, lua_KContext ctx,
                            lua_KFunction k) {
  return ws->io_ops->await_timer(ws->io, L, until, ctx, k);
}

/* }====== */
