/*
** iopool: an event-loop engine.  Each of max_workers loop threads owns one
** libcurl multi handle (kernels/httploop.c, made with its first task that
** needs it) and one Lua state, and runs many tasks at once:
**   - a Lua task runs as a coroutine of the loop's state (worker.c's
**     lp_cotask).  luapool.sleep waits on a timer of the loop
**     (wstate.h's luapool__io_await_timer); luapool.http.request/get and
**     kernels.fetch_length called from Lua yield their request to the loop
**     (httploop.h's yield marker), which adds it to its multi handle; the
**     loop resumes the coroutine when the timer fired or the request
**     ended.  A plain coroutine.yield() in the task lets the others run;
**   - a fetch_length task (pool:map(luapool.kernels.fetch_length, urls))
**     runs straight on the multi handle from the message's bytes: no Lua
**     state, no coroutine;
**   - any other kernel runs inline on the loop thread (it is CPU work).
** Anything else that blocks (a blocking C call, a long CPU loop) blocks the
** whole loop.  A task's deadline is a timer too: a task waiting past it is
** resumed with the count hook set, which stops its call (TIMEOUT, as on a
** thread worker, a map chunk's next calls still run); a coroutine that
** hogs the loop meets the same hook every 1000 instructions.
**
** Admission: at most `concurrency` tasks are in flight in the whole pool
** (es->inflight, under p->mu), each loop taking at most its share; the
** rest wait in the pool core's queue.  A submit wakes the loop with the
** least work (starting a new one, up to max_workers, when every started
** loop has some), and a loop with room takes from the queue at the top of
** each turn.  Connections per host:port and in total are the httploop's
** admission (per_host, max_connections: with more than one loop, counted
** across them by an lp_hshare), retries its timers.
**
** Locks: p->mu guards the queue, es->inflight and each loop's n, wanted
** and room; lp->mu (after p->mu: engine.h) guards woken and publishes
** lp->hl to wakers.  Everything else of a loop is its thread's.  Stops
** reach a loop through atomics it reads every turn (intr_gen for Ctrl-C,
** closing_intr for a closing stop, cancel_pending for f:cancel()) plus a
** wake-up, and through STOP_SIGNAL for the coroutine running at that
** moment (its hook yields it back to the loop, which ends it).
*/
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/stop.h"
#include "base/util.h"
#include "codec/codec.h"
#include "codec/message.h"
#include "core/future.h"
#include "core/pool.h"
#include "engines/engines.h"
#include "kernels/httploop.h"
#include "kernels/kernel.h"
#include "worker/worker.h"
#include "worker/wstate.h"

/* {====== options */

typedef struct io_config {
  int concurrency;     /* tasks in flight in the whole pool */
  int per_host;        /* connections per host:port; 0: no limit */
  int max_connections; /* connections in all; 0: no limit */
  int retries;         /* fetch_length tasks: retries of transport failures */
} io_config;

static void io_config_defaults(void *config) {
  io_config *c = config;
  c->concurrency = 1000;
}

static const lp_option io_options[] = {
    {.name = "concurrency",
     .type = LP_OPT_INT,
     .min = 1,
     .max = 1000000,
     .offset = offsetof(io_config, concurrency)},
    {.name = "per_host",
     .type = LP_OPT_INT,
     .min = 0,
     .max = 1000000,
     .offset = offsetof(io_config, per_host)},
    {.name = "max_connections",
     .type = LP_OPT_INT,
     .min = 0,
     .max = 1000000,
     .offset = offsetof(io_config, max_connections)},
    {.name = "retries",
     .type = LP_OPT_INT,
     .min = 0,
     .max = 100,
     .offset = offsetof(io_config, retries)},
    {.name = NULL},
};

/* }====== */

typedef struct ioloop ioloop;
typedef struct io_task io_task;

/* A timer of a task in its loop's min-heap (idx -1: not in it). */
typedef struct io_timer {
  double when;
  io_task *t;
  int idx;
} io_timer;

/* Why a task is ended from outside (kill). */
/* (A deadline does not kill: the task resumes and its call is stopped,
** task_deadline.) */
enum { K_NONE, K_CANCEL, K_INTR, K_CLOSE };
/* What a parked task waits for. */
enum { W_NONE, W_TIMER, W_REQ };

#define NATIVE_MAX 4096 /* fetch_length calls a native task may batch */

/* One fetch_length call of a native task. */
typedef struct io_ncall {
  io_task *t;
  lp_hreq *r;
  char *url;
  double timeout; /* its own timeout argument, seconds; 0: none */
  int done;
  int bad_arg; /* refused: the position of its first argument past the two it takes */
} io_ncall;

struct io_task {
  lp_future *f; /* a reference */
  ioloop *lp;
  lp_cotask *co; /* a Lua task; NULL for a native one */
  int wait;      /* W_* (Lua tasks) */
  /* intr_gen when it was taken: a Ctrl-C stops the tasks of earlier
  ** generations only (against lp->intr_seen, which moves at the stops
  ** pass, a task taken after a caught Ctrl-C but before that pass ended
  ** interrupted: helper-51) */
  unsigned gen;
  lp_hreq *req; /* W_REQ: the request it waits for (its caller's) */
  io_timer tw;  /* W_TIMER: the sleep's end */
  io_timer td;  /* the running call's deadline */
  int kill;     /* K_*: end it at the next turn without resuming it */
  int queued;   /* on the ready list */
  io_task *rnext;
  io_task *prev, *next; /* the loop's tasks */
  /* native fetch_length calls */
  io_ncall *calls;
  uint32_t ncalls, nleft;
};

typedef struct iopool {
  ioloop **loops; /* [max_workers] */
  int nloops;     /* started (owner, under p->mu) */
  int inflight;   /* tasks taken from the queue, not ended (p->mu) */
  int nalive;     /* loop threads not yet exited (p->mu) */
  io_config cfg;
  lp_hshare *share; /* per_host, max_connections across the loops (NULL: one loop, or none) */
} iopool;

struct ioloop {
  lp_pool *p;
  iopool *io;
  int index;
  char name[64];
  pthread_t thread;
  int joined; /* p->mu; the owner alone writes it */
  lp_wstate ws;
  lp_interrupt intr;
  /* p->mu */
  int n;      /* its tasks in flight */
  int wanted; /* tasks submitted since it last took: it will take them */
  int cap;    /* its share of concurrency */
  /* lp->mu */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int woken;
  lp_hloop *hl; /* made on the first request; written under mu */
  atomic_int cancel_pending;
  atomic_int cancel_all; /* a cancelling stop: every task in flight ends cancelled */
  /* The loop thread runs a message to its end (run_inline: the
  ** initializer, a kernel), where no pass of the loop sees cancel_all: a
  ** cancelling stop stops that run itself, and says so in inline_cancel. */
  atomic_int inline_run, inline_cancel;
  /* The future the inline run is for (a kernel's task, or the task the
  ** initializer runs for), or NULL: f:cancel() of it stops the run too. */
  _Atomic(lp_future *) inline_f;
  atomic_uint intr_gen;
  atomic_int closing_intr;
  /* the loop thread's own */
  unsigned intr_seen;
  io_task *tasks;
  int ntasks;
  io_task *rhead, *rtail; /* ready to resume (or to end) */
  io_timer **heap;
  size_t nheap, capheap;
  io_task *cur;  /* the task being resumed */
  int room;      /* a task ended while others were queued (p->mu) */
  int in_run;    /* inside luapool__hloop_run (loop_wait) */
  int ending;    /* inside end_now */
  int hl_failed; /* the multi could not be made (no libcurl...) */
  int initialized;
  lp_paths *paths;
  lp_buf out; /* replies of inline runs */
};

static ioloop *loop_of_ws(lp_wstate *ws) { return (ioloop *)((char *)ws - offsetof(ioloop, ws)); }

/* {====== waking a loop */

/* Any thread (may hold p->mu). */
static void loop_wake(ioloop *lp) {
  pthread_mutex_lock(&lp->mu);
  lp->woken = 1;
  if (lp->hl)
    luapool__hloop_wakeup(lp->hl);
  else
    pthread_cond_signal(&lp->cv);
  pthread_mutex_unlock(&lp->mu);
}

/* The loop thread: runs transfers and waits up to max_wait seconds for
** something to do (a request ending, a wake-up). */
static void loop_wait(ioloop *lp, double max_wait) {
  pthread_mutex_lock(&lp->mu);
  if (lp->woken) max_wait = 0;
  lp->woken = 0;
  if (lp->hl == NULL && max_wait > 0) {
    double until = luapool__now() + max_wait;
    struct timespec ts;
    ts.tv_sec = (time_t)until;
    ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
    pthread_cond_timedwait(&lp->cv, &lp->mu, &ts);
    lp->woken = 0;
  }
  pthread_mutex_unlock(&lp->mu);
  if (lp->hl) {
    lp->in_run = 1;
    luapool__hloop_run(lp->hl, max_wait);
    lp->in_run = 0;
  }
}

/* }====== */

/* {====== timers: a min-heap of io_timer pointers */

static void heap_set(ioloop *lp, size_t i, io_timer *tm) {
  lp->heap[i] = tm;
  tm->idx = (int)i;
}

static void heap_up(ioloop *lp, size_t i) {
  io_timer *tm = lp->heap[i];
  while (i > 0 && lp->heap[(i - 1) / 2]->when > tm->when) {
    heap_set(lp, i, lp->heap[(i - 1) / 2]);
    i = (i - 1) / 2;
  }
  heap_set(lp, i, tm);
}

static void heap_down(ioloop *lp, size_t i) {
  io_timer *tm = lp->heap[i];
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= lp->nheap) break;
    if (c + 1 < lp->nheap && lp->heap[c + 1]->when < lp->heap[c]->when) c++;
    if (lp->heap[c]->when >= tm->when) break;
    heap_set(lp, i, lp->heap[c]);
    i = c;
  }
  heap_set(lp, i, tm);
}

static void timer_stop(ioloop *lp, io_timer *tm) {
  if (tm->idx < 0) return;
  size_t i = (size_t)tm->idx;
  tm->idx = -1;
  io_timer *last = lp->heap[--lp->nheap];
  if (i == lp->nheap) return;
  heap_set(lp, i, last);
  heap_up(lp, i);
  heap_down(lp, (size_t)last->idx);
}

/* Room was reserved when the task was taken (two timers per task). */
static void timer_start(ioloop *lp, io_timer *tm, double when) {
  timer_stop(lp, tm);
  tm->when = when;
  size_t i = lp->nheap++;
  heap_set(lp, i, tm);
  heap_up(lp, i);
}

/* }====== */

/* {====== tasks */

static void ready(ioloop *lp, io_task *t) {
  if (t->queued) return;
  t->queued = 1;
  t->rnext = NULL;
  if (lp->rtail)
    lp->rtail->rnext = t;
  else
    lp->rhead = t;
  lp->rtail = t;
}

static void on_req_done(lp_hreq *r, void *ud) {
  io_task *t = ud;
  (void)r;
  t->wait = W_NONE;
  t->req = NULL;
  ready(t->lp, t);
}

static void end_now(ioloop *lp, io_task *t);
static void on_native_done(lp_hreq *r, void *ud) {
  io_ncall *c = ud;
  io_task *t = c->t;
  ioloop *lp = t->lp;
  (void)r;
  c->done = 1;
  if (--t->nleft != 0) return;
  /* Answered inside the loop's run: settled and replaced at once, so the
  ** next queued task's request goes out in this same pass (the httploop
  ** sends what a callback adds).  Anything else (an abort, a kill) waits
  ** for run_ready, as the Lua tasks do. */
  if (lp->in_run && !lp->ending && !t->kill && !t->queued)
    end_now(lp, t);
  else
    ready(lp, t);
}

/* Ends t's waits: its timers, its requests (their callbacks run now). */
static void task_unwait(ioloop *lp, io_task *t, const char *why) {
  timer_stop(lp, &t->tw);
  timer_stop(lp, &t->td);
  if (t->wait == W_REQ && t->req) luapool__hloop_abort(lp->hl, t->req, why);
  t->wait = W_NONE;
  for (uint32_t i = 0; i < t->ncalls; i++)
    if (t->calls[i].r && !t->calls[i].done) luapool__hloop_abort(lp->hl, t->calls[i].r, why);
}

/* t is to end without running on (cancel, deadline, Ctrl-C, closing). */
static void task_kill(ioloop *lp, io_task *t, int how) {
  if (t->kill) return;
  t->kill = how;
  task_unwait(lp, t, "interrupted");
  ready(lp, t);
}

/* The running call of t, parked, passed its deadline: its wait ends and
** it resumes with the hook set to stop the call (io_hook). */
static void io_hook(lua_State *L, lua_Debug *ar);
static void task_deadline(ioloop *lp, io_task *t) {
  if (t->co == NULL || t->kill) return;
  timer_stop(lp, &t->tw);
  if (t->wait == W_REQ && t->req) luapool__hloop_abort(lp->hl, t->req, "deadline");
  t->wait = W_NONE;
  lua_sethook(luapool__co_thread(t->co), io_hook, LUA_MASKCOUNT, 1);
  ready(lp, t);
}

/* A task of the loop's has ended (or was dropped before it began): its
** place goes back.  The loop looks at the queue again at once, not after
** its next wait, when tasks are queued, and when the pool closes: the
** pass that ended the last one had already found the loop busy, and the
** owner's wake-up was spent, so the close waited a whole second more
** (helper-49: 1.20 s for a 0.2 s task). */
static void task_gone(ioloop *lp) {
  lp_pool *p = lp->p;
  pthread_mutex_lock(&p->mu);
  lp->io->inflight--;
  lp->n--;
  if (p->head || p->closing) lp->room = 1;
  pthread_mutex_unlock(&p->mu);
}

/* Frees an ended task and gives its place back. */
static void task_free(ioloop *lp, io_task *t) {
  task_unwait(lp, t, "interrupted");
  if (t->prev)
    t->prev->next = t->next;
  else
    lp->tasks = t->next;
  if (t->next) t->next->prev = t->prev;
  lp->ntasks--;
  luapool__co_free(t->co);
  for (uint32_t i = 0; i < t->ncalls; i++) {
    luapool__hreq_free(t->calls[i].r);
    lp_free(t->calls[i].url);
  }
  lp_free(t->calls);
  luapool__future_unref(t->f);
  lp_free(t);
  task_gone(lp);
}

/* Settles a task that ended with a reply in hand (or none: out of memory). */
static void finish_reply(ioloop *lp, io_task *t, char *reply, size_t len) {
  if (reply == NULL)
    luapool__future_fail(t->f, LP_EK_TRANSFER, "worker %s ran out of memory building the reply",
                         lp->name);
  else
    luapool__future_finish(t->f, reply, len, 0);
}

static void end_killed_co(ioloop *lp, io_task *t) {
  char label[48];
  size_t len;
  switch (t->kill) {
    case K_CANCEL: break; /* cancelled already (io_cancel) */
    case K_INTR:
      luapool__future_fail(t->f, LP_EK_INTERRUPTED, "%s was interrupted in worker %s",
                           luapool__future_label(t->f, label, sizeof label), lp->name);
      break;
    case K_CLOSE:
      if (luapool__co_end(t->co, "interrupted: the pool was closed") != 0)
        finish_reply(lp, t, NULL, 0);
      else {
        len = 0;
        char *reply = luapool__co_reply(t->co, &len);
        finish_reply(lp, t, reply, len);
      }
      break;
  }
}

static int use_paths(ioloop *lp, lp_future *f);
static lp_hloop *make_hloop(void *ud);

/* Runs a ready Lua task until it parks or ends. */
static void run_co(ioloop *lp, io_task *t) {
  size_t len;
  /* STOP_SIGNAL acts on the coroutine set here: one sent before (while no
  ** coroutine ran, so it acted on nothing) was sent after its flag was
  ** set, and the flag is read after this, before the resume, so a task
  ** that would hog the loop never runs past a stop. */
  lp->cur = t;
  luapool__set_task_state(t->co ? luapool__co_thread(t->co) : NULL);
  if (!t->kill && atomic_load(&lp->closing_intr))
    t->kill = K_CLOSE;
  else if (!t->kill && atomic_load(&lp->cancel_all) && luapool__future_cancel_running(t->f))
    t->kill = K_CANCEL;
  if (t->kill || use_paths(lp, t->f) != 0) { /* (use_paths: the paths it was submitted with) */
    luapool__set_task_state(NULL);
    lp->cur = NULL;
    if (t->kill) end_killed_co(lp, t);
    task_free(lp, t);
    return;
  }
  /* http.request/get yield to the loop's HTTP loop, made (and libcurl
  ** loaded) at the first request of any task of the loop */
  luapool__http_set_thread_loop(lp->hl);
  luapool__http_set_thread_loop_maker(lp->hl_failed ? NULL : make_hloop, lp);
  void *yielded[2];
  int st = luapool__co_resume(t->co, yielded);
  luapool__http_set_thread_loop(NULL); /* (an inline run's requests block) */
  luapool__http_set_thread_loop_maker(NULL, NULL);
  luapool__set_task_state(NULL);
  lp->cur = NULL;
  if (st == LP_CO_YIELD && yielded[0] == &luapool__http_yield_marker && !t->kill) {
    /* http.request/get made a request for the loop (httploop.h) */
    t->wait = W_REQ;
    t->req = yielded[1];
    luapool__hloop_add(lp->hl, t->req, on_req_done, t);
    return;
  }
  if (st == LP_CO_DONE && atomic_load(&lp->intr_gen) != t->gen)
    t->kill = K_INTR; /* Ctrl-C raised in it where it could not yield */
  if (st == LP_CO_YIELD) {
    if (t->kill) { /* stopped by its hook */
      end_killed_co(lp, t);
      task_free(lp, t);
    } else if (t->wait == W_NONE) {
      ready(lp, t); /* the task's own coroutine.yield(): it lets others run */
    }
    return;
  }
  if (t->kill) {
    end_killed_co(lp, t);
  } else {
    len = 0;
    char *reply = st == LP_CO_DONE ? luapool__co_reply(t->co, &len) : NULL;
    finish_reply(lp, t, reply, len);
  }
  task_free(lp, t);
}

/* }====== */

/* {====== native fetch_length tasks */

/* The fetch_length calls of msg, when every call of it is one with
** scalar arguments: their URLs (copied) and timeouts.  1 yes (t->calls
** filled), 0 not such a task, -1 no memory. */
static int native_calls(io_task *t, const char *msg, size_t len) {
  lp_reader r = {msg, msg + len};
  unsigned kind;
  uint32_t ncalls = 1, n;
  if (luapool__get_u8(&r, &kind)) return 0;
  if (kind == LP_MSG_BATCH) {
    if (luapool__get_u32(&r, &ncalls) || ncalls < 1 || ncalls > NATIVE_MAX) return 0;
  } else if (kind != LP_MSG_SINGLE) {
    return 0;
  }
  lp_reader fr = r;
  if (kind == LP_MSG_SINGLE && luapool__get_u32(&fr, &n)) return 0;
  int k = luapool__peek_kernel(&fr);
  if (k < 0 || strcmp(luapool__kernels[k].name, "fetch_length") != 0) return 0;
  io_ncall *calls = lp_calloc(ncalls, sizeof *calls);
  if (calls == NULL) return -1;
  if (kind == LP_MSG_BATCH) r = fr; /* after the function */
  for (uint32_t i = 0; i < ncalls; i++) {
    lp_value a[2];
    if (luapool__get_u32(&r, &n)) goto no;
    if (kind == LP_MSG_SINGLE) { /* n counts the function */
      if (n < 1) goto no;
      n--;
      r = fr;
    }
    if (n < 1) goto no;
    for (uint32_t j = 0; j < n && j < 2; j++)
      if (luapool__get_scalar(&r, &a[j]) != 1) goto no;
    if (a[0].type != LP_STR || memchr(a[0].u.s.p, '\0', a[0].u.s.len)) goto no;
    double timeout = 0;
    if (n >= 2) {
      if (a[1].type == LP_INT)
        timeout = (double)a[1].u.i;
      else if (a[1].type == LP_NUM)
        timeout = a[1].u.n;
      else if (a[1].type != LP_NIL)
        goto no;
      if (a[1].type != LP_NIL && !(timeout > 0)) goto no; /* the kernel's own message */
    }
    /* More arguments than fetch_length takes: refused (a trailing nil is
    ** none), not run inline, where the transfer would block the loop.  A
    ** table or function there cannot be stepped over to the next call of
    ** a batch: that batch runs inline (the kernel's Lua face decides). */
    for (uint32_t j = 2; j < n && calls[i].bad_arg == 0; j++) {
      lp_value x;
      int sc = luapool__get_scalar(&r, &x);
      if (sc < 0 || (sc == 0 && kind == LP_MSG_BATCH)) goto no;
      if (sc == 0 || x.type != LP_NIL) calls[i].bad_arg = (int)j + 1;
    }
    if (calls[i].bad_arg && kind == LP_MSG_BATCH)
      for (uint32_t j = (uint32_t)calls[i].bad_arg; j < n; j++) { /* to the next call */
        lp_value x;
        if (luapool__get_scalar(&r, &x) != 1) goto no;
      }
    calls[i].t = t;
    calls[i].timeout = timeout;
    if ((calls[i].url = lp_malloc(a[0].u.s.len + 1)) == NULL) {
      for (uint32_t j = 0; j <= i; j++)
        lp_free(calls[j].url);
      lp_free(calls);
      return -1;
    }
    memcpy(calls[i].url, a[0].u.s.p, a[0].u.s.len);
    calls[i].url[a[0].u.s.len] = '\0';
  }
  t->calls = calls;
  t->ncalls = ncalls;
  return 1;
no:
  for (uint32_t j = 0; j < ncalls; j++)
    lp_free(calls[j].url);
  lp_free(calls);
  return 0;
}

static lp_hloop *loop_hloop(ioloop *lp, char *err, size_t errsz);

/* Adds the task's requests to the loop's multi handle. */
static int start_native(ioloop *lp, io_task *t) {
  char err[512];
  lp_hloop *hl = loop_hloop(lp, err, sizeof err);
  if (hl == NULL) return -1;
  double now = luapool__now();
  t->nleft = t->ncalls;
  for (uint32_t i = 0; i < t->ncalls; i++) {
    io_ncall *c = &t->calls[i];
    if (c->bad_arg) { /* refused: fails alone, in end_native */
      c->done = 1;
      t->nleft--;
      continue;
    }
    lp_hreq_opts o;
    memset(&o, 0, sizeof o);
    o.url = c->url;
    o.timeout = c->timeout;
    o.deadline = t->f->timeout > 0 ? now + t->f->timeout : 0; /* each call its own */
    o.max_redirs = LP_HMAX_REDIRS;
    o.retry_delay = -1;
    o.retries = lp->io->cfg.retries;
    o.count_only = 1;
    c->r = luapool__hreq_new(&o, err, sizeof err);
    if (c->r == NULL) { /* (no memory): it fails by itself below */
      c->done = 1;
      t->nleft--;
      continue;
    }
    luapool__hloop_add(hl, c->r, on_native_done, c);
  }
  if (t->nleft == 0) ready(lp, t);
  return 0;
}

/* Every call ended: the reply, as worker.c's native kernel calls write it. */
static void end_native(ioloop *lp, io_task *t) {
  lp_buf *out = &lp->out;
  uint32_t nerr = 0;
  char m[1024];
  char label[48];
  if (t->kill == K_CANCEL) return;
  if (t->kill == K_INTR) {
    luapool__future_fail(t->f, LP_EK_INTERRUPTED, "%s was interrupted in worker %s",
                         luapool__future_label(t->f, label, sizeof label), lp->name);
    return;
  }
  out->len = 0;
  int bad = luapool__put_u32(out, 0);
  for (uint32_t i = 0; i < t->ncalls && !bad; i++) {
    io_ncall *c = &t->calls[i];
    if (c->bad_arg) { /* as the kernel's argument errors: the message is the value */
      nerr++;
      snprintf(m, sizeof m, LP_FETCH_EXTRA_ARG, c->bad_arg);
      size_t ml = strlen(m);
      bad = luapool__put_u8(out, LP_REPLY_ERROR) || luapool__put_string(out, m, ml) ||
            luapool__put_string(out, "", 0) || luapool__put_string(out, m, ml);
      continue;
    }
    int st = c->r ? luapool__hreq_state(c->r) : LP_H_FAILED;
    if (st == LP_H_OK && t->kill != K_CLOSE) {
      uint64_t count = luapool__hreq_length(c->r);
      lp_value v[2];
      v[0].type = v[1].type = LP_INT;
      v[0].tname = v[1].tname = "number";
      v[0].u.i = count > (uint64_t)LUA_MAXINTEGER ? LUA_MAXINTEGER : (lua_Integer)count;
      v[1].u.i = luapool__hreq_status(c->r);
      bad = luapool__put_u8(out, LP_REPLY_OK) || luapool__put_u32(out, 2) ||
            luapool__put_value(out, &v[0]) || luapool__put_value(out, &v[1]);
      continue;
    }
    nerr++;
    if (st == LP_H_DEADLINE) { /* (the request's own deadline: the call's) */
      luapool__deadline_message(m, sizeof m, t->f->task_no, t->f->item_lo, i, t->f->timeout,
                                lp->name);
      bad = luapool__put_u8(out, LP_REPLY_TIMEOUT) || luapool__put_string(out, m, strlen(m));
      continue;
    }
    if (c->r == NULL)
      snprintf(m, sizeof m, "fetch_length: %s: not enough memory", c->url);
    else if (st == LP_H_ABORTED || t->kill == K_CLOSE)
      snprintf(m, sizeof m, "fetch_length: %s: interrupted", c->url);
    else
      snprintf(m, sizeof m, "fetch_length: %s: %s", c->url, luapool__hreq_error(c->r));
    size_t ml = strlen(m);
    bad = luapool__put_u8(out, LP_REPLY_ERROR) || luapool__put_string(out, m, ml) ||
          luapool__put_string(out, "", 0) || luapool__put_string(out, m, ml);
  }
  if (bad) {
    finish_reply(lp, t, NULL, 0);
    return;
  }
  memcpy(out->p, &nerr, 4);
  luapool__future_finish(t->f, out->p, out->len, 1);
}

/* }====== */

/* {====== the loop's Lua state and its hooks */

/* Has a cancelling stop (cancel_inline) reached the run on the loop
** thread itself, which no pass of the loop will see? */
static int inline_stopped(ioloop *lp) {
  return lp->cur == NULL && atomic_load(&lp->inline_run) && luapool__interrupted(&lp->intr);
}

/* The count hook of a call with a deadline, and what STOP_SIGNAL sets on
** the running coroutine: a stop that applies yields the coroutine back to
** the loop, which ends it (no pcall in the task can catch a yield); where
** it cannot yield (a metamethod, a C function), it raises, at every
** instruction, until the task's call is left. */
static void io_hook(lua_State *L, lua_Debug *ar) {
  lp_wstate *ws = luapool__state_worker(L);
  if (ws == NULL || ws->io == NULL) { /* (cannot be: only a loop's states get it) */
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  ioloop *lp = loop_of_ws(ws);
  io_task *t = lp->cur;
  if (!ws->in_call) {
    luapool__arm_interrupt_hook(L);
    return;
  }
  int kill = K_NONE;
  const char *why = NULL;
  if (ws->deadline > 0 && luapool__now() >= ws->deadline) {
    /* The call alone ends (a map chunk's next calls still run), as on a
    ** thread worker: raised at every instruction until the call is left,
    ** so no pcall in it can swallow the stop; the reply says TIMEOUT. */
    lua_sethook(L, io_hook, LUA_MASKCOUNT, 1);
    luaL_error(L, "interrupted: the task's deadline passed");
    return;
  }
  if (atomic_load(&lp->intr_gen) != (t ? t->gen : lp->intr_seen)) {
    kill = K_INTR;
    why = "interrupted: Ctrl-C";
  } else if (atomic_load(&lp->closing_intr)) {
    kill = K_CLOSE;
    why = "interrupted: the pool was closed";
  } else if ((t && ((atomic_load(&lp->cancel_all) && luapool__future_cancel_running(t->f)) ||
                    ((atomic_load(&lp->cancel_all) || atomic_load(&lp->cancel_pending)) &&
                     luapool__future_state(t->f) == LP_CANCELLED))) ||
             inline_stopped(lp)) {
    /* cancel_all: shutdown{cancel_running}; cancel_pending: f:cancel().  The
    ** hook may run more than once before the task yields (a call or return
    ** event sets the count hook, and the count event yields): a future
    ** cancelled by an earlier pass still counts.  No task: a run on the
    ** loop itself (run_inline: the initializer) that a cancelling stop
    ** reached (cancel_inline), which no pass of the loop will. */
    kill = K_CANCEL;
    why = "interrupted: the task was cancelled";
  }
  if (kill == K_NONE) {
    luapool__arm_interrupt_hook(L);
    return;
  }
  if (t && L == luapool__co_thread(t->co) && lua_isyieldable(L)) {
    if (ar->event == LUA_HOOKCOUNT) { /* (only a count hook may yield) */
      t->kill = kill;
      lua_yield(L, 0);
      return;
    }
    lua_sethook(L, io_hook, LUA_MASKCOUNT, 1);
    return;
  }
  lua_sethook(L, io_hook, LUA_MASKCOUNT, 1);
  luaL_error(L, "%s", why);
}

static void io_arm_hook(lua_State *L, lp_wstate *ws) {
  ioloop *lp = loop_of_ws(ws);
  if (inline_stopped(lp))
    lua_sethook(L, io_hook, LUA_MASKCOUNT, 1); /* stopped before it began (cancel_inline) */
  else if (ws->deadline > 0)
    lua_sethook(L, io_hook, LUA_MASKCOUNT, 1000);
  else
    lua_sethook(L, NULL, 0, 0);
}

/* A call of the running task starts: its deadline becomes a timer. */
static void io_call_start(lp_wstate *ws, uint32_t call) {
  (void)call;
  ioloop *lp = loop_of_ws(ws);
  io_task *t = lp->cur;
  if (t == NULL) return; /* an inline run: the hook alone stops it */
  if (ws->deadline > 0)
    timer_start(lp, &t->td, ws->deadline);
  else
    timer_stop(lp, &t->td);
}

static int io_is_task(void *io, lua_State *L) {
  ioloop *lp = io;
  return lp->cur != NULL && lp->cur->co != NULL && L == luapool__co_thread(lp->cur->co);
}

static lp_hloop *loop_hloop(ioloop *lp, char *err, size_t errsz) {
  if (lp->hl) return lp->hl;
  const char *why = luapool__http_init_error(); /* (loads libcurl) */
  if (why) {
    snprintf(err, errsz, "%s", why);
    return NULL;
  }
  /* The pool's limits: one loop's own, or counted across the loops by
  ** their share (httploop.h), whichever loop the tasks land on. */
  lp_hloop_limits lim = {lp->io->cfg.per_host, lp->io->cfg.max_connections, lp->io->share};
  lp_hloop *hl = luapool__hloop_new(&lim, err, errsz);
  if (hl == NULL) return NULL;
  pthread_mutex_lock(&lp->mu);
  lp->hl = hl;
  if (lp->woken) luapool__hloop_wakeup(hl); /* (a wake meant for the cv) */
  pthread_mutex_unlock(&lp->mu);
  return hl;
}

/* The maker of the thread's HTTP loop (httploop.h): on a request of a
** task, the first of the loop's.  Failing (no libcurl), it says so once:
** the request blocks on its thread's private loop, which fails the same
** way and reports it. */
static lp_hloop *make_hloop(void *ud) {
  ioloop *lp = ud;
  char err[512];
  lp_hloop *hl = loop_hloop(lp, err, sizeof err);
  if (hl == NULL) lp->hl_failed = 1;
  return hl;
}

static int io_await_timer(void *io, lua_State *L, double until, lua_KContext ctx, lua_KFunction k) {
  ioloop *lp = io;
  io_task *t = lp->cur;
  t->wait = W_TIMER;
  timer_start(lp, &t->tw, until);
  return lua_yieldk(L, 0, ctx, k);
}

static const lp_io_ops io_ops = {
    .is_task = io_is_task,
    .await_timer = io_await_timer,
};

static lua_State *loop_lua(ioloop *lp) { return luapool__worker_lua(&lp->ws); }

/* }====== */

/* {====== running what the loop takes */

/* A cancelling stop reaches the run on the loop thread (the owner's,
** under p->mu; or the run's own, when the stop came first). */
static void cancel_inline(ioloop *lp) {
  atomic_store(&lp->inline_cancel, 1);
  luapool__stop_task(&lp->intr);
}

/* f:cancel() of a running f: when the loop runs it inline (a kernel, or
** the initializer for it), where no pass sees cancel_pending until the run
** ends (before, the loop ran on for the kernel's whole time), the stop is
** aimed at that run's number: read before inline_f, which the loop clears
** before a new run takes a new number, so a run the loop has moved on to
** is missed (seq_cst). */
static void cancel_inline_of(ioloop *lp, lp_future *f) {
  uint_fast64_t s = atomic_load(&lp->intr.seq);
  if (!atomic_load(&lp->inline_run) || atomic_load(&lp->inline_f) != f) return;
  atomic_store(&lp->inline_cancel, 1);
  atomic_store(&lp->intr.reason, LP_STOP_SIGNAL);
  atomic_store(&lp->intr.kill_seq, s);
}

/* Runs msg to its end on the loop thread itself (a kernel other than
** fetch_length, the initializer): 0 with the reply in lp->out, -1 no
** memory.  *stopped: 1 Ctrl-C stopped it, 2 a cancelling stop
** (shutdown{cancel_running = true}: before, the initializer ran on to
** its end, helper-49). */
static int run_inline(ioloop *lp, lp_future *f, const char *msg, size_t len, int init,
                      int *stopped) {
  lp_wstate *ws = &lp->ws;
  atomic_store(&lp->intr.seq, atomic_load(&lp->intr.seq) + 1); /* a stop aimed earlier misses */
  atomic_store(&lp->inline_cancel, 0);
  atomic_store(&lp->inline_f, f);
  /* then cancel_all and cancel_pending: the owner sets those before it
  ** reads inline_run, so one of the two sides sees the other (seq_cst) */
  atomic_store(&lp->inline_run, 1);
  if (atomic_load(&lp->cancel_all) ||
      (atomic_load(&lp->cancel_pending) && luapool__future_state(f) == LP_CANCELLED))
    cancel_inline(lp);
  ws->call_timeout = f->timeout;
  ws->task_no = init ? 0 : f->task_no; /* (the initializer's messages name no task) */
  ws->item_lo = init ? 0 : f->item_lo;
  ws->deadline = 0;
  lp->out.len = 0;
  if (ws->L) luapool__set_task_state(ws->L);
  int st = luapool__run_message(ws, msg, len, &lp->out);
  luapool__set_task_state(NULL);
  atomic_store(&lp->inline_run, 0);
  atomic_store(&lp->inline_f, NULL);
  ws->deadline = 0;
  *stopped = !luapool__signal_stopped(&lp->intr) ? 0 : atomic_load(&lp->inline_cancel) ? 2 : 1;
  if (*stopped) atomic_fetch_add(&lp->intr.seq, 1); /* (spent: see the loop's stops) */
  return st;
}

/* Runs the pool's initializer once, before the loop's first task.  0, or
** -1 after breaking the pool and failing f (or failing f as interrupted,
** when a stop cut the initializer short). */
static int loop_init(ioloop *lp, lp_future *f) {
  lp_pool *p = lp->p;
  lp->initialized = 1;
  if (p->init_msg == NULL) return 0;
  char why[768], err[600];
  int stopped;
  if (loop_lua(lp) == NULL || run_inline(lp, f, p->init_msg, p->init_len, 1, &stopped) != 0)
    snprintf(err, sizeof err, "not enough memory");
  else if (luapool__reply_failed(lp->out.p, lp->out.len, err, sizeof err) == 0)
    return 0;
  else if (stopped || atomic_load(&lp->closing_intr)) {
    /* Ctrl-C or a closing stop, not an initializer that failed: the pool
    ** is not broken, and the next task runs the initializer again. */
    char label[48];
    lp->initialized = 0;
    if (stopped != 2 || !luapool__future_cancel_running(f))
      luapool__future_fail(f, LP_EK_INTERRUPTED,
                           "%s was interrupted in worker %s, in the pool's initializer",
                           luapool__future_label(f, label, sizeof label), lp->name);
    return -1;
  }
  snprintf(why, sizeof why, "the initializer failed in worker %s: %s", lp->name, err);
  luapool__future_fail(f, LP_EK_BROKEN, "%s", why);
  luapool__pool_break(p, why);
  return -1;
}

static int use_paths(ioloop *lp, lp_future *f) {
  if (f->paths == lp->paths || f->paths == NULL) return 0;
  if (luapool__wstate_set_paths(&lp->ws, f->paths->path, f->paths->cpath) != 0) {
    luapool__future_fail(f, LP_EK_TRANSFER, "worker %s ran out of memory setting package.path",
                         lp->name);
    return -1;
  }
  luapool__paths_ref(f->paths);
  luapool__paths_unref(lp->paths);
  lp->paths = f->paths;
  return 0;
}

/* Is msg's function a kernel (other than fetch_length, caught before)? */
static int is_kernel_msg(const char *msg, size_t len) {
  lp_reader r = {msg, msg + len};
  unsigned kind;
  uint32_t n;
  if (luapool__get_u8(&r, &kind) || luapool__get_u32(&r, &n)) return 0;
  return luapool__peek_kernel(&r) >= 0;
}

/* Begins f, just taken and started (its place counted): a task of the
** loop, or an inline run settled here.  gen: the intr_gen it was taken
** in (a Ctrl-C came since when that has moved on). */
static void begin_task(ioloop *lp, lp_future *f, unsigned gen) {
  lp_pool *p = lp->p;
  int intr = atomic_load(&lp->intr_gen) != gen;
  char label[48];
  io_task *t = lp_calloc(1, sizeof *t);
  if (t == NULL) {
    luapool__future_fail(f, LP_EK_TRANSFER, "worker %s ran out of memory starting the task",
                         lp->name);
    goto drop;
  }
  t->f = f;
  t->lp = lp;
  t->gen = gen;
  t->tw = (io_timer){0, t, -1};
  t->td = (io_timer){0, t, -1};
  /* room for this task's two timers, so a timer never fails to start */
  size_t need = 2 * (size_t)(lp->ntasks + 1);
  if (need > lp->capheap) {
    size_t cap = lp->capheap ? lp->capheap * 2 : 64;
    while (cap < need)
      cap *= 2;
    /* an array of pointers, two per task */
    io_timer **h = lp_realloc(lp->heap, cap * sizeof *h); // NOLINT(bugprone-sizeof-expression)
    if (h == NULL) {
      lp_free(t);
      luapool__future_fail(f, LP_EK_TRANSFER, "worker %s ran out of memory starting the task",
                           lp->name);
      goto drop;
    }
    lp->heap = h;
    lp->capheap = cap;
  }
  t->next = lp->tasks;
  if (lp->tasks) lp->tasks->prev = t;
  lp->tasks = t;
  lp->ntasks++;
  if (intr || atomic_load(&lp->closing_intr)) {
    task_kill(lp, t, intr ? K_INTR : K_CLOSE);
    return;
  }
  /* The initializer runs before the loop's first task of either kind (in
  ** the paths of that task), and a pool it broke fails native tasks too. */
  if (!lp->initialized && p->init_msg && (use_paths(lp, f) != 0 || loop_init(lp, f) != 0)) {
    task_free(lp, t);
    return;
  }
  lp->initialized = 1;
  if (p->init_msg) { /* taken with others before the initializer failed */
    pthread_mutex_lock(&p->mu);
    if (p->broken) luapool__future_fail(f, LP_EK_BROKEN, "%s", p->broken);
    pthread_mutex_unlock(&p->mu);
    if (luapool__future_state(f) != LP_RUNNING) {
      task_free(lp, t);
      return;
    }
  }
  int nat = native_calls(t, f->msg, f->msglen);
  if (nat > 0 && start_native(lp, t) == 0) return;
  if (nat != 0) { /* no memory, or no HTTP: fetch_length runs inline and says why */
    for (uint32_t i = 0; i < t->ncalls; i++)
      lp_free(t->calls[i].url);
    lp_free(t->calls);
    t->calls = NULL;
    t->ncalls = 0;
  }
  if (use_paths(lp, f) != 0) {
    task_free(lp, t);
    return;
  }
  if (nat != 0 || is_kernel_msg(f->msg, f->msglen)) {
    int stopped;
    if (run_inline(lp, f, f->msg, f->msglen, 0, &stopped) != 0)
      finish_reply(lp, t, NULL, 0);
    else if (stopped == 2)
      (void)luapool__future_cancel_running(f); /* (or f:cancel() did: nothing to settle) */
    else if (stopped)
      luapool__future_fail(f, LP_EK_INTERRUPTED, "%s was interrupted in worker %s",
                           luapool__future_label(f, label, sizeof label), lp->name);
    else
      luapool__future_finish(f, lp->out.p, lp->out.len, 1);
    task_free(lp, t);
    return;
  }
  if (loop_lua(lp) == NULL || (t->co = luapool__co_new(&lp->ws, f->msg, f->msglen, f->timeout,
                                                       f->task_no, f->item_lo)) == NULL) {
    finish_reply(lp, t, NULL, 0);
    task_free(lp, t);
    return;
  }
  run_co(lp, t);
  return;
drop:
  luapool__future_unref(f);
  task_gone(lp);
}

static void run_ready(ioloop *lp) {
  /* Only what is ready now: what running it makes ready runs at the next
  ** turn, after the loop has looked at the network again. */
  io_task *t = lp->rhead;
  lp->rhead = lp->rtail = NULL;
  while (t) {
    io_task *next = t->rnext;
    t->queued = 0;
    if (t->co) {
      run_co(lp, t);
    } else {
      end_native(lp, t);
      task_free(lp, t);
    }
    t = next;
  }
}

/* A native task answered inside the loop's run (on_native_done): its
** future settled, its place given back and taken by the next queued task,
** begun now (a native one's request is added to the loop, which sends it
** before its run returns).  One task per ended one: more room (a task
** that ended while being begun) is left to the loop's next turn. */
static void end_now(ioloop *lp, io_task *t) {
  lp_pool *p = lp->p;
  iopool *io = lp->io;
  lp->ending = 1;
  end_native(lp, t);
  task_free(lp, t);
  for (int tries = 0; tries < 64; tries++) {
    lp_future *f = NULL;
    int started = 0;
    pthread_mutex_lock(&p->mu);
    /* (taken_gen: as in loop_main, an interrupt finds it queued or started) */
    unsigned taken_gen = atomic_load(&lp->intr_gen);
    if (p->head && lp->n < lp->cap && io->inflight < io->cfg.concurrency) {
      f = luapool__pool_take(p);
      started = luapool__future_start(f, lp->name);
      if (started) {
        lp->n++;
        io->inflight++;
      }
    }
    pthread_mutex_unlock(&p->mu);
    if (f == NULL) break;
    if (!started) { /* cancelled meanwhile */
      luapool__future_unref(f);
      continue;
    }
    begin_task(lp, f, taken_gen);
    break;
  }
  lp->ending = 0;
}

/* }====== */

static void *loop_main(void *arg) {
  ioloop *lp = arg;
  lp_pool *p = lp->p;
  iopool *io = lp->io;
  luapool__stop_signal_install();
  lp->ws.kind = "io";
  snprintf(lp->ws.name, sizeof lp->ws.name, "%s", lp->name);
  lp->ws.index = lp->index;
  lp->ws.intr = &lp->intr;
  lp->ws.call_start = io_call_start;
  lp->ws.io = lp;
  lp->ws.io_ops = &io_ops;
  lp->ws.arm_hook = io_arm_hook;
  lp->ws.signal_hook = io_hook;
  lp->intr_seen = atomic_load(&lp->intr_gen);
  for (;;) {
    /* take what fits */
    lp_future *take[64];
    int ntake = 0, done, dropped = 0;
    pthread_mutex_lock(&p->mu);
    /* Started before p->mu is let go (engine.h): an interrupt, which holds
    ** p->mu, finds each task queued (cancelled) or started; one started
    ** here before it is stopped (intr_gen moved past taken_gen). */
    unsigned taken_gen = atomic_load(&lp->intr_gen);
    /* (started ones fill take[] from the front, cancelled ones from the back) */
    while (ntake + dropped < 64 && p->head && lp->n < lp->cap &&
           io->inflight < io->cfg.concurrency) {
      lp_future *f = luapool__pool_take(p);
      if (luapool__future_start(f, lp->name)) {
        take[ntake++] = f;
        lp->n++;
        io->inflight++;
      } else { /* cancelled meanwhile */
        take[63 - dropped++] = f;
      }
    }
    lp->wanted = 0;
    done = p->closing && p->head == NULL && lp->n == 0;
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < dropped; i++)
      luapool__future_unref(take[63 - i]);
    if (done) break;
    for (int i = 0; i < ntake; i++)
      begin_task(lp, take[i], taken_gen);
    /* stops */
    unsigned g = atomic_load(&lp->intr_gen);
    if (g != lp->intr_seen) {
      lp->intr_seen = g;
      for (io_task *t = lp->tasks; t; t = t->next)
        if (t->gen != g) task_kill(lp, t, K_INTR);
      /* Passed on: the stop in lp->intr, which the loop's tasks wait under
      ** (a future's result in a task), no longer matches.  Left set, every
      ** later task's wait failed "interrupted: Ctrl-C" (helper-50).  A
      ** Ctrl-C after this sets it again (luapool__stop_task follows seq). */
      atomic_fetch_add(&lp->intr.seq, 1);
    }
    if (atomic_load(&lp->closing_intr))
      for (io_task *t = lp->tasks; t; t = t->next)
        task_kill(lp, t, K_CLOSE);
    if (atomic_exchange(&lp->cancel_all, 0))
      for (io_task *t = lp->tasks; t; t = t->next)
        if (luapool__future_cancel_running(t->f)) task_kill(lp, t, K_CANCEL);
    if (atomic_exchange(&lp->cancel_pending, 0))
      for (io_task *t = lp->tasks; t; t = t->next)
        if (luapool__future_state(t->f) == LP_CANCELLED) task_kill(lp, t, K_CANCEL);
    /* timers */
    double now = luapool__now();
    while (lp->nheap && lp->heap[0]->when <= now) {
      io_timer *tm = lp->heap[0];
      io_task *t = tm->t;
      timer_stop(lp, tm);
      if (tm == &t->td) {
        task_deadline(lp, t);
      } else if (t->wait == W_TIMER) {
        t->wait = W_NONE;
        ready(lp, t);
      }
    }
    /* native tasks' deadlines are the requests' own (opts.deadline) */
    if (lp->rhead) run_ready(lp);
    pthread_mutex_lock(&p->mu);
    int room = lp->room;
    lp->room = 0;
    pthread_mutex_unlock(&p->mu);
    if (ntake + dropped == 64 || room) { /* more may be queued */
      /* A look at the network first (no wait): the requests just added
      ** connect and the connections made before send, instead of every
      ** queued task being begun before the first request goes out. */
      if (ntake > 0 && lp->hl) loop_wait(lp, 0);
      continue;
    }
    double wait = 1.0;
    if (lp->rhead)
      wait = 0;
    else if (lp->nheap && lp->heap[0]->when - luapool__now() < wait)
      wait = lp->heap[0]->when - luapool__now();
    loop_wait(lp, wait < 0 ? 0 : wait);
  }
  luapool__set_task_state(NULL);
  luapool__http_set_thread_loop(NULL);
  /* Out of wakers' reach first (a closing owner wakes it under lp->mu),
  ** then freed (nothing is left in it). */
  pthread_mutex_lock(&lp->mu);
  lp_hloop *hl = lp->hl;
  lp->hl = NULL;
  pthread_mutex_unlock(&lp->mu);
  if (hl) luapool__hloop_free(hl);
  luapool__wstate_close(&lp->ws);
  luapool__paths_unref(lp->paths);
  lp->paths = NULL;
  lp_free(lp->heap);
  lp->heap = NULL;
  luapool__buf_free(&lp->out);
  luapool__http_thread_cleanup();
  pthread_mutex_lock(&p->mu);
  io->nalive--;
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

/* {====== engine entry points */

static int io_open(lp_pool *p, char *err, size_t errsz) {
  iopool *io = lp_calloc(1, sizeof *io);
  /* an array of pointers, one per loop */
  ioloop **loops =
      lp_calloc((size_t)p->max_workers, sizeof *loops); // NOLINT(bugprone-sizeof-expression)
  if (io == NULL || loops == NULL) {
    lp_free(io);
    lp_free(loops);
    snprintf(err, errsz, "cannot create a pool: not enough memory");
    return -1;
  }
  io->loops = loops;
  io->cfg = *(io_config *)p->config;
  if (p->max_workers > 1 && (io->cfg.per_host > 0 || io->cfg.max_connections > 0) &&
      (io->share = luapool__hshare_new(io->cfg.per_host, io->cfg.max_connections)) == NULL) {
    lp_free(io);
    lp_free(loops);
    snprintf(err, errsz, "cannot create a pool: not enough memory");
    return -1;
  }
  p->es = io;
  return 0;
}

/* p->mu locked: starts loop number nloops+1.  0, or -1 with err. */
static int start_loop(lp_pool *p, iopool *io, char *err, size_t errsz) {
  ioloop *lp = lp_calloc(1, sizeof *lp);
  if (lp == NULL) {
    snprintf(err, errsz, "cannot start a loop: not enough memory");
    return -1;
  }
  lp->p = p;
  lp->io = io;
  lp->index = io->nloops + 1;
  snprintf(lp->name, sizeof lp->name, "%s-%d", p->name, lp->index);
  int share = (io->cfg.concurrency + p->max_workers - 1) / p->max_workers;
  lp->cap = share > 0 ? share : 1;
  atomic_init(&lp->intr.closing, 0);
  atomic_init(&lp->intr.seq, 0);
  atomic_init(&lp->intr.kill_seq, UINT64_MAX);
  atomic_init(&lp->intr.reason, 0);
  atomic_init(&lp->cancel_pending, 0);
  atomic_init(&lp->inline_f, NULL);
  atomic_init(&lp->cancel_all, 0);
  atomic_init(&lp->intr_gen, 0);
  atomic_init(&lp->closing_intr, 0);
  if (pthread_mutex_init(&lp->mu, NULL) != 0) {
    lp_free(lp);
    snprintf(err, errsz, "cannot start a loop: not enough memory");
    return -1;
  }
  if (luapool__cond_init(&lp->cv) != 0) {
    pthread_mutex_destroy(&lp->mu);
    lp_free(lp);
    snprintf(err, errsz, "cannot start a loop: not enough memory");
    return -1;
  }
  int r = luapool__pool_thread(&lp->thread, loop_main, lp);
  if (r != 0) {
    pthread_cond_destroy(&lp->cv);
    pthread_mutex_destroy(&lp->mu);
    lp_free(lp);
    snprintf(err, errsz, "cannot start a loop thread: %s", strerror(r));
    return -1;
  }
  io->loops[io->nloops++] = lp;
  io->nalive++;
  return 0;
}

static int io_queued(lp_pool *p, char *err, size_t errsz) {
  iopool *io = p->es;
  ioloop *best = NULL;
  for (int i = 0; i < io->nloops; i++) {
    ioloop *lp = io->loops[i];
    if (lp->n >= lp->cap) continue;
    if (best == NULL || lp->n + lp->wanted < best->n + best->wanted) best = lp;
  }
  if ((best == NULL || best->n + best->wanted > 0) && io->nloops < p->max_workers) {
    if (start_loop(p, io, err, errsz) == 0)
      best = io->loops[io->nloops - 1];
    else if (io->nloops == 0)
      return -1; /* with no loop at all the task would wait forever */
  }
  if (best == NULL) return 0; /* every loop is full: one takes it when a task ends */
  best->wanted++;
  loop_wake(best);
  return 0;
}

static int io_cancel(lp_pool *p, lp_future *f) {
  iopool *io = p->es;
  if (!luapool__future_cancel_running(f)) return 0;
  /* The loop that runs f finds it by its state; one hogging its loop is
  ** told by STOP_SIGNAL (the owner alone joins, so the threads exist). */
  pthread_mutex_lock(&p->mu);
  for (int i = 0; i < io->nloops; i++) {
    ioloop *lp = io->loops[i];
    if (lp->joined) continue;
    atomic_store(&lp->cancel_pending, 1);
    cancel_inline_of(lp, f);
    loop_wake(lp);
    pthread_kill(lp->thread, LUAPOOL_STOP_SIGNAL);
  }
  pthread_mutex_unlock(&p->mu);
  return 1;
}

/* shutdown{cancel_futures = true}: the queue is cancelled already; each
** loop now cancels what it has in flight (its transfers and timers end). */
static void io_cancel_running(lp_pool *p) {
  iopool *io = p->es;
  pthread_mutex_lock(&p->mu);
  for (int i = 0; i < io->nloops; i++) {
    ioloop *lp = io->loops[i];
    if (lp->joined) continue;
    atomic_store(&lp->cancel_all, 1);
    if (atomic_load(&lp->inline_run)) cancel_inline(lp);
    loop_wake(lp);
    pthread_kill(lp->thread, LUAPOOL_STOP_SIGNAL); /* a coroutine hogging the loop */
  }
  pthread_mutex_unlock(&p->mu);
}

static void io_interrupt(lp_pool *p) {
  iopool *io = p->es;
  for (int i = 0; i < io->nloops; i++) {
    ioloop *lp = io->loops[i];
    if (lp->joined) continue;
    luapool__stop_task(&lp->intr);
    atomic_fetch_add(&lp->intr_gen, 1);
    loop_wake(lp);
    pthread_kill(lp->thread, LUAPOOL_STOP_SIGNAL);
  }
}

static int io_stop(lp_pool *p, int interrupt, int wait) {
  iopool *io = p->es;
  pthread_mutex_lock(&p->mu);
  int n = io->nloops; /* only the owner starts loops: n cannot grow */
  for (int i = 0; i < n; i++) {
    ioloop *lp = io->loops[i];
    if (lp->joined) continue;
    if (interrupt) {
      atomic_store(&lp->intr.closing, 1);
      atomic_store(&lp->closing_intr, 1);
      pthread_kill(lp->thread, LUAPOOL_STOP_SIGNAL);
    }
    loop_wake(lp);
  }
  pthread_mutex_unlock(&p->mu);
  if (!wait) return 0;
  int stuck = 0;
  lp_join j;
  luapool__join_begin(&j, interrupt);
  for (int i = 0; i < n; i++) {
    ioloop *lp = io->loops[i];
    if (lp->joined) continue;
    if (!luapool__pool_join(p, lp->thread, &j)) {
      stuck++;
      continue;
    }
    pthread_mutex_lock(&p->mu);
    lp->joined = 1;
    pthread_mutex_unlock(&p->mu);
  }
  return stuck;
}

static void io_free(lp_pool *p) {
  iopool *io = p->es;
  if (io == NULL) return;
  for (int i = 0; i < io->nloops; i++) {
    ioloop *lp = io->loops[i];
    pthread_cond_destroy(&lp->cv);
    pthread_mutex_destroy(&lp->mu);
    lp_free(lp);
  }
  lp_free(io->loops);
  luapool__hshare_free(io->share); /* (after the loops: each freed its HTTP loop as it ended) */
  lp_free(io);
  p->es = NULL;
}

static void io_stats(lp_pool *p, int *workers, int *idle) {
  iopool *io = p->es;
  *workers = io->nalive;
  *idle = 0;
  for (int i = 0; i < io->nloops; i++)
    if (!io->loops[i]->joined && io->loops[i]->n == 0) (*idle)++;
}

static int io_concurrency(const lp_pool *p) { return ((const io_config *)p->config)->concurrency; }

/* One loop thread: a loop already runs thousands of requests. */
static int io_default_workers(int ncpu) {
  (void)ncpu;
  return 1;
}

/* }====== */

/* Each item of a map is its own future: a future costs 152 bytes, and
** `concurrency` bounds the coroutines and requests alive at once, not the
** items; an item of its own is cancelled, timed and retried alone. */
const lp_engine luapool__io_engine = {
    .kind = "iopool",
    .foreign_note = "an event loop runs many tasks on one thread",
    .options = io_options,
    .config_size = sizeof(io_config),
    .config_defaults = io_config_defaults,
    .default_workers = io_default_workers,
    .chunking = 0,
    .concurrency = io_concurrency,
    .open = io_open,
    .queued = io_queued,
    .cancel = io_cancel,
    .cancel_running = io_cancel_running,
    .interrupt = io_interrupt,
    .stop = io_stop,
    .free = io_free,
    .stats = io_stats,
};
