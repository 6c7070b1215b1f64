/*
** The pool core and its Lua face (executor.c): the queue, the worker
** threads, the counters, and the engine interface (lp_backend) the engines
** implement.  executor.c's header has the lock order.
*/
#ifndef LUAPOOL_EXECUTOR_H
#define LUAPOOL_EXECUTOR_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "core/future.h"
#include "base/stop.h"

#define LUAPOOL_POOL_MT "luapool.pool"

typedef struct lp_pool lp_pool;
typedef struct lp_worker lp_worker;

#define LP_ON_THREADS   1u
#define LP_ON_PROCESSES 2u

typedef struct lp_backend {
  const char *kind; /* "threadpool" / "processpool" */
  size_t worker_size;
  int watchdog; /* deadlines need the pool's watchdog thread (threads) */
  /* Called by the owner before the worker's thread exists (NULL: none). */
  void (*worker_init)(lp_worker *w);
  /* Called on the worker's own thread. */
  int (*worker_start)(lp_worker *w);
  void (*run)(lp_worker *w, lp_future *f);
  void (*worker_stop)(lp_worker *w);
  /* Stops a running task now; it only sends a signal or a kill, so it may
  ** be called with the pool's lock held (pool_interrupt, the watchdog) or
  ** without (pool_stop). */
  void (*interrupt)(lp_worker *w);
  /* max_workers when the script gives none, from the CPU count. */
  int (*default_workers)(int ncpu);
  /* Which pool options apply (README): LP_ON_THREADS or LP_ON_PROCESSES. */
  unsigned options;
  /* A call costs a round trip worth batching: map chunks items by itself
  ** (the Lua layer reads it as pool.chunking). */
  int chunking;
} lp_backend;

struct lp_worker {
  lp_pool *pool;
  int index; /* 1-based */
  pthread_t thread;
  lp_interrupt intr;
  /* The running task's deadline, for the watchdog (mutex: pool's mu). */
  double deadline;
  uint64_t deadline_seq;
  /* Its thread was joined: written by the owner (pool_stop) under the
  ** pool's mu, read by the owner freely and by any other thread
  ** (pool_interrupt, from Ctrl-C) under that mu. */
  int joined;

  atomic_int busy; /* running a task */
  char name[64];
};

struct lp_pool {
  const lp_backend *be;
  /* mu guards the queue, the worker table and counts, closing, the
  ** workers' deadlines, wd_stop and broken.  Not under it: the c_*
  ** counters and ncb (atomics), cbhead (cbmu), the live-pool links
  ** (executor.c's live_mu), what only the owner's thread writes and reads
  ** (paths, nsubmitted, drain, wd_started), and what is fixed once the
  ** pool exists (be, name, options, init_msg). */
  pthread_mutex_t mu;
  pthread_cond_t cv; /* workers wait here for tasks */
  lp_future *head, *tail;
  size_t npending;
  int max_workers, nworkers, idle;
  int nalive;          /* worker threads that have not exited yet */
  int closing;         /* no more submits; workers leave when idle */
  int drain;           /* shut down with wait = false: the work still runs, and
                       ** collecting the pool (or the program's end) waits */
  lp_worker **workers; /* [max_workers] */
  char name[48];
  lp_paths *paths;                    /* package.path/cpath as last submitted (owner only) */
  const void *seen_path, *seen_cpath; /* their Lua strings (pinned: user values 2, 3) */
  /* Calls (a map chunk counts its items) by where they are; atomics, as
  ** workers update them outside the lock. */
  atomic_size_t c_pending, c_running, c_done, c_failed, c_cancelled;
  /* Finished futures whose done callbacks the owner has yet to run. */
  pthread_mutex_t cbmu;
  lp_future *cbhead; /* mutex: cbmu; each holds a reference */
  atomic_int ncb;    /* non-zero when cbhead may be non-empty */
  /* Options (see README): deadlines, and for processes crash policy,
  ** recycling and memory cap. */
  double task_timeout;
  int on_crash_break, max_tasks_per_child, max_memory_mb;
  uint64_t nsubmitted; /* owner only: numbers tasks for crash reports */
  /* The deadline watchdog (thread pools), started with the first task
  ** that has a deadline. */
  pthread_t wd;
  int wd_started, wd_stop;
  pthread_cond_t wdcv;
  struct lp_pool *prev_live, *next_live; /* all live pools (Ctrl-C); mutex: live_mu */
  char *init_msg;                        /* initializer + initargs as a task message */
  size_t init_len;
  char *broken; /* set once an initializer failed: why (mutex: mu) */
};

/* Marks the pool broken (first reason wins) and fails every queued future
** with kind "broken".  Called by a backend, with no pool lock held. */
void luapool__pool_break(lp_pool *p, const char *why);
/* Runs the pool's initializer reply check: 0 when reply (of the init
** message) succeeded, else -1 with the error text in msg. */
int luapool__reply_failed(const char *reply, size_t len, char *msg, size_t sz);

/* Runs the done callbacks of pool p's finished futures (owner only). */
void luapool__pool_poll(lua_State *L, int pool_idx);
/* Remembers the future at fidx in the pool at pool_idx until its
** callbacks have run (so the userdata outlives the script's last use). */
void luapool__pool_watch(lua_State *L, int pool_idx, int fidx);
/* Owner-side pool API (executor.c). */
lp_pool *luapool__check_pool(lua_State *L, int idx);
lp_pool *luapool__to_pool(lua_State *L, int idx); /* NULL when closed */
int luapool__pool_new(lua_State *L, const lp_backend *be);
void luapool__pool_open(lua_State *L);
/* Pushes the table of primitives the Lua layer is built on. */
void luapool__push_prims(lua_State *L);
/* Stops the work of every live pool (Ctrl-C). */
void luapool__interrupt_all(void);

#endif
