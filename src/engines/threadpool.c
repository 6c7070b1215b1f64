/*
** Thread backend: each worker is a pthread that owns one lua_State, created
** on its first Lua task and kept for all later ones.  Kernel calls with
** scalar arguments never create the state at all (worker.c).  Nothing but
** this thread ever touches its state.  Its replies refer to its big result
** strings instead of copying them (pins: worker.h, core/future.h); the
** owner reads those bytes, never the state.
*/
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>

#include "base/buf.h"
#include "engines/engines.h"
#include "core/workers.h"
#include "core/future.h"
#include "kernels/kernel.h" /* luapool__http_thread_cleanup */
#include "base/stop.h"
#include "base/util.h"
#include "worker/worker.h"
#include "worker/wstate.h"

typedef struct tworker {
  lp_worker w; /* must be first: the executor sees an lp_worker */
  lp_wstate ws;
  lp_wpins pins; /* ws.pins: its replies refer to its big strings */
  lp_wbig big;   /* ws.big: its state's big blocks */
  lp_buf out;
  int initialized;
  lp_paths *paths; /* the paths ws has (a reference), NULL before the first task */
} tworker;

/* A call with a deadline starts: the watchdog learns its deadline and
** number (the stop it sends then hits this call and no other). */
static void thread_call_start(lp_wstate *ws, uint32_t call) {
  (void)call;
  tworker *t = (tworker *)((char *)ws - offsetof(tworker, ws));
  luapool__worker_deadline(&t->w, ws->deadline);
}

/* Runs msg with every call under its own deadline of `timeout` seconds
** (0: none), labelled after f. */
static int run_timed(tworker *t, const char *msg, size_t len, double timeout, uint64_t task_no,
                     int64_t item_lo) {
  t->ws.call_timeout = timeout;
  t->ws.task_no = task_no;
  t->ws.item_lo = item_lo;
  t->ws.deadline = 0;
  t->out.len = 0;
  luapool__pins_sweep(&t->ws); /* what the owner is done with */
  int st = luapool__run_message(&t->ws, msg, len, &t->out);
  if (timeout > 0) luapool__worker_deadline(&t->w, 0); /* the watchdog skips 0 */
  t->ws.deadline = 0;
  return st;
}

static int thread_start(lp_worker *w) {
  tworker *t = (tworker *)w;
  luapool__stop_signal_install();
  t->ws.kind = "thread";
  snprintf(t->ws.name, sizeof t->ws.name, "%s", w->name);
  t->ws.index = w->index;
  t->ws.intr = &w->intr;
  t->ws.call_start = thread_call_start;
  t->ws.pins = &t->pins;
  t->pins.reads = &w->pool->pace_reads;
  t->ws.big = &t->big;
  return 0;
}

/* Runs the pool's initializer once, before the worker's first task.
** Returns 0, or -1 after breaking the pool and failing f (or failing f as
** interrupted, when a stop cut the initializer short). */
static int thread_init(tworker *t, lp_future *f) {
  lp_pool *p = t->w.pool;
  t->initialized = 1;
  if (p->init_msg == NULL) return 0;
  char why[768], err[600];
  /* under the first task's deadline, as on a process pool (labelled 0/0:
  ** "it exceeded its deadline") */
  int st = run_timed(t, p->init_msg, p->init_len, f->timeout, 0, 0);
  luapool__pins_drop(&t->ws); /* (the reply is only read here) */
  if (st != 0)
    snprintf(err, sizeof err, "not enough memory");
  else if (luapool__reply_failed(t->out.p, t->out.len, err, sizeof err) == 0)
    return 0;
  else if (luapool__stopped_whole(&t->w.intr)) {
    /* Ctrl-C or a closing stop, not an initializer that failed: the pool
    ** is not broken, and the next task runs the initializer again. */
    char label[48];
    t->initialized = 0;
    luapool__future_fail(f, LP_EK_INTERRUPTED,
                         "%s was interrupted in worker %s, in the pool's initializer",
                         luapool__future_label(f, label, sizeof label), t->w.name);
    return -1;
  }
  snprintf(why, sizeof why, "the initializer failed in worker %s: %s", t->w.name, err);
  luapool__future_fail(f, LP_EK_BROKEN, "%s", why);
  luapool__pool_break(p, why);
  return -1;
}

/* Gives the worker's state the paths f was submitted with. */
static int use_paths(tworker *t, lp_future *f) {
  if (f->paths == t->paths || f->paths == NULL) return 0;
  if (luapool__wstate_set_paths(&t->ws, f->paths->path, f->paths->cpath) != 0) {
    luapool__future_fail(f, LP_EK_TRANSFER, "worker %s ran out of memory setting package.path",
                         t->w.name);
    return -1;
  }
  luapool__paths_ref(f->paths);
  luapool__paths_unref(t->paths);
  t->paths = f->paths;
  return 0;
}

static void thread_run(lp_worker *w, lp_future *f) {
  tworker *t = (tworker *)w;
  char label[48]; /* for reports */
  if (use_paths(t, f) != 0) return;
  if (!t->initialized && thread_init(t, f) != 0) return;
  /* Each call keeps its own deadline: one past it (stopped by the
  ** watchdog, or finished too late) replies TIMEOUT, whatever it produced
  ** meanwhile, and the chunk's other calls go on (worker.c). */
  int st = run_timed(t, f->msg, f->msglen, f->timeout, f->task_no, f->item_lo);
  /* Ctrl-C stops the whole task: the calls after the stopped one did not
  ** run. */
  if (luapool__signal_stopped(&w->intr)) {
    luapool__pins_drop(&t->ws);
    luapool__future_fail(f, LP_EK_INTERRUPTED, "%s was interrupted in worker %s",
                         luapool__future_label(f, label, sizeof label), w->name);
    return;
  }
  if (st != 0) luapool__pins_drop(&t->ws);
  int pinned = st == 0 ? luapool__pins_seal(&t->ws, &t->out) : 0;
  if (st != 0 || pinned < 0) {
    luapool__future_fail(f, LP_EK_TRANSFER, "worker %s ran out of memory building the reply",
                         w->name);
    return;
  }
  /* A small reply is copied so the buffer keeps its capacity for the next
  ** task; a large one is handed over, so no worker holds on to its size.
  ** (A reply that refers to its big strings is small.) */
  void (*finish)(lp_future *, char *, size_t, int) =
      pinned ? luapool__future_finish_pinned : luapool__future_finish;
  if (t->out.len <= 65536) {
    finish(f, t->out.p, t->out.len, 1);
  } else {
    size_t len;
    char *reply = luapool__buf_take(&t->out, &len);
    finish(f, reply, len, 0);
  }
}

/* Pacing (core/future.h).  A worker whose results the owner has not read
** yet hold PACE_HELD bytes or more of its strings waits before its next
** task while the owner is reading results (it read one in the last
** PACE_QUIET seconds), waking at each read to look again.  On two cores,
** two workers that ran up to 40 results ahead made each of the owner's
** copies come from memory no cache held, on a CPU the workers took, and
** faulted in fresh huge pages for the backlog: two workers were slower
** than one (docs/performance.md, session 26: 143-163 us a 1 MiB string
** paced, 218-239 not).  It goes on when the owner stops reading
** (PACE_QUIET without a read: 0.5 ms was too short, a descheduled owner
** leaves gaps of a millisecond), blocks on a future no worker runs (it
** may be this one's next: future.c, pace_block), a pool stops, its task
** is stopped, and after
** PACE_MAX in any case, so no script can stall a pool: only results it
** reads slowly slow it. */
#define PACE_HELD  ((size_t)8 << 20)
#define PACE_QUIET 0.002
#define PACE_MAX   0.05

static void thread_pace(lp_worker *w) {
  tworker *t = (tworker *)w;
  double start = 0;
  while (t->pins.live) {
    lp_pace_mark m;
    luapool__pace_mark(t->pins.reads, &m); /* before the look: a read after it ends the wait */
    if (luapool__pins_sweep(&t->ws) < PACE_HELD || luapool__interrupted(&w->intr)) return;
    double now = luapool__now(), until = luapool__pace_last(t->pins.reads) + PACE_QUIET;
    if (start == 0) start = now;
    if (until > start + PACE_MAX) until = start + PACE_MAX;
    if (now >= until || !luapool__pace_wait(t->pins.reads, &m, until)) return;
  }
}

/* From another thread: makes the running Lua code notice the stop (the
** interrupt block says which).  Called only while the thread is not joined. */
static void thread_interrupt(lp_worker *w) { pthread_kill(w->thread, LUAPOOL_STOP_SIGNAL); }

static void thread_stop(lp_worker *w) {
  tworker *t = (tworker *)w;
  luapool__set_task_state(NULL);
  luapool__pins_close(&t->ws); /* (closes the state) */
  luapool__paths_unref(t->paths);
  t->paths = NULL;
  luapool__buf_free(&t->out);
  luapool__http_thread_cleanup();
}

/* I/O-bound tasks are the common case for threads: a few more than the
** CPUs, as concurrent.futures does, up to 32. */
static int thread_default_workers(int ncpu) { return ncpu + 4 < 32 ? ncpu + 4 : 32; }

static const lp_worker_ops thread_ops = {
    .worker_size = sizeof(tworker),
    .watchdog = 1,
    .start = thread_start,
    .run = thread_run,
    .pace = thread_pace,
    .stop = thread_stop,
    .interrupt = thread_interrupt,
};

const lp_engine luapool__thread_engine = {
    .kind = "threadpool",
    .foreign_note = "threads share one process",
    .default_workers = thread_default_workers,
    .chunking = 0,
    LP_WORKER_SET(&thread_ops),
};
