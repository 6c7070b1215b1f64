/*
** A worker's Lua state and the task running in it (wstate.c).  Below the
** kernels, which ask it for their task's stop block and deadline.
*/
#ifndef LUAPOOL_WSTATE_H
#define LUAPOOL_WSTATE_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "base/stop.h"

typedef struct lp_wstate {
  lua_State *L;     /* created on the first Lua task */
  const char *kind; /* current_worker().kind: "thread", "process", "io", "mpi" */
  /* The state has a process of its own (a process worker, an MPI rank's
  ** local worker): os.exit ends it as usual.  Elsewhere os.exit fails the
  ** task, since it would end the process every other task shares. */
  int own_process;
  char name[64];
  int index;
  lp_interrupt *intr; /* how the owner stops the running task */
  double deadline;    /* of the running task (luapool__now); 0: none */
  /* For the Lua state: copied from the creating state. */
  const char *path, *cpath;
  /* Process workers with max_memory_mb: the Lua state's allocation cap;
  ** on_oom is called (and must not return) when a task exceeds it.  The
  ** growth refused last, which Lua retries after a full collection
  ** (worker.c: capped_alloc); oom_refused is set until it is settled. */
  size_t mem_cap, mem_used;
  void (*on_oom)(struct lp_wstate *ws);
  int oom_refused;
  void *oom_ptr;
  size_t oom_osize, oom_nsize;
  /* Past gc_at, a full collection is run at the next instruction (a
  ** one-shot hook, the task's own hook kept aside), so that garbage is gone
  ** before an allocation Lua cannot retry meets the cap. */
  size_t gc_at;
  int gc_hooked;
  lua_Hook saved_hook;
  int saved_mask, saved_count;
  int fd; /* process workers: the socket to the parent */
  /* Per-call deadlines: with call_timeout > 0 every call of a message has
  ** its own deadline of that many seconds from its start (a map chunk's
  ** items too).  Before each call the worker gives the call a new number
  ** in intr->seq (a stop aimed at an earlier call misses it), sets
  ** `deadline` and calls call_start (NULL: none), which tells whoever
  ** enforces the deadline (a thread pool's watchdog, a process's parent).
  ** A call stopped by its deadline, or finished past it, replies
  ** LP_REPLY_TIMEOUT naming it: "task #N" (task_no), else "item #K"
  ** (item_lo + its index in the message). */
  double call_timeout;
  void (*call_start)(struct lp_wstate *ws, uint32_t call);
  /* Process workers: the parent enforces each call's deadline with a kill
  ** (so a stuck C call is stopped too); the worker only tells it when
  ** each call starts, and neither stops nor times a call itself. */
  int deadline_by_kill;
  uint64_t task_no;
  int64_t item_lo;
  /* The message's calls stopped short (Ctrl-C, a closing pool): the
  ** calls not yet run are not run (the caller fails the whole task). */
  int aborted;
  /* A task's own code runs (a stop may raise in it only then). */
  int in_call;
  /* An event loop's state (iopool): the engine's loop and how a task in
  ** it waits (NULL elsewhere).  arm_hook replaces the count hook a call
  ** starts with, signal_hook what STOP_SIGNAL sets on the running task. */
  void *io;
  const struct lp_io_ops *io_ops;
  void (*arm_hook)(lua_State *L, struct lp_wstate *ws);
  lua_Hook signal_hook;
  /* A thread worker's pinned strings (worker.h: luapool__pins_*), NULL
  ** elsewhere: only a thread's replies may refer to its strings. */
  struct lp_wpins *pins;
  /* A thread worker's big blocks (worker.h: lp_wbig), NULL elsewhere: the
  ** state's allocator is then Lua's own (realloc and free). */
  struct lp_wbig *big;
} lp_wstate;

/* {====== waiting inside an iopool task
** A Lua task on an iopool runs as a coroutine of its loop thread's state
** (engines/iopool.c).  A call that would block there asks luapool__io_task
** first: when L is such a task, it hands its wait to the loop and yields,
** and the loop resumes it when the wait is over.  luapool.sleep waits with
** luapool__io_await_timer; HTTP requests yield their request to the loop
** (kernels/httploop.h: the yield marker).
**   A task stopped while it waits (cancelled, Ctrl-C, a closing pool) is
** never resumed: the loop ends the wait (a request is aborted) and closes
** the coroutine, so what is held across the wait must be owned by
** something the coroutine's collection frees.  A task whose deadline
** passes while it waits is resumed, and its call stopped at once (the
** count hook raises). */
typedef struct lp_io_ops {
  int (*is_task)(void *io, lua_State *L);
  int (*await_timer)(void *io, lua_State *L, double until, lua_KContext ctx, lua_KFunction k);
} lp_io_ops;
/* The worker of L when L is the running task of an iopool loop (its own
** coroutine): then `what` must yield, not block.  NULL anywhere else (a
** main state, a thread or process worker, a coroutine the task made
** itself): block as usual.  Raises "WHAT: cannot yield here (...)" when L
** is an iopool task that cannot yield now (inside a metamethod or a C
** function such as table.sort's comparator). */
lp_wstate *luapool__io_task(lua_State *L, const char *what);
/* 1 when L is a coroutine of an iopool loop's state other than the running
** task's own (one the task made itself): a yield there would go to the
** task's own coroutine.resume, so a wait must block.  Never raises. */
int luapool__io_nested(lua_State *L);
/* The worker whose Lua state L belongs to (NULL: a main state). */
lp_wstate *luapool__state_worker(lua_State *L);
/* Yields until luapool__now() reaches until; then k(L, LUA_YIELD, ctx)
** runs in the caller's place (lua_yieldk). */
int luapool__io_await_timer(lp_wstate *ws, lua_State *L, double until, lua_KContext ctx,
                            lua_KFunction k);
/* }====== */

/* Creates what a worker's Lua state needs (wstate.c). */
int luapool__worker_state_init(lua_State *L, lp_wstate *ws);
/* Sets the hook a task of L runs with: a count hook for a thread task with
** a deadline, none otherwise (wstate.c). */
void luapool__arm_interrupt_hook(lua_State *L);
/* The same when the caller has L's worker state at hand (the one L was
** made with): no registry lookup, once per call. */
void luapool__arm_hook_of(lua_State *L, lp_wstate *ws);
/* The signal that makes a thread worker's task notice a stop, its handler
** installed once, and the state it acts on for the calling thread. */
#define LUAPOOL_STOP_SIGNAL SIGURG
void luapool__stop_signal_install(void);
void luapool__set_task_state(lua_State *L);
/* (It also sets base/stop.h's luapool__thread_interrupt for the thread.) */
void luapool__wstate_close(lp_wstate *ws);
/* Points ws's paths at path and cpath (which the caller keeps alive) and
** sets them in its Lua state when it has one.  0, or -1 when the state ran
** out of memory (it keeps its old paths). */
int luapool__wstate_set_paths(lp_wstate *ws, const char *path, const char *cpath);
/* The interrupt block and task deadline of the worker whose Lua state L
** is (NULL and 0 in a main state), so kernels called from Lua inside a
** task stop like native ones. */
const lp_interrupt *luapool__lua_interrupt(lua_State *L, double *deadline);
/* The error message of a task stopped through i ("interrupted: ..."). */
const char *luapool__stop_message(const lp_interrupt *i);
/* Called by the host on its script thread with its main state: STOP_SIGNAL
** sent to that thread then sets luapool__signal_hook on L (when a signal
** is pending), so the host's signal thread never touches L itself. */
void luapool__set_signal_state(lua_State *L);
/* Opens luapool into a new worker state (luapool.c's
** luapool__open_worker_state): set by the module's first open and by the
** host before it serves tasks as a process worker. */
typedef void (*luapool__state_opener_fn)(lua_State *L, const char *kind, const char *name,
                                         int index);
void luapool__set_state_opener(luapool__state_opener_fn open);

#endif
