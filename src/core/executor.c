/*
** What both pools share: the task queue, the worker threads' loop, and the
** Lua face (new, submit, map, starmap, shutdown, close).
**
** Lock order (a thread holding one may take only those to its right):
**   live_mu -> p->mu -> f->mu -> { q->mu (completion queue), p->cbmu }
** (f->mu: the future's stripe lock, future.c)
** No lock is held across a Lua call or a blocking system call, except that
** pool_interrupt holds live_mu and p->mu while it sends a stop (a signal or
** a kill, which do not block).
**
** Wake-up protocol (every wait re-checks its condition under its mutex
** after waking, and every change that can satisfy it is made under that
** mutex before the wake, so no wake can fall between a check and a wait):
**  - a pool starts with no worker: only submit (the owner's thread, under
**    p->mu) starts one, when the idle workers do not outnumber the tasks
**    already queued (p->idle <= p->npending) and fewer than max_workers
**    exist, so a task that would find no idle worker free gets a new one
**    (up to the limit) and workers are never started ahead of work;
**  - workers wait on p->cv while the queue is empty and the pool is not
**    closing; submit pushes under p->mu and signals when p->idle > 0;
**    a worker counts itself idle from before its wait until after it
**    woke, so a signalled worker that has not run yet still counts, and
**    is matched against the task queued before: a second submit then
**    starts a new worker (below the limit; at it, it only signals, a
**    no-op), and the signalled worker finds every queued task when it
**    wakes, because it takes from the queue until it is empty before
**    waiting again; closing broadcasts;
**  - an owner waits on its future's stripe cv (future.c: f->nwaiters
**    counts it under the stripe's mu; settle broadcasts under that mu
**    when nwaiters > 0; "f->mu" here is that stripe's mu), or on q->cv
**    for a completion queue (fire appends and signals under q->mu; there
**    is one waiter, the owner);
**  - the watchdog waits on p->wdcv until the earliest deadline; a worker
**    that sets a deadline signals it under p->mu;
**  - with the host's signal handling, owner waits are cut in slices of
**    50 ms to notice Ctrl-C; without it they are plain waits.
**
** Pool invariants (mutex p->mu guards the queue and the counters):
**  - the queue holds one reference to each queued future;
**  - only the owner's thread (the Lua state that created the pool) submits,
**    shuts down and joins; workers never touch the owner's Lua state.
** A backend (threadpool.c, processpool.c) only says how a worker starts,
** runs one task and stops; the core never names one (engines.h does).
*/
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec/codec.h"
#include "base/ctrlc.h"
#include "bind/errors.h"
#include "core/executor.h"
#include "core/future.h"
#include "bind/lfuture.h"
#include "codec/message.h"
#include "base/stop.h"
#include "base/util.h"
#include "worker/wstate.h"

/* {======================================================
** Queue and workers
** ======================================================= */

/* mutex must be locked */
static lp_future *queue_pop(lp_pool *p) {
  lp_future *f = p->head;
  if (f) {
    p->head = f->next;
    if (p->head == NULL) p->tail = NULL;
    f->next = NULL;
    p->npending--;
  }
  return f;
}

/* mutex must be locked: empties the queue, handing its list (and the
** references it held) to the caller. */
static lp_future *take_queue(lp_pool *p) {
  lp_future *q = p->head;
  p->head = p->tail = NULL;
  p->npending = 0;
  return q;
}

/* Ends every future of a list taken from a queue (no lock held): cancelled,
** or failed with kind "broken" and `why` when why is not NULL. */
static size_t end_list(lp_future *q, const char *why) {
  size_t calls = 0;
  while (q) {
    calls += (size_t)q->ncalls;
    lp_future *next = q->next;
    if (why)
      luapool__future_fail(q, LP_EK_BROKEN, "%s", why);
    else
      luapool__future_cancel(q);
    luapool__future_unref(q);
    q = next;
  }
  return calls;
}

void luapool__pool_break(lp_pool *p, const char *why) {
  pthread_mutex_lock(&p->mu);
  if (p->broken == NULL) p->broken = strdup(why); /* NULL: "no memory" below */
  lp_future *q = take_queue(p);
  pthread_mutex_unlock(&p->mu);
  end_list(q, why);
}

/* {====== what a settling future tells its pool (future.c's hooks, called
** under the future's stripe lock) */

/* Moves the pool's call counters for a transition of f, so stats() agrees
** with the futures' states at every moment. */
static void count_calls(lp_pool *p, lp_future *f, lp_fstate from, lp_fstate to) {
  size_t n = (size_t)f->ncalls;
  atomic_fetch_sub(from == LP_PENDING ? &p->c_pending : &p->c_running, n);
  if (to == LP_RUNNING) {
    atomic_fetch_add(&p->c_running, n);
  } else if (to == LP_CANCELLED) {
    atomic_fetch_add(&p->c_cancelled, n);
  } else if (to == LP_FAILED) {
    atomic_fetch_add(&p->c_failed, n);
  } else {
    size_t bad = luapool__future_nerr(f);
    if (bad > n) bad = n;
    atomic_fetch_add(&p->c_done, n - bad);
    atomic_fetch_add(&p->c_failed, bad);
  }
}

/* Queues f's done callbacks for the owner (cbmu: after the stripe in the
** lock order). */
static void pool_notify(lp_pool *p, lp_future *f) {
  luapool__future_ref(f);
  pthread_mutex_lock(&p->cbmu);
  f->cbnext = p->cbhead;
  p->cbhead = f;
  atomic_store(&p->ncb, 1);
  pthread_mutex_unlock(&p->cbmu);
}

static const lp_future_hooks future_hooks = {.count = count_calls, .notify = pool_notify};
static pthread_once_t hooks_once = PTHREAD_ONCE_INIT;
static void hooks_install(void) { luapool__future_set_hooks(&future_hooks); }
/* }====== */

int luapool__reply_failed(const char *reply, size_t len, char *msg, size_t sz) {
  lp_reader r = {reply + 4, reply + len}; /* past the error count */
  unsigned st = LP_REPLY_ERROR;
  const char *m = "malformed reply";
  size_t ml = strlen(m);
  if (len >= 4 && luapool__get_u8(&r, &st) == 0 && st == LP_REPLY_OK) return 0;
  if (st == LP_REPLY_ERROR || st == LP_REPLY_TRANSFER || st == LP_REPLY_TIMEOUT) {
    const char *t;
    size_t tl;
    if (luapool__get_string(&r, &t, &tl) == 0) m = t, ml = tl;
  }
  snprintf(msg, sz, "%.*s", (int)ml, m);
  return -1;
}

static void *worker_main(void *arg) {
  lp_worker *w = arg;
  lp_pool *p = w->pool;
  p->be->worker_start(w);
  for (;;) {
    pthread_mutex_lock(&p->mu);
    while (p->head == NULL && !p->closing) {
      p->idle++;
      pthread_cond_wait(&p->cv, &p->mu);
      p->idle--;
    }
    lp_future *f = queue_pop(p);
    pthread_mutex_unlock(&p->mu);
    if (f == NULL) break; /* closing, and nothing left to run */
    if (luapool__future_start(f, w->name)) {
      /* A new number for this task: a stop aimed at an earlier one (a
      ** deadline that fired late) no longer matches. */
      /* (a call with a deadline takes a number of its own: worker.c;
      ** the backend tells the watchdog its deadline, see threadpool.c) */
      atomic_store(&w->intr.seq, atomic_load(&w->intr.seq) + 1);
      atomic_store(&w->busy, 1);
      p->be->run(w, f);
      atomic_store(&w->busy, 0);
    }
    luapool__future_unref(f);
    /* p->broken is written once, under the lock, before the queue is
    ** failed; a task popped before that still runs, which is harmless. */
  }
  p->be->worker_stop(w);
  pthread_mutex_lock(&p->mu);
  p->nalive--;
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* The deadline watchdog of a thread pool: stops each task that outlives
** its deadline by aiming its worker's kill_seq at it (the worker's Lua
** hook and the kernels then give up), then sleeps until the next deadline.
** Process pools need none: each proxy waits for its reply with a timeout. */
static void *watchdog_main(void *arg) {
  lp_pool *p = arg;
  pthread_mutex_lock(&p->mu);
  while (!p->wd_stop) {
    double now = luapool__now(), next = now + 1.0;
    for (int i = 0; i < p->nworkers; i++) {
      lp_worker *w = p->workers[i];
      if (w == NULL || w->deadline <= 0) continue;
      if (now >= w->deadline) {
        atomic_store(&w->intr.reason, LP_STOP_DEADLINE);
        atomic_store(&w->intr.kill_seq, w->deadline_seq);
        if (p->be->interrupt) p->be->interrupt(w); /* at once, not at the next count */
        w->deadline = 0;                           /* fired */
      } else if (w->deadline < next) {
        next = w->deadline;
      }
    }
    struct timespec ts;
    ts.tv_sec = (time_t)next;
    ts.tv_nsec = (long)((next - (double)ts.tv_sec) * 1e9);
    pthread_cond_timedwait(&p->wdcv, &p->mu, &ts);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* Pool threads run with the asynchronous signals blocked, so SIGINT and
** SIGTERM reach the main thread (the host's handler) and a dead worker's
** socket never raises SIGPIPE in them. */
static int create_thread(pthread_t *t, void *(*fn)(void *), void *arg) {
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGPIPE);
  sigaddset(&block, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  int r = pthread_create(t, NULL, fn, arg);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return r;
}

/* {====== live pools, for Ctrl-C */
static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static lp_pool *live_head;

static void live_add(lp_pool *p) {
  pthread_mutex_lock(&live_mu);
  p->next_live = live_head;
  if (live_head) live_head->prev_live = p;
  live_head = p;
  pthread_mutex_unlock(&live_mu);
}

static void live_remove(lp_pool *p) {
  pthread_mutex_lock(&live_mu);
  if (p->prev_live)
    p->prev_live->next_live = p->next_live;
  else
    live_head = p->next_live;
  if (p->next_live) p->next_live->prev_live = p->prev_live;
  pthread_mutex_unlock(&live_mu);
}

/* Cancels the queued tasks and stops the running ones (their futures fail
** with kind "interrupted"); the pool stays usable. */
static void pool_interrupt(lp_pool *p) {
  pthread_mutex_lock(&p->mu);
  lp_future *q = take_queue(p);
  for (int i = 0; i < p->nworkers; i++) {
    lp_worker *w = p->workers[i];
    if (w->joined || !atomic_load(&w->busy)) continue;
    atomic_store(&w->intr.reason, LP_STOP_SIGNAL);
    atomic_store(&w->intr.kill_seq, atomic_load(&w->intr.seq));
    if (p->be->interrupt) p->be->interrupt(w);
  }
  pthread_mutex_unlock(&p->mu);
  end_list(q, NULL);
}

void luapool__interrupt_all(void) {
  pthread_mutex_lock(&live_mu);
  for (lp_pool *p = live_head; p; p = p->next_live)
    pool_interrupt(p);
  pthread_mutex_unlock(&live_mu);
}
/* }====== */

/* mutex must be locked.  Starts worker number nworkers+1; -1 on failure. */
static int start_worker(lp_pool *p, char *err, size_t errsz) {
  int i = p->nworkers;
  lp_worker *w = calloc(1, p->be->worker_size);
  if (w == NULL) {
    snprintf(err, errsz, "cannot start a worker: not enough memory");
    return -1;
  }
  w->pool = p;
  w->index = i + 1;
  snprintf(w->name, sizeof w->name, "%s-%d", p->name, i + 1);
  atomic_init(&w->intr.closing, 0);
  atomic_init(&w->intr.seq, 0);
  atomic_init(&w->intr.kill_seq, UINT64_MAX); /* matches no task */
  atomic_init(&w->intr.reason, 0);
  atomic_init(&w->busy, 0);
  if (p->be->worker_init) p->be->worker_init(w);
  int r = create_thread(&w->thread, worker_main, w);
  if (r != 0) {
    snprintf(err, errsz, "cannot start a worker thread: %s", strerror(r));
    free(w);
    return -1;
  }
  p->workers[i] = w;
  p->nworkers++;
  p->nalive++;
  return 0;
}

/* Queues f (taking a reference).  -1 with err when the pool cannot run it:
** closing, or no worker could be started at all. */
static int pool_enqueue(lp_pool *p, lp_future *f, char *err, size_t errsz) {
  pthread_mutex_lock(&p->mu);
  if (p->closing) {
    pthread_mutex_unlock(&p->mu);
    snprintf(err, errsz, "cannot submit after shutdown");
    return -1;
  }
  if (p->broken) { /* the future fails at once, like those queued before */
    f->pool = p;
    atomic_fetch_add(&p->c_pending, (size_t)f->ncalls);
    luapool__future_fail(f, LP_EK_BROKEN, "%s", p->broken);
    pthread_mutex_unlock(&p->mu);
    return 0;
  }
  if (p->idle <= (int)p->npending && p->nworkers < p->max_workers &&
      start_worker(p, err, errsz) != 0 && p->nworkers == 0) {
    pthread_mutex_unlock(&p->mu);
    return -1; /* with no worker at all the task would wait forever */
  }
  f->pool = p; /* from here on its transitions move the pool's counters */
  atomic_fetch_add(&p->c_pending, (size_t)f->ncalls);
  if (f->timeout > 0 && p->be->watchdog && !p->wd_started &&
      create_thread(&p->wd, watchdog_main, p) == 0)
    p->wd_started = 1; /* (without it, a deadline is still checked after) */
  luapool__future_ref(f);
  if (p->tail)
    p->tail->next = f;
  else
    p->head = f;
  p->tail = f;
  p->npending++;
  if (p->idle > 0) pthread_cond_signal(&p->cv);
  pthread_mutex_unlock(&p->mu);
  return 0;
}

/* Stops taking tasks; optionally cancels the queued ones, interrupts the
** running ones, and joins the workers. */
/* How long a closing pool whose tasks were told to stop waits for its
** threads before it gives up on them (see pool_gc): 5 seconds, but only
** half a second once the host is ending on an uncaught Ctrl-C/SIGTERM,
** which must exit within a second. */
#define STOP_GRACE (atomic_load(&luapool__ending_on_signal) ? 0.5 : 5.0)

/* What a stop did, for the note of a pool collected while open. */
typedef struct stop_counts {
  size_t cancelled;   /* queued calls cancelled */
  size_t interrupted; /* running calls told to stop */
} stop_counts;

static int pool_stop(lp_pool *p, int wait, int cancel, int interrupt, stop_counts *counts) {
  pthread_mutex_lock(&p->mu);
  p->closing = 1;
  lp_future *cancelled = cancel ? take_queue(p) : NULL;
  pthread_cond_broadcast(&p->cv);
  int n = p->nworkers;
  pthread_mutex_unlock(&p->mu);
  /* Calls still running (a worker's busy flag lags its future's outcome,
  ** which the owner may already have seen: the future's state counts). */
  size_t running = atomic_load(&p->c_running);
  size_t ncancelled = end_list(cancelled, NULL);
  if (counts) *counts = (stop_counts){ncancelled, interrupt ? running : 0};
  /* Workers are only started by the owner (submit), which is this thread:
  ** n cannot grow while we join. */
  if (interrupt)
    for (int i = 0; i < n; i++) {
      if (p->workers[i]->joined) continue; /* by an earlier stop */
      atomic_store(&p->workers[i]->intr.closing, 1);
      if (p->be->interrupt) p->be->interrupt(p->workers[i]);
    }
  if (!wait) return 0;
  int stopped = 0, stuck = 0;
  double give_up = luapool__now() + STOP_GRACE;
  for (int i = 0; i < n; i++) {
    lp_worker *w = p->workers[i];
    if (w->joined) continue;
    /* With the host's handler installed, a Ctrl-C during the wait stops
    ** the running tasks (the caller raises once the workers are gone).
    ** When the tasks were told to stop, a thread that still runs after
    ** the grace period is stuck where no stop reaches (a C call, a Lua
    ** message handler, which runs without hooks): it is left alone. */
    int joined = 0;
    while (interrupt || atomic_load(&luapool__signals_handled)) {
      struct timespec ts; /* joins as soon as the thread ends, else 20 ms */
      clock_gettime(CLOCK_REALTIME, &ts);
      ts.tv_nsec += 20000000L;
      if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
      if (pthread_timedjoin_np(w->thread, NULL, &ts) == 0) {
        joined = 1;
        break;
      }
      if (!stopped && luapool__signal_for_me()) {
        pool_interrupt(p);
        stopped = 1;
      }
      if (interrupt && luapool__now() > give_up) break;
    }
    if (!joined && interrupt) {
      stuck++;
      continue;
    }
    if (!joined) pthread_join(w->thread, NULL);
    pthread_mutex_lock(&p->mu); /* read by pool_interrupt of other threads */
    w->joined = 1;
    pthread_mutex_unlock(&p->mu);
  }
  if (stuck) return stuck; /* the watchdog stays: the stuck thread may use it */
  if (p->wd_started) {     /* deadlines were enforced until the last task ended */
    pthread_mutex_lock(&p->mu);
    p->wd_stop = 1;
    pthread_cond_signal(&p->wdcv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->wd, NULL);
    p->wd_started = 0;
  }
  return 0;
}

static void pool_free(lp_pool *p) {
  live_remove(p);
  for (int i = 0; i < p->nworkers; i++)
    free(p->workers[i]);
  /* callbacks still owed (the pool was collected): dropped with it */
  for (lp_future *f = p->cbhead, *next; f; f = next) {
    next = f->cbnext;
    luapool__future_unref(f);
  }
  pthread_mutex_destroy(&p->cbmu);
  pthread_cond_destroy(&p->wdcv);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cv);
  free(p->workers);
  luapool__paths_unref(p->paths);
  free(p->init_msg);
  free(p->broken);
  free(p);
}

/* {====== the script's paths, as tasks saw them */
/* }====== */

/* }====================================================== */

/* {======================================================
** Lua face
** ======================================================= */

/* The userdata is born closed (p == NULL) and opened once the C pool
** exists, so a failed creation leaves nothing to free twice. */
typedef struct lpool {
  lp_pool *p;
} lpool;

static lpool *to_lpool(lua_State *L, int idx) { return luaL_checkudata(L, idx, LUAPOOL_POOL_MT); }

lp_pool *luapool__to_pool(lua_State *L, int idx) {
  lpool *u = luaL_testudata(L, idx, LUAPOOL_POOL_MT);
  return u ? u->p : NULL;
}

void luapool__pool_watch(lua_State *L, int pool_idx, int fidx) {
  lp_future *f = luapool__check_future(L, fidx);
  fidx = lua_absindex(L, fidx);
  lua_getiuservalue(L, pool_idx, 1);
  lua_pushlightuserdata(L, f);
  lua_pushvalue(L, fidx);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

void luapool__pool_poll(lua_State *L, int pool_idx) {
  lp_pool *p = luapool__to_pool(L, pool_idx);
  if (p == NULL || atomic_load_explicit(&p->ncb, memory_order_acquire) == 0) return;
  pool_idx = lua_absindex(L, pool_idx);
  pthread_mutex_lock(&p->cbmu);
  lp_future *list = p->cbhead, *rev = NULL;
  p->cbhead = NULL;
  atomic_store(&p->ncb, 0);
  pthread_mutex_unlock(&p->cbmu);
  while (list) { /* oldest first */
    lp_future *next = list->cbnext;
    list->cbnext = rev;
    rev = list;
    list = next;
  }
  lua_getiuservalue(L, pool_idx, 1); /* lightuserdata(f) -> future */
  int watch = lua_gettop(L);
  while (rev) {
    lp_future *f = rev;
    rev = f->cbnext;
    lua_pushlightuserdata(L, f);
    if (lua_rawget(L, watch) == LUA_TUSERDATA) {
      lua_pushlightuserdata(L, f);
      lua_pushnil(L);
      lua_rawset(L, watch);
      luapool__future_run_callbacks(L, -1);
    }
    lua_pop(L, 1);
    luapool__future_unref(f);
  }
  lua_pop(L, 1);
}

lp_pool *luapool__check_pool(lua_State *L, int idx) {
  lpool *u = to_lpool(L, idx);
  if (u->p == NULL) luaL_error(L, "attempt to use a closed pool");
  return u->p;
}

static int default_workers(const lp_backend *be) {
  return be->default_workers(luapool__cpu_count());
}

/* Pushes package[field] when it is a string, else "" (the package table
** require uses: package.loaded.package, whatever the global holds). */
static void push_package_field(lua_State *L, const char *field) {
  int top = lua_gettop(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "package") != LUA_TTABLE || lua_getfield(L, -1, field) != LUA_TSTRING) {
    lua_settop(L, top);
    lua_pushliteral(L, "");
  } else {
    lua_replace(L, top + 1);
    lua_settop(L, top + 1);
  }
}

/* The paths a task submitted now must see: the pool keeps the strings it
** saw last (user values 2 and 3, so they stay alive: while they do, an
** unchanged string is the same object, found by its address alone) and
** makes a new lp_paths when either changed.  On every submit: keep it to
** two field reads of the package table (user value 4). */
static void check_paths(lua_State *L, int pool_idx, lp_pool *p) {
  lua_getiuservalue(L, pool_idx, 4);
  if (!lua_istable(L, -1)) { /* (a package table that was not one at creation) */
    lua_pop(L, 1);
    push_package_field(L, "path");
    push_package_field(L, "cpath");
  } else {
    if (lua_getfield(L, -1, "path") != LUA_TSTRING) {
      lua_pop(L, 1);
      lua_pushliteral(L, "");
    }
    if (lua_getfield(L, -2, "cpath") != LUA_TSTRING) {
      lua_pop(L, 1);
      lua_pushliteral(L, "");
    }
    lua_remove(L, -3);
  }
  if (lua_topointer(L, -2) == p->seen_path && lua_topointer(L, -1) == p->seen_cpath) {
    lua_pop(L, 2);
    return;
  }
  lua_getiuservalue(L, pool_idx, 2);
  lua_getiuservalue(L, pool_idx, 3);
  int same = lua_rawequal(L, -4, -2) && lua_rawequal(L, -3, -1); /* new strings, same text */
  lua_pop(L, 2);
  if (!same) {
    size_t pl, cl;
    const char *path = lua_tolstring(L, -2, &pl), *cpath = lua_tolstring(L, -1, &cl);
    lp_paths *ps = luapool__paths_new(path, pl, cpath, cl, p->paths->gen + 1);
    if (ps == NULL) luaL_error(L, "cannot submit: not enough memory");
    luapool__paths_unref(p->paths);
    p->paths = ps;
  }
  p->seen_path = lua_topointer(L, -2);
  p->seen_cpath = lua_topointer(L, -1);
  lua_setiuservalue(L, pool_idx, 3);
  lua_setiuservalue(L, pool_idx, 2);
}

/* {====== pool options
** Every option of new() is described once here: its name, what it takes,
** and which pools have it.  One reader checks them all with Lua's rules
** (an integer option takes an integral float, 4.0; no option takes a
** string for a number), so every option refuses and reports alike. */

typedef enum { OPT_INT, OPT_SECONDS, OPT_NAME, OPT_CRASH, OPT_FUNCTION, OPT_TABLE } opt_type;

#define ON_THREADS   LP_ON_THREADS
#define ON_PROCESSES LP_ON_PROCESSES
#define ON_ALL       (ON_THREADS | ON_PROCESSES)

typedef struct pool_opts {
  int max_workers;
  char name[48];
  double task_timeout;
  int on_crash_break, max_tasks_per_child, max_memory_mb;
} pool_opts;

typedef struct opt_desc {
  const char *name;
  lua_Integer min, max; /* OPT_INT */
  const char *expect;   /* OPT_INT: what the message says it takes */
  size_t offset;        /* into pool_opts; unused for FUNCTION/TABLE */
  opt_type type;
  unsigned pools; /* ON_* */
} opt_desc;

static const opt_desc pool_options[] = {
    {.name = "max_workers",
     .type = OPT_INT,
     .min = 1,
     .max = 4096,
     .expect = "integer from 1 to 4096",
     .offset = offsetof(pool_opts, max_workers),
     .pools = ON_ALL},
    {.name = "name", .type = OPT_NAME, .offset = offsetof(pool_opts, name), .pools = ON_ALL},
    {.name = "task_timeout",
     .type = OPT_SECONDS,
     .offset = offsetof(pool_opts, task_timeout),
     .pools = ON_ALL},
    {.name = "initializer", .type = OPT_FUNCTION, .pools = ON_ALL},
    {.name = "initargs", .type = OPT_TABLE, .pools = ON_ALL},
    {.name = "on_crash",
     .type = OPT_CRASH,
     .offset = offsetof(pool_opts, on_crash_break),
     .pools = ON_PROCESSES},
    {.name = "max_tasks_per_child",
     .type = OPT_INT,
     .min = 1,
     .max = INT32_MAX,
     .expect = "positive integer",
     .offset = offsetof(pool_opts, max_tasks_per_child),
     .pools = ON_PROCESSES},
    {.name = "max_memory_mb",
     .type = OPT_INT,
     .min = 1,
     .max = INT32_MAX,
     .expect = "positive integer",
     .offset = offsetof(pool_opts, max_memory_mb),
     .pools = ON_PROCESSES},
    {.name = NULL},
};

/* What a bad value was, for "expected, got X": a number as Lua prints it,
** anything else by its type (a string "1" is not a number here). */
static const char *got(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TNUMBER) return luaL_tolstring(L, idx, NULL);
  return luaL_typename(L, idx);
}

/* Reads the value at -1 into o as d says; raises on a bad value. */
static void read_option(lua_State *L, const opt_desc *d, unsigned pools, pool_opts *o) {
  char *field = (char *)o + d->offset;
  int isint = 0;
  lua_Integer i = lua_type(L, -1) == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : 0;
  if (!(d->pools & pools))
    luaL_error(L, "bad option '%s' to 'new' (a processpool option: threads share one process)",
               d->name);
  switch (d->type) {
    case OPT_INT:
      if (!isint || i < d->min || i > d->max)
        luaL_error(L, "bad option '%s' to 'new' (%s expected, got %s)", d->name, d->expect,
                   got(L, -1));
      memcpy(field, &(int){(int)i}, sizeof(int));
      break;
    case OPT_SECONDS: {
      lua_Number n = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
      if (!(n > 0)) /* also NaN */
        luaL_error(L, "bad option '%s' to 'new' (positive number of seconds expected, got %s)",
                   d->name, got(L, -1));
      memcpy(field, &(double){(double)n}, sizeof(double));
      break;
    }
    case OPT_NAME: {
      size_t len = 0, cap = sizeof o->name;
      const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
      if (s == NULL || len == 0 || len >= cap - 8)
        luaL_error(L, "bad option '%s' to 'new' (non-empty string of at most %d bytes expected)",
                   d->name, (int)cap - 9);
      snprintf(field, cap, "%s", s);
      break;
    }
    case OPT_CRASH: {
      const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
      if (strcmp(v, "replace") != 0 && strcmp(v, "break") != 0)
        luaL_error(L, "bad option '%s' to 'new' ('replace' or 'break' expected, got %s)", d->name,
                   lua_type(L, -1) == LUA_TSTRING ? v : got(L, -1));
      memcpy(field, &(int){strcmp(v, "break") == 0}, sizeof(int));
      break;
    }
    case OPT_FUNCTION:
      if (lua_type(L, -1) != LUA_TFUNCTION)
        luaL_error(L, "bad option '%s' to 'new' (function expected, got %s)", d->name,
                   luaL_typename(L, -1));
      break;
    case OPT_TABLE:
      if (!lua_istable(L, -1))
        luaL_error(L, "bad option '%s' to 'new' (table expected, got %s)", d->name,
                   luaL_typename(L, -1));
      break;
  }
}

/* Checks every key of the options table at 1 and fills o. */
static void read_options(lua_State *L, unsigned pools, pool_opts *o) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    const opt_desc *d = pool_options;
    if (lua_type(L, -2) == LUA_TSTRING)
      while (d->name && strcmp(d->name, lua_tostring(L, -2)) != 0)
        d++;
    else
      while (d->name)
        d++;
    if (d->name == NULL) {
      lua_pop(L, 1);
      luaL_error(L, "unknown option '%s' to 'new'", luaL_tolstring(L, -1, NULL));
    }
    read_option(L, d, pools, o);
    lua_pop(L, 1);
  }
}
/* }====== */

int luapool__pool_new(lua_State *L, const lp_backend *be) {
  pthread_once(&hooks_once, hooks_install); /* before this pool's first future */
  pool_opts opt = {.max_workers = default_workers(be)};
  snprintf(opt.name, sizeof opt.name, "%s", be->kind);
  if (!lua_isnoneornil(L, 1)) read_options(L, be->options, &opt);
  int max_workers = opt.max_workers;
  const char *name = opt.name;
  /* The initializer travels as one task message, encoded once now so that
  ** what cannot travel is refused here, not in a worker. */
  lp_buf *ib = NULL;
  int ib_idx = 0;
  if (!lua_isnoneornil(L, 1)) {
    lua_settop(L, 1);
    if (lua_getfield(L, 1, "initializer") != LUA_TNIL) { /* 2 */
      ib = luapool__scratch(L);                          /* 3 */
      lua_insert(L, 2);                                  /* scratch 2, initializer 3 */
      ib_idx = 2;
      int nargs = 0;
      if (lua_getfield(L, 1, "initargs") == LUA_TTABLE) { /* 4 */
        nargs = (int)lua_rawlen(L, 4);
        luaL_checkstack(L, nargs, "too many initargs");
        for (int i = 1; i <= nargs; i++)
          lua_rawgeti(L, 4, i);
      }
      lua_remove(L, 4);
      lp_encode_ctx ctx = {.root = "initializer argument", .root_base = 1, .first = "initializer"};
      if (luapool__put_u8(ib, LP_MSG_SINGLE) || luapool__put_u32(ib, (uint32_t)nargs + 1))
        return luaL_error(L, "cannot create a pool: not enough memory");
      if (luapool__encode(L, ib, 3, nargs + 1, &ctx) != 0) {
        luapool__scratch_release(L, 2);
        return luaL_error(L, "%s", ctx.err);
      }
      lua_settop(L, 2);
    } else {
      lua_settop(L, 1);
    }
  } else if (lua_isnil(L, 1)) {
    lua_settop(L, 0);
  }
  size_t pl, cl;
  push_package_field(L, "path");
  push_package_field(L, "cpath");
  const char *lpath = lua_tolstring(L, -2, &pl), *lcpath = lua_tolstring(L, -1, &cl);
  lpool *u = lua_newuserdatauv(L, sizeof *u, 4);
  u->p = NULL;
  luaL_setmetatable(L, LUAPOOL_POOL_MT);
  lua_newtable(L); /* futures whose done callbacks are still owed */
  lua_setiuservalue(L, -2, 1);
  lua_pushvalue(L, -3); /* the paths seen last (see check_paths) */
  lua_setiuservalue(L, -2, 2);
  lua_pushvalue(L, -2);
  lua_setiuservalue(L, -2, 3);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(L, -1, "package"); /* the table require reads */
  lua_remove(L, -2);
  lua_setiuservalue(L, -2, 4);
  const void *seen_path = lua_topointer(L, -3), *seen_cpath = lua_topointer(L, -2);
  /* Everything below is plain C until the pool is complete: no raise.
  ** (ib is a scratch buffer this call owns: anchored at ib_idx.) */
  char *init_msg = NULL;
  lp_paths *paths = NULL;
  size_t init_len = 0;
  lp_pool *p = NULL;
  lp_worker **workers = NULL;
  if (ib && (init_msg = malloc(ib->len)) != NULL) {
    memcpy(init_msg, ib->p, ib->len);
    init_len = ib->len;
  }
  if (ib) ib->len = 0; /* (released once the pool is complete) */
  if (ib && init_msg == NULL) goto nomem;
  paths = luapool__paths_new(lpath, pl, lcpath, cl, 1);
  p = calloc(1, sizeof *p);
  /* an array of pointers, one per worker */
  workers = calloc((size_t)max_workers, sizeof *workers); // NOLINT(bugprone-sizeof-expression)
  if (p == NULL || workers == NULL || paths == NULL) goto nomem;
  if (pthread_mutex_init(&p->mu, NULL) != 0) goto nomem;
  if (pthread_cond_init(&p->cv, NULL) != 0) {
    pthread_mutex_destroy(&p->mu);
    goto nomem;
  }
  if (pthread_mutex_init(&p->cbmu, NULL) != 0) {
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    goto nomem;
  }
  if (luapool__cond_init(&p->wdcv) != 0) {
    pthread_mutex_destroy(&p->cbmu);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    goto nomem;
  }
  live_add(p);
  p->task_timeout = opt.task_timeout;
  p->on_crash_break = opt.on_crash_break;
  p->max_tasks_per_child = opt.max_tasks_per_child;
  p->max_memory_mb = opt.max_memory_mb;
  p->be = be;
  p->max_workers = max_workers;
  p->workers = workers;
  p->paths = paths;
  p->seen_path = seen_path;
  p->seen_cpath = seen_cpath;
  p->init_msg = init_msg;
  p->init_len = init_len;
  snprintf(p->name, sizeof p->name, "%s", name);
  u->p = p;
  if (ib_idx) luapool__scratch_release(L, ib_idx);
  return 1;
nomem:
  free(init_msg);
  luapool__paths_unref(paths);
  free(workers);
  free(p);
  return luaL_error(L, "cannot create a pool: not enough memory");
}

static void check_fn(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TFUNCTION) luaL_typeerror(L, idx, "function or kernel");
}

/* Queues a message as a new future and pushes its userdata.  Raises on
** failure (the message is freed first). */
static lp_future *submit_message(lua_State *L, lp_pool *p, int pool_idx, lp_buf *b, int ncalls,
                                 double timeout, uint64_t task_no, int64_t lo) {
  check_paths(L, pool_idx, p);
  luapool__future_push(L, NULL, pool_idx); /* born empty: may raise */
  lp_future *f = luapool__future_new(b, ncalls);
  if (f == NULL) {
    luaL_error(L, "cannot submit: not enough memory");
    return NULL; /* not reached */
  }
  luapool__paths_ref(p->paths);
  f->paths = p->paths;
  f->timeout = timeout;
  f->task_no = task_no;
  f->item_lo = lo;
  char err[160];
  if (pool_enqueue(p, f, err, sizeof err) != 0) {
    luapool__future_unref(f);
    luaL_error(L, "%s", err);
  }
  luapool__future_set(L, -1, f);
  return f;
}

static int pool_submit(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  check_fn(L, 2);
  if (atomic_load_explicit(&p->ncb, memory_order_acquire)) luapool__pool_poll(L, 1); /* owed? */
  if (p->closing) return luaL_error(L, "cannot submit after shutdown");
  int n = lua_gettop(L) - 1;
  lp_buf *b = luapool__scratch(L); /* at n+2 */
  lp_encode_ctx ctx = {.root = "argument", .root_base = 1};
  if (luapool__put_u8(b, LP_MSG_SINGLE) || luapool__put_u32(b, (uint32_t)n))
    return luaL_error(L, "cannot submit: not enough memory");
  if (luapool__encode(L, b, 2, n, &ctx) != 0) {
    luapool__scratch_release(L, n + 2);
    return luaL_error(L, "%s", ctx.err);
  }
  submit_message(L, p, 1, b, 1, p->task_timeout, ++p->nsubmitted, 0);
  luapool__scratch_release(L, n + 2);
  return 1;
}

/* {======================================================
** Primitives of the Lua layer (lua/luapool/executor.lua): map, starmap,
** imap, as_completed and wait are written there on top of these.
** ======================================================= */

/* submit_chunk(pool, fn, items, lo, hi, star [, task_timeout [, first]])
** -> future, or nil + message (first: the caller's number for items[lo],
** default lo, used in labels and refusals)
** when a value cannot travel or the pool takes no more work (the caller
** raises at its caller's level).  One task message runs fn on items[lo..hi]
** (each an argument list when star). */
static int prim_submit_chunk(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer lo = luaL_checkinteger(L, 4), hi = luaL_checkinteger(L, 5);
  int star = lua_toboolean(L, 6);
  double timeout = luaL_optnumber(L, 7, p->task_timeout);
  lua_Integer first_no = luaL_optinteger(L, 8, lo), shift = first_no - lo;
  lua_settop(L, 6);
  luaL_argcheck(L, lo >= 1 && hi >= lo && hi - lo < INT32_MAX, 4, "bad chunk");
  luapool__pool_poll(L, 1);
  if (p->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "cannot submit after shutdown");
    return 2;
  }
  lp_buf *b = luapool__scratch(L); /* 7 */
  lp_encode_ctx ctx = {.root = "argument", .root_base = 1};
  if (luapool__put_u8(b, LP_MSG_BATCH) || luapool__put_u32(b, (uint32_t)(hi - lo + 1)))
    return luaL_error(L, "cannot submit: not enough memory");
  if (luapool__encode(L, b, 2, 1, &ctx) != 0) goto refuse;
  for (lua_Integer i = lo; i <= hi; i++) {
    lua_rawgeti(L, 3, i); /* 8 */
    int nargs = 1, first = 8;
    if (star) {
      if (!lua_istable(L, 8)) {
        snprintf(ctx.err, sizeof ctx.err, "bad item #%lld (table of arguments expected, got %s)",
                 (long long)(i + shift), luaL_typename(L, 8));
        goto refuse;
      }
      nargs = (int)lua_rawlen(L, 8);
      luaL_checkstack(L, nargs, "too many arguments");
      for (int a = 1; a <= nargs; a++)
        lua_rawgeti(L, 8, a);
      first = 9;
    }
    char of_item[40];
    if (star) { /* starmap: "argument #2 of item #7" */
      snprintf(of_item, sizeof of_item, " of item #%lld", (long long)(i + shift));
      ctx.root = "argument";
      ctx.root_base = 1;
      ctx.suffix = of_item;
    } else {
      ctx.root = "item";
      ctx.root_base = (int)(i + shift);
    }
    if (luapool__put_u32(b, (uint32_t)nargs))
      return luaL_error(L, "cannot submit: not enough memory");
    int r = luapool__encode(L, b, first, nargs, &ctx);
    ctx.suffix = NULL;
    lua_settop(L, 7);
    if (r != 0) goto refuse;
  }
  submit_message(L, p, 1, b, (int)(hi - lo + 1), timeout, 0, lo + shift);
  luapool__scratch_release(L, 7);
  return 1;
refuse:
  luapool__scratch_release(L, 7);
  lua_pushnil(L);
  lua_pushstring(L, ctx.err);
  return 2;
}

/* chunk_into(future, out, offset [, timeout]) -> true when every call's
** first value is stored at out[offset + k]; false + the error object of
** the first call that failed + its number in the chunk (from 1; absent
** when the chunk failed as a whole: a crash, a cancel...), the values
** before it stored; nil when the timeout expired first. */
static int prim_chunk_into(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer offset = luaL_checkinteger(L, 3);
  double timeout = lua_isnoneornil(L, 4) ? -1 : luaL_checknumber(L, 4);
  lua_settop(L, 3);
  luapool__future_push_pool(L, 1);
  luapool__pool_poll(L, 4);
  int w = luapool__future_wait(f, timeout < 0 ? -1 : timeout);
  if (w < 0) luapool__check_signal(L);
  if (w <= 0) {
    lua_pushnil(L);
    return 1;
  }
  lp_reader r = {NULL, NULL};
  int finished = luapool__future_state(f) == LP_FINISHED; /* each call has its outcome */
  for (int k = 0; k < f->ncalls; k++) {
    int top = lua_gettop(L);
    if (luapool__future_outcome(L, f, &r, 1) < 0) {
      lua_pushboolean(L, 0);
      lua_insert(L, -2);
      if (!finished) return 2; /* the whole chunk failed: no one call did */
      lua_pushinteger(L, k + 1);
      return 3;
    }
    if (lua_gettop(L) == top) lua_pushnil(L);
    lua_rawseti(L, 2, offset + k);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* cancel(future) -> true when it was still queued and is now cancelled */
static int prim_cancel(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  lua_pushboolean(L, luapool__future_cancel(f));
  return 1;
}

/* error(kind, message) -> an error object */
static int prim_error(lua_State *L) {
  static const char *const kinds[] = {"task",   "timeout",  "cancelled",   "crashed",
                                      "broken", "transfer", "interrupted", NULL};
  int k = luaL_checkoption(L, 1, NULL, kinds);
  luapool__push_error(L, (lp_ekind)k, luaL_checkstring(L, 2), NULL, NULL, 0);
  return 1;
}

static int prim_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

static int prim_is_future(lua_State *L) {
  lua_pushboolean(L, luapool__is_future(L, 1));
  return 1;
}

static int prim_chunk_size(lua_State *L) {
  lua_pushinteger(L, luapool__check_future(L, 1)->ncalls);
  return 1;
}

static const luaL_Reg prims[] = {{"submit_chunk", prim_submit_chunk},
                                 {"chunk_into", prim_chunk_into},
                                 {"chunk_size", prim_chunk_size},
                                 {"cancel", prim_cancel},
                                 {"error", prim_error},
                                 {"isatty", prim_isatty},
                                 {"is_future", prim_is_future},
                                 {"cq", luapool__cq_new},
                                 {NULL, NULL}};

void luapool__push_prims(lua_State *L) { luaL_newlib(L, prims); }

/* }====================================================== */

static int pool_stats(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  luapool__pool_poll(L, 1);
  pthread_mutex_lock(&p->mu);
  int workers = p->nalive, idle = p->idle;
  pthread_mutex_unlock(&p->mu);
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, workers);
  lua_setfield(L, -2, "workers");
  lua_pushinteger(L, idle);
  lua_setfield(L, -2, "idle");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_pending));
  lua_setfield(L, -2, "pending");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_running));
  lua_setfield(L, -2, "running");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_done));
  lua_setfield(L, -2, "done");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_failed));
  lua_setfield(L, -2, "failed");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_cancelled));
  lua_setfield(L, -2, "cancelled");
  return 1;
}

static int pool_shutdown(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  int wait = 1, cancel = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
      if (strcmp(k, "wait") == 0)
        wait = lua_toboolean(L, -1);
      else if (strcmp(k, "cancel_futures") == 0)
        cancel = lua_toboolean(L, -1);
      else
        return luaL_error(L, "unknown option '%s' to 'shutdown'", k);
      lua_pop(L, 1);
    }
  }
  /* wait = false: do not block now, but the work still runs, and the
  ** pool's collection (at the latest the program's end) waits for it. */
  if (!wait) p->drain = 1;
  pool_stop(p, wait, cancel, 0, NULL);
  luapool__pool_poll(L, 1);
  luapool__check_signal(L);
  return 0;
}

/* <close>: waits for the work; when the scope is left by an error, the
** queued tasks are cancelled first (the script is failing anyway). */
static int pool_close(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p) {
    pool_stop(u->p, 1, !lua_isnoneornil(L, 2), 0, NULL);
    luapool__pool_poll(L, 1);
  }
  return 0;
}

/* Collected or still open at exit: never hang, never leave a worker.
** Queued tasks are cancelled and running ones interrupted. */
static int pool_gc(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p) {
    lp_pool *p = u->p;
    stop_counts c = {0, 0};
    /* Shut down with wait = false: its work still runs to the end. */
    int was_open = !p->closing;
    int stuck = p->drain ? pool_stop(p, 1, 0, 0, NULL) : pool_stop(p, 1, 1, 1, &c);
    if (was_open && (c.cancelled || c.interrupted)) {
      fprintf(stderr,
              "luapool: pool '%s' was collected while still open: %zu queued task%s "
              "cancelled, %zu running task%s interrupted (close it, or call shutdown(), "
              "to wait for its work)\n",
              p->name, c.cancelled, c.cancelled == 1 ? "" : "s", c.interrupted,
              c.interrupted == 1 ? "" : "s");
      fflush(stderr);
    }
    if (stuck) { /* the pool stays allocated: its stuck threads use it */
      fprintf(stderr,
              "luapool: %d worker thread(s) of pool '%s' did not stop within %g "
              "seconds and were left running\n",
              stuck, u->p->name, STOP_GRACE);
      live_remove(u->p);
    } else {
      pool_free(u->p);
    }
    u->p = NULL;
  }
  return 0;
}

static int pool_tostring(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p == NULL)
    lua_pushliteral(L, "luapool.pool (closed)");
  else
    lua_pushfstring(L, "%s '%s' (%d workers max)%s", u->p->be->kind, u->p->name, u->p->max_workers,
                    u->p->closing ? " (shut down)" : "");
  return 1;
}

/* __index: a method (one raw lookup in the methods table, the upvalue),
** else one of the pool's read-only fields. */
static int pool_index(lua_State *L) {
  lua_settop(L, 2);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
  lp_pool *p = luapool__check_pool(L, 1);
  const char *k = lua_tostring(L, 2);
  if (k == NULL) k = ""; /* no such field */
  if (strcmp(k, "max_workers") == 0)
    lua_pushinteger(L, p->max_workers);
  else if (strcmp(k, "name") == 0)
    lua_pushstring(L, p->name);
  else if (strcmp(k, "task_timeout") == 0 && p->task_timeout > 0)
    lua_pushnumber(L, p->task_timeout);
  else if (strcmp(k, "kind") == 0)
    lua_pushstring(L, p->be->kind);
  else if (strcmp(k, "chunking") == 0)
    lua_pushboolean(L, p->be->chunking);
  else
    lua_pushnil(L);
  return 1;
}

/* map, starmap and imap are added by the Lua layer. */
static const luaL_Reg pool_methods[] = {
    {"submit", pool_submit}, {"shutdown", pool_shutdown}, {"stats", pool_stats}, {NULL, NULL}};

static int pool_owes(lp_pool *p) { return atomic_load_explicit(&p->ncb, memory_order_acquire); }

static const lp_pool_face pool_face = {.owes = pool_owes,
                                       .poll = luapool__pool_poll,
                                       .watch = luapool__pool_watch,
                                       .to_pool = luapool__to_pool};

void luapool__pool_open(lua_State *L) {
  luapool__future_set_pool_face(&pool_face);
  if (luaL_newmetatable(L, LUAPOOL_POOL_MT)) {
    luaL_newlib(L, pool_methods);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "methods"); /* for the Lua layer to extend */
    lua_pushcclosure(L, pool_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, pool_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, pool_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, pool_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}

/* }====================================================== */
