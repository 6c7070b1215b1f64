/*
** Futures, the C side: a thread-safe state machine, the script's paths it
** carries, and completion queues.  No Lua (lfuture.c is their Lua face)
** and no pool (a pool hears of transitions through lp_future_hooks).
**
**   PENDING --start--> RUNNING --finish--> FINISHED (reply bytes)
**      |                  \----fail-----> FAILED   (kind + message)
**      +--cancel--> CANCELLED      (fail also from PENDING: broken pools)
**
** Every transition happens under the future's lock (its stripe: see
** "striped locks") and exactly once: the first of cancel/start/fail wins,
** so a future ends in exactly one state.
** The C struct is reference counted: the Lua userdata holds one reference,
** a pool queue holds one while the task is queued or running.
*/
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/alloc.h"
#include "base/ctrlc.h"
#include "core/future.h"
#include "base/stop.h"
#include "base/util.h"

/* {======================================================
** C side
** ======================================================= */

/* {====== striped locks
** A future has no mutex or condition variable of its own (88 bytes on
** glibc, the biggest part of a small future): it uses the stripe its
** address hashes to, one of NSTRIPES shared by every future of the
** process.  The protocol, the one a private pair had:
**  - every field the struct says is under "lock: stripe" (state, ekind,
**    the reply, nwaiters, wnodes, notify, the message's release) is read
**    and written with stripe_of(f)->mu held; a future always maps to the
**    same stripe, so all its readers and writers take the same mutex;
**  - a waiter (luapool__future_wait) checks the state and, while it is
**    not done, waits on the stripe's cv, under the stripe's mu, with
**    f->nwaiters counting it; settle changes the state and, when
**    nwaiters > 0, broadcasts the stripe's cv, under the same mu.  A
**    waiter therefore either sees the new state before it waits or is
**    already waiting when the broadcast comes: no wake-up is lost;
**  - a broadcast wakes every waiter of the stripe, waiters of other
**    futures too: each re-checks its own future and waits again (a
**    spurious wake-up, which condition waits allow anyway), so the
**    waiter of f always wakes exactly when f is done;
**  - no code holds two stripes at once (lock order: see executor.c, a
**    stripe takes the place of f->mu), so sharing cannot deadlock.
** Contention is low: the owner waits on one future at a time, and a
** worker holds a stripe only for a state change. */
#define NSTRIPES 64

typedef struct stripe {
  _Alignas(64) pthread_mutex_t mu; /* one stripe per cache line or two */
  pthread_cond_t cv;
} stripe;

static stripe stripes[NSTRIPES];
static pthread_once_t stripes_once = PTHREAD_ONCE_INIT;
static int stripes_ok;

static void stripes_init(void) {
  for (int i = 0; i < NSTRIPES; i++) {
    if (pthread_mutex_init(&stripes[i].mu, NULL) != 0) return;
    if (luapool__cond_init(&stripes[i].cv) != 0) return;
  }
  stripes_ok = 1;
}

/* Futures are malloc'd (16-byte aligned, 160 bytes apart when made one
** after the other): a multiplicative hash spreads them over the stripes. */
static stripe *stripe_of(const lp_future *f) {
  uint64_t h = (uint64_t)(uintptr_t)f * UINT64_C(0x9E3779B97F4A7C15);
  return &stripes[h >> 58]; /* the top 6 bits: NSTRIPES == 64 */
}

static void lock(const lp_future *f) { pthread_mutex_lock(&stripe_of(f)->mu); }
static void unlock(const lp_future *f) { pthread_mutex_unlock(&stripe_of(f)->mu); }
/* }====== */

/* Messages up to this size are copied out of the submitter's buffer (which
** keeps its capacity for the next submit); larger ones are handed over. */
#define COPY_MSG_MAX 4096

/* {====== message buffers
** A message too big for inline_buf has its own buffer, dropped as soon as
** the task has run, on the worker's thread.  Freeing there cost more than
** the rest of the task (glibc: a chunk of the owner's arena freed by
** another thread goes to its fast bins, and the owner's next large
** allocation consolidates them all): about 1 µs of CPU per task at a
** million futures.  So buffers of a few sizes go back to a free list the
** submitting thread takes them from again.  Each list is bounded (what is
** above LIST_MAX is freed), and what the lists hold at exit stays
** reachable from them. */
#define NCLASSES 4
#define LIST_MAX 4096

typedef struct msgbuf {
  struct msgbuf *next;
} msgbuf;

static struct {
  pthread_mutex_t mu;
  msgbuf *head;
  int n;
} lists[NCLASSES] = {
    {PTHREAD_MUTEX_INITIALIZER, NULL, 0},
    {PTHREAD_MUTEX_INITIALIZER, NULL, 0},
    {PTHREAD_MUTEX_INITIALIZER, NULL, 0},
    {PTHREAD_MUTEX_INITIALIZER, NULL, 0},
};

/* The class of a buffer for len bytes: capacities of 120, 248, 504 and 1016
** bytes (malloc chunks of 128 to 1024); -1: too big, plain malloc. */
static int class_of(size_t len) {
  for (int k = 0; k < NCLASSES; k++)
    if (len <= ((size_t)128 << k) - 8) return k;
  return -1;
}

static char *msg_alloc(size_t len) {
  int k = class_of(len);
  if (k < 0) return lp_malloc(len);
  pthread_mutex_lock(&lists[k].mu);
  msgbuf *b = lists[k].head;
  if (b) {
    lists[k].head = b->next;
    lists[k].n--;
  }
  pthread_mutex_unlock(&lists[k].mu);
  return b ? (char *)b : lp_malloc(((size_t)128 << k) - 8);
}

static void msg_free(char *p, size_t len) {
  int k = class_of(len);
  if (k >= 0) {
    msgbuf *b = (msgbuf *)(void *)p; /* malloc'd: aligned for any type */
    pthread_mutex_lock(&lists[k].mu);
    int keep = lists[k].n < LIST_MAX;
    if (keep) {
      b->next = lists[k].head;
      lists[k].head = b;
      lists[k].n++;
    }
    pthread_mutex_unlock(&lists[k].mu);
    if (keep) return;
  }
  lp_free(p);
}
/* }====== */

static int is_done(lp_fstate s);

static void drop_msg(lp_future *f) {
  if (f->msg == NULL || f->msg == f->inline_buf)
    ;
  else if (f->msglen <= COPY_MSG_MAX)
    msg_free(f->msg, f->msglen); /* from msg_alloc */
  else
    lp_free(f->msg); /* handed over by the submitter's buffer */
  f->msg = NULL;
}

/* The struct's size is its malloc chunk's (152 + glibc's 8-byte header is
** 160): a field added here is 16 bytes more per future, a million futures
** 16 MB more (docs/performance.md). */
_Static_assert(sizeof(void *) != 8 || sizeof(lp_future) <= 152, "lp_future outgrew its size class");

lp_future *luapool__future_new(lp_buf *b, int ncalls) {
  if (pthread_once(&stripes_once, stripes_init) != 0 || !stripes_ok) return NULL;
  lp_future *f = lp_calloc(1, sizeof *f);
  if (f == NULL) return NULL;
  if (b->len <= LP_INLINE) { /* no second allocation at all */
    memcpy(f->inline_buf, b->p, b->len);
    f->msg = f->inline_buf;
    f->msglen = b->len;
    b->len = 0;
  } else if (b->len <= COPY_MSG_MAX) {
    /* Its own allocation, freed as soon as the task has run: a future the
    ** script keeps costs only its struct (for a million futures of a
    ** 160-byte message, 160 MB less than with the message kept inline). */
    if ((f->msg = msg_alloc(b->len)) == NULL) {
      lp_free(f);
      return NULL;
    }
    memcpy(f->msg, b->p, b->len);
    f->msglen = b->len;
    b->len = 0;
  } else {
    f->msg = luapool__buf_take(b, &f->msglen);
  }
  atomic_init(&f->refs, 1);
  f->state = LP_PENDING;
  f->ncalls = ncalls;
  return f;
}

const char *luapool__future_label(const lp_future *f, char *buf, size_t size) {
  if (f->task_no)
    snprintf(buf, size, "task #%llu", (unsigned long long)f->task_no);
  else if (f->ncalls == 1)
    snprintf(buf, size, "item #%lld", (long long)f->item_lo);
  else
    snprintf(buf, size, "items #%lld-#%lld", (long long)f->item_lo,
             (long long)f->item_lo + f->ncalls - 1);
  return buf;
}

void luapool__future_ref(lp_future *f) {
  atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
}

void luapool__future_unref(lp_future *f) {
  if (atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1) return;
  drop_msg(f);
  luapool__paths_unref(f->paths);
  if (f->state == LP_FINISHED && (f->ekind & LP_RF_PINNED))
    luapool__pins_release(f->reply, f->replylen, !(f->ekind & LP_RF_READ));
  if (f->state == LP_FINISHED && f->reply != f->inline_buf) lp_free(f->reply);
  if (f->state == LP_FAILED) lp_free(f->emsg);
  lp_free(f);
}

static void fire(lp_wnode *n) {
  lp_cq *q = n->q;
  n->fired = 1;
  pthread_mutex_lock(&q->mu);
  n->qnext = NULL;
  if (q->tail)
    q->tail->qnext = n;
  else
    q->head = n;
  q->tail = n;
  pthread_cond_signal(&q->cv);
  pthread_mutex_unlock(&q->mu);
}

/* What the pool layer wants to hear of a transition (luapool__future_hooks):
** set once by the first pool, before any future has a pool. */
static _Atomic(const lp_future_hooks *) hooks;

void luapool__future_set_hooks(const lp_future_hooks *h) { atomic_store(&hooks, h); }

/* Tells f's pool of a transition (stripe locked), so its stats() agree
** with the futures' states at every moment. */
static void count(lp_future *f, lp_fstate from, lp_fstate to) {
  if (f->pool == NULL) return;
  const lp_future_hooks *h = atomic_load_explicit(&hooks, memory_order_acquire);
  if (h) h->count(f->pool, f, from, to);
}

/* Stripe locked: wakes whoever waits for the outcome.  drop: the message
** may go now (see below). */
static void settle(lp_future *f, lp_fstate from, int drop) {
  count(f, from, f->state);
  for (lp_wnode *n = f->wnodes, *next; n; n = next) {
    next = n->fnext;
    fire(n);
  }
  f->wnodes = NULL;
  if (f->notify) {
    const lp_future_hooks *h = atomic_load_explicit(&hooks, memory_order_acquire);
    if (h) h->notify(f->notify, f);
  }
  /* The task will not run (again): its message is dropped now rather
  ** than when the script lets go of the future.  Safe because settle runs
  ** on the thread that ran the task (after the message was consumed), or
  ** for a task that never started.  An inline message may already have
  ** been overwritten by the reply: only the pointer goes.  (Not for a
  ** running task cancelled from another thread: its engine may still read
  ** the message.) */
  if (drop) drop_msg(f);
  if (f->nwaiters > 0) pthread_cond_broadcast(&stripe_of(f)->cv);
}

int luapool__future_hold(lp_future *f, unsigned char held) {
  lock(f);
  int ok = f->state == LP_PENDING;
  if (ok || held == 0) f->held = held;
  unlock(f);
  return ok;
}

int luapool__future_start(lp_future *f, const char *worker) {
  lock(f);
  int ok = f->state == LP_PENDING;
  if (ok) {
    f->state = LP_RUNNING;
    f->held = 0;
    count(f, LP_PENDING, LP_RUNNING);
    f->worker = worker;
  }
  unlock(f);
  return ok;
}

/* (pinned: the reply lists pins at its end, LP_RF_PINNED; never inline,
** and its pins released whenever f does not keep it) */
static void finish(lp_future *f, char *reply, size_t len, int copy, int pinned) {
  char *own = copy ? NULL : reply; /* freed here unless f keeps it */
  int inl = len <= LP_INLINE && !pinned;
  if (copy && !inl) {
    if ((own = lp_malloc(len)) == NULL) {
      luapool__future_fail(f, LP_EK_TRANSFER, "no memory for the reply (%zu bytes)", len);
      if (pinned) luapool__pins_release(reply, len, 1);
      return;
    }
    memcpy(own, reply, len);
  }
  lock(f);
  if (f->state == LP_RUNNING || f->state == LP_PENDING) {
    lp_fstate from = f->state;
    f->state = LP_FINISHED;
    f->ekind = pinned ? LP_RF_PINNED : 0;
    if (inl) { /* over the message, consumed by now; a taken reply is freed */
      if (len && reply) memcpy(f->inline_buf, reply, len);
      f->reply = f->inline_buf;
    } else {
      f->reply = own;
      own = NULL;
    }
    f->replylen = len;
    pinned = 0; /* f holds them now */
    settle(f, from, 1);
  }
  unlock(f);
  /* lost a race (already failed elsewhere): its pins go with it */
  if (pinned) luapool__pins_release(own ? own : reply, len, 1);
  lp_free(own); /* copied inline, or lost that race */
}

void luapool__future_finish(lp_future *f, char *reply, size_t len, int copy) {
  finish(f, reply, len, copy, 0);
}

void luapool__future_finish_pinned(lp_future *f, char *reply, size_t len, int copy) {
  finish(f, reply, len, copy, 1);
}

void luapool__pinned_unref(lp_pinned *p) {
  if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1) return;
  if (p->big)
    luapool__big_free(p->block);
  else
    lp_free(p->block);
  lp_free(p);
}

/* {====== pacing (future.h).  The reads are counted per pool
** (lp_pace_reads), the owner's blocking waits once for the process (it
** reads no pool's results while it blocks); one condition variable wakes
** every pacer, which looks at its own pool's count.  Wake protocol: a
** waiter counts itself in `waiting` under mu, then checks the counters,
** then waits; a read (or a block) bumps its counter, then, seeing a
** waiter, takes mu to broadcast: either the waiter sees the new count or
** the broadcast comes after it waits (all seq_cst). */
static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  atomic_int waiting;
  atomic_int blocked; /* owner waits on a future now (a level: one begun before a mark counts) */
  atomic_uint_fast64_t blocks;
  int cv_ok;                                /* cv is on the monotonic clock (pace_init) */
} pace = {.mu = PTHREAD_MUTEX_INITIALIZER}; /* (cv: pace_init, before any wait) */

static pthread_once_t pace_once = PTHREAD_ONCE_INIT;

static void pace_init(void) { pace.cv_ok = luapool__cond_init(&pace.cv) == 0; }

static void deadline_in(struct timespec *dl, double timeout);

static void pace_wake(void) {
  if (atomic_load(&pace.waiting) == 0) return;
  pthread_mutex_lock(&pace.mu);
  pthread_cond_broadcast(&pace.cv);
  pthread_mutex_unlock(&pace.mu);
}

void luapool__pace_mark(const lp_pace_reads *r, lp_pace_mark *m) {
  m->reads = atomic_load(&r->n);
  m->blocks = atomic_load(&pace.blocks);
}

double luapool__pace_last(const lp_pace_reads *r) {
  return atomic_load_explicit(&r->last, memory_order_relaxed);
}

int luapool__pace_wait(const lp_pace_reads *rd, const lp_pace_mark *m, double deadline) {
  pthread_once(&pace_once, pace_init);
  if (!pace.cv_ok) return 0; /* (no such wait, then: the worker goes on) */
  pthread_mutex_lock(&pace.mu);
  atomic_fetch_add(&pace.waiting, 1);
  int r = 0;
  struct timespec dl = {0, 0};
  double left = deadline - luapool__now();
  if (left > 0) deadline_in(&dl, left);
  while (left > 0) {
    if (atomic_load(&rd->n) != m->reads) {
      r = 1;
      break;
    }
    if (atomic_load(&pace.blocked) > 0 || atomic_load(&pace.blocks) != m->blocks ||
        pthread_cond_timedwait(&pace.cv, &pace.mu, &dl) == ETIMEDOUT)
      break;
  }
  atomic_fetch_sub(&pace.waiting, 1);
  pthread_mutex_unlock(&pace.mu);
  return r;
}

/* The owner is about to block on a future (it reads nothing meanwhile),
** or stops a pool: the pacers go on.  The level (blocked) ends waits
** that begin while it blocks; the count and the wake end those already
** waiting.  (blocked++ then a load of waiting, against waiting++ then a
** load of blocked: one of the two sees the other.) */
static void pace_block(int delta) {
  atomic_fetch_add(&pace.blocked, delta);
  if (delta < 0 || atomic_load(&pace.waiting) == 0) return;
  atomic_fetch_add(&pace.blocks, 1);
  pace_wake();
}

void luapool__pace_kick(void) {
  pace_block(1);
  pace_block(-1);
}

/* The pins listed at the end of reply[0..len): where the list starts,
** and their count in *n; pin_at(list, i) is the i-th. */
static const char *pin_list(const char *reply, size_t len, uint64_t *n) {
  memcpy(n, reply + len - 8, 8);
  return reply + len - 8 - *n * sizeof(lp_pinref);
}

static lp_pinned *pin_at(const char *list, uint64_t i) {
  lp_pinref r;
  memcpy(&r, list + i * sizeof r, sizeof r);
  return r.p;
}

/* Calls fn on each pin listed at the end of reply[0..len). */
static void each_pin(const char *reply, size_t len, void (*fn)(lp_pinned *p, int unread),
                     int unread) {
  uint64_t n;
  const char *list = pin_list(reply, len, &n);
  for (uint64_t i = 0; i < n; i++)
    fn(pin_at(list, i), unread);
}

static void drop_pin(lp_pinned *p, int unread) {
  if (unread) atomic_fetch_sub_explicit(&p->unread, 1, memory_order_relaxed);
  luapool__pinned_unref(p);
}

static void read_pin(lp_pinned *p, int unread) {
  (void)unread;
  atomic_fetch_sub_explicit(&p->unread, 1, memory_order_relaxed);
}

/* }====== */

void luapool__pins_release(const char *reply, size_t len, int unread) {
  each_pin(reply, len, drop_pin, unread);
}

void luapool__future_mark_read(lp_future *f) {
  if (f->state != LP_FINISHED || (f->ekind & (LP_RF_PINNED | LP_RF_READ)) != LP_RF_PINNED) return;
  lock(f); /* (cheap; a worker reads ekind only at the last unref, after the owner's) */
  f->ekind |= LP_RF_READ;
  unlock(f);
  each_pin(f->reply, f->replylen, read_pin, 1);
  uint64_t n; /* (a pinned reply lists at least one; all of one worker's: one pool's) */
  lp_pace_reads *r = pin_at(pin_list(f->reply, f->replylen, &n), 0)->reads;
  if (r == NULL) return;
  atomic_store_explicit(&r->last, luapool__now(), memory_order_relaxed);
  atomic_fetch_add(&r->n, 1);
  pace_wake();
}

int luapool__future_pinned(const lp_future *f) {
  return f->state == LP_FINISHED && (f->ekind & LP_RF_PINNED) != 0;
}

static int fail_with(lp_future *f, int call, lp_ekind k, const char *fmt, va_list ap) {
  char buf[1024];
  vsnprintf(buf, sizeof buf, fmt, ap);
  char *m = lp_strdup(buf); /* NULL on no memory: the kind still tells */
  int moved = 0;
  lock(f);
  if (f->state == LP_RUNNING || f->state == LP_PENDING) {
    lp_fstate from = f->state;
    f->state = LP_FAILED;
    f->ekind = (unsigned char)k;
    f->emsg = m;
    f->fail_call = call > 0 ? (size_t)call : 0; /* (with the state: a loser writes nothing) */
    m = NULL;
    moved = 1;
    settle(f, from, 1);
  }
  unlock(f);
  lp_free(m);
  return moved;
}

int luapool__future_fail(lp_future *f, lp_ekind k, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int moved = fail_with(f, 0, k, fmt, ap);
  va_end(ap);
  return moved;
}

int luapool__future_fail_call(lp_future *f, int call, lp_ekind k, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int moved = fail_with(f, call, k, fmt, ap);
  va_end(ap);
  return moved;
}

/* The reply header: the count of failed calls, and LP_REPLY_NAMED. */
static uint32_t reply_header(const lp_future *f) {
  uint32_t n = 0; /* (state read under mu, or after it was seen done) */
  if (f->state == LP_FINISHED && f->replylen >= 4) memcpy(&n, f->reply, 4);
  return n;
}

uint32_t luapool__future_nerr(lp_future *f) { return reply_header(f) & ~LP_REPLY_NAMED; }

int luapool__future_flagged(lp_future *f) { return (reply_header(f) & LP_REPLY_NAMED) != 0; }

int luapool__future_cancel(lp_future *f) {
  int moved = 0, held_started = 0; /* (its worker started it: not cancelled) */
  lock(f);
  lp_fstate st = f->state;
  if (st == LP_PENDING && f->held && f->pool) {
    /* Sent ahead to a worker: the engine's slot decides, atomically with
    ** the worker's start, under this lock (so no start of f in this
    ** process can come between the engine's answer and the transition). */
    const lp_future_hooks *h = atomic_load_explicit(&hooks, memory_order_acquire);
    if (h && h->cancel_held && !h->cancel_held(f->pool, f)) held_started = 1;
  }
  if (st == LP_PENDING && !held_started) {
    f->state = LP_CANCELLED;
    moved = 1;
    /* (A held task's message stays: its proxy may still be sending it.) */
    settle(f, LP_PENDING, !f->held);
  }
  unlock(f);
  if (st == LP_RUNNING && f->pool) {
    const lp_future_hooks *h = atomic_load_explicit(&hooks, memory_order_acquire);
    if (h && h->cancel_running) moved = h->cancel_running(f->pool, f);
  }
  return moved;
}

int luapool__future_cancel_running(lp_future *f) {
  int moved = 0;
  lock(f);
  if (f->state == LP_RUNNING) {
    f->state = LP_CANCELLED;
    moved = 1;
    settle(f, LP_RUNNING, 0);
  }
  unlock(f);
  return moved;
}

lp_fstate luapool__future_state(lp_future *f) {
  lock(f);
  lp_fstate s = f->state;
  unlock(f);
  return s;
}

static int is_done(lp_fstate s) { return s >= LP_FINISHED; }

/* The CLOCK_MONOTONIC time `timeout` seconds from now. */
static void deadline_in(struct timespec *dl, double timeout) {
  clock_gettime(CLOCK_MONOTONIC, dl);
  double whole = floor(timeout);
  if (whole > 1e9) whole = 1e9; /* ~31 years: forever, without overflow */
  dl->tv_sec += (time_t)whole;
  dl->tv_nsec += (long)((timeout - whole) * 1e9);
  if (dl->tv_nsec >= 1000000000L) {
    dl->tv_sec++;
    dl->tv_nsec -= 1000000000L;
  }
}

/* One wait on cv (mu held) until the deadline (timeout < 0: none).  With a
** signal handler installed, or inside a thread task (task), it waits at
** most SLICE, so a signal or the task's stop is seen within that.  ETIMEDOUT only when the real deadline has passed. */
#define SLICE 0.05

static int wait_slice(pthread_cond_t *cv, pthread_mutex_t *mu, double timeout, double start,
                      int task) {
  int sliced = task || atomic_load(&luapool__signals_handled);
  if (timeout < 0 && !sliced) return pthread_cond_wait(cv, mu);
  double left = timeout < 0 ? SLICE : start + timeout - luapool__now();
  if (left <= 0) return ETIMEDOUT;
  int last = timeout >= 0 && (!sliced || left <= SLICE); /* the real deadline */
  struct timespec dl;
  deadline_in(&dl, last ? left : SLICE);
  int r = pthread_cond_timedwait(cv, mu, &dl);
  return r == ETIMEDOUT && !last ? 0 : r;
}

static int signal_pending(void) { return luapool__signal_for_me(); }

/* Inside a thread task (a nested pool): has the task been told to stop, or
** has its deadline passed?  The deadline marks the task stopped by it, so
** its worker reports the timeout (as a kernel cut by it does). */
static int task_stopped(void) {
  double deadline;
  const lp_interrupt *i = luapool__thread_interrupt(&deadline);
  if (i == NULL) return 0;
  if (!luapool__interrupted(i) && deadline > 0 && luapool__now() >= deadline) luapool__stop_self(i);
  return luapool__interrupted(i);
}

/* A wait inside a thread task must notice its stop: it waits in slices
** too (no signal breaks a condition wait). */
static int in_task(void) {
  double deadline;
  return luapool__thread_interrupt(&deadline) != NULL;
}

int luapool__future_wait(lp_future *f, double timeout) {
  double start = luapool__now();
  int task = in_task();
  stripe *s = stripe_of(f); /* see "striped locks" */
  pthread_mutex_lock(&s->mu);
  /* Waiting for a task no worker runs yet: a pacing worker may be the one
  ** it waits for (pace_block).  Not for a running one: the workers that
  ** pace then are ahead of it, and going on would put them further ahead. */
  int blocks = timeout != 0 && f->state == LP_PENDING;
  if (blocks) pace_block(1); /* (under the stripe: pace.mu comes after) */
  f->nwaiters++;
  int r = 0, sig = 0, stop = 0;
  while (!is_done(f->state) && r != ETIMEDOUT && !(sig = signal_pending()) &&
         !(stop = task && task_stopped()))
    r = wait_slice(&s->cv, &s->mu, timeout, start, task);
  f->nwaiters--;
  if (blocks) pace_block(-1);
  int done = is_done(f->state);
  pthread_mutex_unlock(&s->mu);
  return done ? 1 : sig ? -1 : stop ? -2 : 0;
}

/* {====== the script's paths at submit */

lp_paths *luapool__paths_new(const char *path, size_t pl, const char *cpath, size_t cl,
                             uint64_t gen) {
  lp_paths *ps = lp_malloc(sizeof *ps + pl + cl + 2);
  if (ps == NULL) return NULL;
  atomic_init(&ps->refs, 1);
  ps->gen = gen;
  memcpy(ps->data, path, pl);
  ps->data[pl] = 0;
  memcpy(ps->data + pl + 1, cpath, cl);
  ps->data[pl + 1 + cl] = 0;
  ps->path = ps->data;
  ps->cpath = ps->data + pl + 1;
  return ps;
}

void luapool__paths_ref(lp_paths *ps) {
  atomic_fetch_add_explicit(&ps->refs, 1, memory_order_relaxed);
}

void luapool__paths_unref(lp_paths *ps) {
  if (ps && atomic_fetch_sub_explicit(&ps->refs, 1, memory_order_acq_rel) == 1) lp_free(ps);
}

/* }====== */

/* {====== completion queue: the C side (lfuture.c has its Lua face) */

lp_cq *luapool__cq_alloc(void) {
  lp_cq *q = lp_calloc(1, sizeof *q);
  if (q == NULL) return NULL;
  if (pthread_mutex_init(&q->mu, NULL) != 0) {
    lp_free(q);
    return NULL;
  }
  if (luapool__cond_init(&q->cv) != 0) {
    pthread_mutex_destroy(&q->mu);
    lp_free(q);
    return NULL;
  }
  return q;
}

/* Detaches every node not yet popped from its future, then frees the
** queue. */
void luapool__cq_free(lp_cq *q) {
  for (lp_wnode *n = q->all; n; n = n->anext) {
    lock(n->f);
    if (!n->fired) {
      lp_wnode **pp = &n->f->wnodes;
      while (*pp && *pp != n)
        pp = &(*pp)->fnext;
      if (*pp) *pp = n->fnext;
    }
    unlock(n->f);
  }
  for (lp_wnode *n = q->all, *next; n; n = next) {
    next = n->anext;
    luapool__future_unref(n->f);
    lp_free(n);
  }
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->cv);
  lp_free(q);
}

void luapool__cq_watch(lp_wnode *n) {
  lp_future *f = n->f;
  lock(f);
  if (is_done(f->state)) {
    fire(n);
  } else {
    n->fnext = f->wnodes;
    f->wnodes = n;
  }
  unlock(f);
}

int luapool__cq_wait(lp_cq *q, double timeout, double start, lp_wnode **out) {
  int task = in_task();
  pthread_mutex_lock(&q->mu);
  int blocks = timeout != 0 && q->head == NULL;
  if (blocks) pace_block(1);
  int r = 0, cut = 0; /* -1: a signal, -2: the task stopped; the caller raises, unlocked */
  while (q->head == NULL && r != ETIMEDOUT) {
    if (signal_pending())
      cut = -1;
    else if (task && task_stopped())
      cut = -2;
    if (cut) break;
    r = wait_slice(&q->cv, &q->mu, timeout, start, task);
  }
  if (blocks) pace_block(-1);
  lp_wnode *n = cut ? NULL : q->head;
  if (n) {
    q->head = n->qnext;
    if (q->head == NULL) q->tail = NULL;
  }
  pthread_mutex_unlock(&q->mu);
  if (cut) return cut;
  *out = n;
  return n != NULL;
}

int luapool__future_notify_on(lp_future *f, struct lp_pool *p, int *notified) {
  lock(f);
  int done = is_done(f->state);
  *notified = f->notify != NULL; /* earlier callbacks: poll clears the watch */
  if (!done && p) f->notify = p;
  unlock(f);
  return done;
}

/* }====== */

/* }====================================================== */
