/*
** Thread backend: each worker is a pthread that owns one lua_State, created
** on its first Lua task and kept for all later ones.  Kernel calls with
** scalar arguments never create the state at all (worker.c).  Nothing but
** this thread ever touches its state.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>

#include "luapool.h"

typedef struct tworker {
  lp_worker w; /* must be first: the executor sees an lp_worker */
  lp_wstate ws;
  lp_buf out;
  int initialized;
} tworker;

static int thread_start(lp_worker *w) {
  tworker *t = (tworker *)w;
  luapool__stop_signal_install();
  t->ws.kind = "thread";
  snprintf(t->ws.name, sizeof t->ws.name, "%s", w->name);
  t->ws.index = w->index;
  t->ws.intr = &w->intr;
  t->ws.path = w->pool->path;
  t->ws.cpath = w->pool->cpath;
  return 0;
}

/* Runs the pool's initializer once, before the worker's first task.
** Returns 0, or -1 after breaking the pool and failing f. */
static int thread_init(tworker *t, lp_future *f) {
  lp_pool *p = t->w.pool;
  t->initialized = 1;
  if (p->init_msg == NULL) return 0;
  char why[768], err[600];
  t->out.len = 0;
  if (luapool__run_message(&t->ws, p->init_msg, p->init_len, &t->out) != 0)
    snprintf(err, sizeof err, "not enough memory");
  else if (luapool__reply_failed(t->out.p, t->out.len, err, sizeof err) == 0)
    return 0;
  snprintf(why, sizeof why, "the initializer failed in worker %s: %s", t->w.name, err);
  luapool__future_fail(f, LP_EK_BROKEN, "%s", why);
  luapool__pool_break(p, why);
  return -1;
}

static void thread_run(lp_worker *w, lp_future *f) {
  tworker *t = (tworker *)w;
  char label[48]; /* for reports */
  if (!t->initialized && thread_init(t, f) != 0) return;
  t->out.len = 0;
  uint64_t seq = atomic_load(&w->intr.seq);
  t->ws.deadline = f->timeout > 0 ? luapool__now() + f->timeout : 0;
  int st = luapool__run_message(&t->ws, f->msg, f->msglen, &t->out);
  /* Past its deadline (stopped by the watchdog, or finished too late):
  ** the outcome is the timeout, whatever the task produced meanwhile. */
  int stopped = atomic_load(&w->intr.kill_seq) == seq;
  if (stopped && atomic_load(&w->intr.reason) == LP_STOP_SIGNAL) {
    luapool__future_fail(f, LP_EK_INTERRUPTED, "%s was interrupted in worker %s",
                         luapool__future_label(f, label, sizeof label), w->name);
    return;
  }
  if (f->timeout > 0 && (stopped || luapool__now() >= t->ws.deadline)) {
    luapool__future_fail(f, LP_EK_TIMEOUT, "%s exceeded its deadline of %g seconds in worker %s",
                         luapool__future_label(f, label, sizeof label), f->timeout, w->name);
    return;
  }
  if (st != 0) {
    luapool__future_fail(f, LP_EK_TRANSFER, "worker %s ran out of memory building the reply",
                         w->name);
    return;
  }
  /* A small reply is copied so the buffer keeps its capacity for the next
  ** task; a large one is handed over, so no worker holds on to its size. */
  if (t->out.len <= 65536) {
    luapool__future_finish(f, t->out.p, t->out.len, 1);
  } else {
    size_t len;
    char *reply = luapool__buf_take(&t->out, &len);
    luapool__future_finish(f, reply, len, 0);
  }
}

/* From another thread: makes the running Lua code notice the stop (the
** interrupt block says which).  Called only while the thread is not joined. */
static void thread_interrupt(lp_worker *w) { pthread_kill(w->thread, LUAPOOL_STOP_SIGNAL); }

static void thread_stop(lp_worker *w) {
  tworker *t = (tworker *)w;
  luapool__set_task_state(NULL);
  luapool__wstate_close(&t->ws);
  luapool__buf_free(&t->out);
  luapool__http_thread_cleanup();
}

const lp_backend luapool__thread_backend = {
    .kind = "threadpool",
    .worker_size = sizeof(tworker),
    .watchdog = 1,
    .worker_start = thread_start,
    .run = thread_run,
    .worker_stop = thread_stop,
    .interrupt = thread_interrupt,
    .chunking = 0,
};
