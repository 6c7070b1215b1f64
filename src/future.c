/*
** Futures: a thread-safe state machine (C side) and its Lua face.
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

#include <lauxlib.h>
#include <lua.h>

#include "luapool.h"

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
  if (k < 0) return malloc(len);
  pthread_mutex_lock(&lists[k].mu);
  msgbuf *b = lists[k].head;
  if (b) {
    lists[k].head = b->next;
    lists[k].n--;
  }
  pthread_mutex_unlock(&lists[k].mu);
  return b ? (char *)b : malloc(((size_t)128 << k) - 8);
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
  free(p);
}
/* }====== */

static int is_done(lp_fstate s);

static void drop_msg(lp_future *f) {
  if (f->msg == NULL || f->msg == f->inline_buf)
    ;
  else if (f->msglen <= COPY_MSG_MAX)
    msg_free(f->msg, f->msglen); /* from msg_alloc */
  else
    free(f->msg); /* handed over by the submitter's buffer */
  f->msg = NULL;
}

/* The struct's size is its malloc chunk's (152 + glibc's 8-byte header is
** 160): a field added here is 16 bytes more per future, a million futures
** 16 MB more (docs/performance.md). */
_Static_assert(sizeof(void *) != 8 || sizeof(lp_future) <= 152, "lp_future outgrew its size class");

lp_future *luapool__future_new(lp_buf *b, int ncalls) {
  if (pthread_once(&stripes_once, stripes_init) != 0 || !stripes_ok) return NULL;
  lp_future *f = calloc(1, sizeof *f);
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
      free(f);
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
  if (f->state == LP_FINISHED && f->reply != f->inline_buf) free(f->reply);
  if (f->state == LP_FAILED) free(f->emsg);
  free(f);
}

struct lp_wnode {
  lp_future *f; /* holds a reference */
  lp_cq *q;
  int id;          /* the Lua-side slot of the future in its queue */
  int fired;       /* lock: f's stripe */
  lp_wnode *fnext; /* in f->wnodes (lock: f's stripe) */
  lp_wnode *qnext; /* in q's fired list (mutex: q->mu) */
  /* In q's list of nodes not yet popped (owner only): popping unlinks
  ** and frees a node, so the queue holds only what it has not handed out. */
  lp_wnode *anext, *aprev;
};

struct lp_cq {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  lp_wnode *head, *tail; /* fired, not yet popped (mutex: mu) */
  lp_wnode *all;         /* every node not yet popped (owner only) */
  int waiting;           /* registered, not yet popped (owner only) */
};

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

/* Moves the pool's call counters for a transition of f (stripe locked), so
** stats() agrees with the futures' states at every moment. */
static void count(lp_future *f, lp_fstate from, lp_fstate to) {
  lp_pool *p = f->pool;
  if (p == NULL) return;
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

/* Stripe locked: wakes whoever waits for the outcome. */
static void settle(lp_future *f, lp_fstate from) {
  count(f, from, f->state);
  for (lp_wnode *n = f->wnodes, *next; n; n = next) {
    next = n->fnext;
    fire(n);
  }
  f->wnodes = NULL;
  if (f->notify) luapool__pool_notify(f->notify, f);
  /* The task will not run (again): its message is dropped now rather
  ** than when the script lets go of the future.  Safe because settle runs
  ** on the thread that ran the task (after the message was consumed), or
  ** for a task that never started.  An inline message may already have
  ** been overwritten by the reply: only the pointer goes. */
  drop_msg(f);
  if (f->nwaiters > 0) pthread_cond_broadcast(&stripe_of(f)->cv);
}

int luapool__future_start(lp_future *f, const char *worker) {
  lock(f);
  int ok = f->state == LP_PENDING;
  if (ok) {
    f->state = LP_RUNNING;
    count(f, LP_PENDING, LP_RUNNING);
    f->worker = worker;
  }
  unlock(f);
  return ok;
}

void luapool__future_finish(lp_future *f, char *reply, size_t len, int copy) {
  char *own = copy ? NULL : reply; /* freed here unless f keeps it */
  int inl = len <= LP_INLINE;
  if (copy && !inl) {
    if ((own = malloc(len)) == NULL) {
      luapool__future_fail(f, LP_EK_TRANSFER, "no memory for the reply (%zu bytes)", len);
      return;
    }
    memcpy(own, reply, len);
  }
  lock(f);
  if (f->state == LP_RUNNING || f->state == LP_PENDING) {
    lp_fstate from = f->state;
    f->state = LP_FINISHED;
    if (inl) { /* over the message, consumed by now; a taken reply is freed */
      if (len && reply) memcpy(f->inline_buf, reply, len);
      f->reply = f->inline_buf;
    } else {
      f->reply = own;
      own = NULL;
    }
    f->replylen = len;
    settle(f, from);
  }
  unlock(f);
  free(own); /* copied inline, or it lost a race: already failed elsewhere */
}

int luapool__future_fail(lp_future *f, lp_ekind k, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  char *m = strdup(buf); /* NULL on no memory: the kind still tells */
  int moved = 0;
  lock(f);
  if (f->state == LP_RUNNING || f->state == LP_PENDING) {
    lp_fstate from = f->state;
    f->state = LP_FAILED;
    f->ekind = (unsigned char)k;
    f->emsg = m;
    m = NULL;
    moved = 1;
    settle(f, from);
  }
  unlock(f);
  free(m);
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
  int moved = 0;
  lock(f);
  if (f->state == LP_PENDING) {
    f->state = LP_CANCELLED;
    moved = 1;
    settle(f, LP_PENDING);
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
  f->nwaiters++;
  int r = 0, sig = 0, stop = 0;
  while (!is_done(f->state) && r != ETIMEDOUT && !(sig = signal_pending()) &&
         !(stop = task && task_stopped()))
    r = wait_slice(&s->cv, &s->mu, timeout, start, task);
  f->nwaiters--;
  int done = is_done(f->state);
  pthread_mutex_unlock(&s->mu);
  return done ? 1 : sig ? -1 : stop ? -2 : 0;
}

/* }====================================================== */

/* {======================================================
** Lua side
** ======================================================= */

/* The userdata: the future alone, no user value (a million futures are a
** million userdata: 40 bytes each, rather than 88 with the three user
** values it had).  What else a future needs lives elsewhere:
**  - its pool (so that a pool lives at least as long as a future the
**    script still holds): in its metatable, one per pool (a copy of the
**    registry's LUAPOOL_FUTURE_MT with the pool under FUTURE_KEY, which
**    also marks the metatable as a future's);
**  - its done callbacks and its error object (a future's error is one
**    object: exception() returns it and result() raises it each time),
**    which most futures never have: in a table {callbacks, error} made
**    the first time, in a registry table with weak keys (EXTRAS_KEY). */
typedef struct lfuture {
  lp_future *f;
} lfuture;

static const char FUTURE_KEY = 'f'; /* metatable field: the pool */
static const char MTS_KEY = 'm';    /* registry: pool -> its futures' metatable (weak keys) */
static const char EXTRAS_KEY = 'x'; /* registry: future -> {callbacks, error} (weak keys) */

enum { X_CALLBACKS = 1, X_ERROR = 2 };

/* Pushes the registry table at key, made (with weak keys) the first time. */
static void weak_table(lua_State *L, const void *key) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, key) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

static lfuture *test_future(lua_State *L, int idx) {
  lfuture *u = lua_touserdata(L, idx);
  if (u == NULL || !lua_getmetatable(L, idx)) return NULL;
  int t = lua_rawgetp(L, -1, &FUTURE_KEY);
  lua_pop(L, 2);
  return t == LUA_TUSERDATA && lua_rawlen(L, idx) == sizeof *u ? u : NULL;
}

static lfuture *check_lfuture(lua_State *L, int idx) {
  lfuture *u = test_future(L, idx);
  if (u == NULL) luaL_typeerror(L, idx, LUAPOOL_FUTURE_MT);
  return u;
}

int luapool__is_future(lua_State *L, int idx) { return test_future(L, idx) != NULL; }

/* Pushes the pool of the future userdata at idx. */
void luapool__future_push_pool(lua_State *L, int idx) {
  if (!lua_getmetatable(L, idx)) {
    lua_pushnil(L);
    return;
  }
  lua_rawgetp(L, -1, &FUTURE_KEY);
  lua_remove(L, -2);
}

/* Pushes the callbacks or error (k) of the future at idx (nil: none), and
** returns its type. */
static int get_extra(lua_State *L, int idx, int k) {
  idx = lua_absindex(L, idx);
  weak_table(L, &EXTRAS_KEY);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) != LUA_TTABLE) {
    lua_pop(L, 2);
    lua_pushnil(L);
    return LUA_TNIL;
  }
  int t = lua_rawgeti(L, -1, k);
  lua_replace(L, -3);
  lua_pop(L, 1);
  return t;
}

/* Sets the callbacks or error (k) of the future at idx to the value on
** top (popped), making its table of extras the first time. */
static void set_extra(lua_State *L, int idx, int k) {
  idx = lua_absindex(L, idx);
  weak_table(L, &EXTRAS_KEY); /* v, extras */
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) != LUA_TTABLE) { /* v, extras, nil */
    lua_pop(L, 1);
    lua_createtable(L, 2, 0);
    lua_pushvalue(L, idx);
    lua_pushvalue(L, -2);
    lua_rawset(L, -4);
  }
  lua_rotate(L, -3, -1); /* extras, t, v */
  lua_rawseti(L, -2, k);
  lua_pop(L, 2);
}

lp_future *luapool__check_future(lua_State *L, int idx) {
  lfuture *u = check_lfuture(L, idx);
  if (u->f == NULL) luaL_error(L, "attempt to use an unfinished future");
  return u->f;
}

/* Pushes the metatable of the futures of the pool at pool_idx, made the
** first time. */
static void push_pool_mt(lua_State *L, int pool_idx) {
  weak_table(L, &MTS_KEY);
  lua_pushvalue(L, pool_idx);
  if (lua_rawget(L, -2) == LUA_TTABLE) {
    lua_remove(L, -2);
    return;
  }
  lua_pop(L, 1);
  lua_createtable(L, 0, 5);
  luaL_getmetatable(L, LUAPOOL_FUTURE_MT);
  static const char *const fields[] = {"__index", "__gc", "__tostring", "__name"};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    lua_getfield(L, -1, fields[i]);
    lua_setfield(L, -3, fields[i]);
  }
  lua_pop(L, 1);
  lua_pushvalue(L, pool_idx);
  lua_rawsetp(L, -2, &FUTURE_KEY);
  lua_pushvalue(L, pool_idx);
  lua_pushvalue(L, -2);
  lua_rawset(L, -4); /* the pool's key is weak: the pool goes when nothing holds it */
  lua_remove(L, -2);
}

void luapool__future_push(lua_State *L, lp_future *f, int pool_idx) {
  pool_idx = lua_absindex(L, pool_idx);
  lfuture *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->f = f;
  push_pool_mt(L, pool_idx);
  lua_setmetatable(L, -2);
}

void luapool__future_set(lua_State *L, int idx, lp_future *f) { check_lfuture(L, idx)->f = f; }

static int future_gc(lua_State *L) {
  lfuture *u = check_lfuture(L, 1);
  if (u->f) {
    luapool__future_unref(u->f);
    u->f = NULL;
  }
  return 0;
}

/* A wait inside a thread task that the task's stop ended: the task fails
** as luapool.sleep does (its worker reports the deadline or the stop). */
static int raise_stopped(lua_State *L) {
  double deadline;
  const lp_interrupt *i = luapool__thread_interrupt(&deadline);
  if (i && atomic_load(&i->closing)) return luaL_error(L, "interrupted: the pool was closed");
  if (i && atomic_load(&i->reason) == LP_STOP_SIGNAL) return luaL_error(L, "interrupted: Ctrl-C");
  return luaL_error(L, "interrupted: the task's deadline passed");
}

/* Reads an optional timeout argument: nil -> -1 (forever). */
static double opt_timeout(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  lua_Number t = luaL_checknumber(L, idx);
  luaL_argcheck(L, t >= 0 && t == t, idx, "timeout must be a non-negative number");
  return t;
}

static const char *ekind_names[] = {"task",   "timeout",  "cancelled",  "crashed",
                                    "broken", "transfer", "interrupted"};

const char *luapool__ekind_name(lp_ekind k) { return ekind_names[k]; }

/* Decoding in protected mode: a reply the owner cannot take (a name its
** state does not know, no memory) becomes an error of kind "transfer". */
typedef struct pdecode_args {
  lp_reader *r;
  int n;
} pdecode_args;

static int pdecode(lua_State *L) {
  pdecode_args *a = lua_touserdata(L, 1);
  lua_pop(L, 1);
  luapool__decode(L, a->r, a->n);
  return a->n;
}

/* Pushes n decoded values (returns n), or an error object (returns -1).
** Only a reply that carries names or functions can fail to decode (a name
** unknown here); the worker flags such replies, and only those pay for
** the protected call. */
static int decode_values(lua_State *L, lp_future *f, lp_reader *r, int n) {
  pdecode_args a = {r, n};
  luaL_checkstack(L, n + 4, "reading a result");
  if (!luapool__future_flagged(f)) {
    luapool__decode(L, r, n);
    return n;
  }
  lua_pushcfunction(L, pdecode);
  lua_pushlightuserdata(L, &a);
  if (lua_pcall(L, 1, n, 0) == LUA_OK) return n;
  char label[48];
  lua_pushfstring(L, "cannot receive the result of %s: %s",
                  luapool__future_label(f, label, sizeof label), lua_tostring(L, -1));
  luapool__push_error(L, LP_EK_TRANSFER, lua_tostring(L, -1), NULL, f->worker, 0);
  lua_replace(L, -3);
  lua_pop(L, 1);
  return -1;
}

int luapool__future_outcome(lua_State *L, lp_future *f, lp_reader *rd, int maxvals) {
  /* A finished future's state and reply never change again: safe to read
  ** without the lock once a wait or a state read has seen it done. */
  lp_fstate s = luapool__future_state(f);
  if (s == LP_CANCELLED) {
    luapool__push_error(L, LP_EK_CANCELLED, "the task was cancelled", NULL, NULL, 0);
    return -1;
  }
  if (s == LP_FAILED) {
    luapool__push_error(L, (lp_ekind)f->ekind, f->emsg ? f->emsg : "(no memory for message)", NULL,
                        f->worker, 0);
    return -1;
  }
  lp_reader first = {NULL, NULL}, *r = rd ? rd : &first;
  if (rd == NULL || rd->p == NULL) { /* past the reply's error count */
    if (f->replylen < 4) luaL_error(L, "malformed reply");
    *r = (lp_reader){f->reply + 4, f->reply + f->replylen};
  }
  unsigned st;
  uint32_t n;
  luaL_checkstack(L, 8, "reading a result");
  if (luapool__get_u8(r, &st)) luaL_error(L, "malformed reply");
  if (st == LP_REPLY_TRANSFER || st == LP_REPLY_TIMEOUT) { /* a message only */
    const char *m;
    size_t l;
    if (luapool__get_string(r, &m, &l)) luaL_error(L, "malformed reply");
    lua_pushlstring(L, m, l);
    luapool__push_error(L, st == LP_REPLY_TIMEOUT ? LP_EK_TIMEOUT : LP_EK_TRANSFER,
                        lua_tostring(L, -1), NULL, f->worker, 0);
    lua_remove(L, -2);
    return -1;
  }
  if (st == LP_REPLY_OK) {
    if (luapool__get_u32(r, &n) || n > f->replylen) luaL_error(L, "malformed reply");
    int top = lua_gettop(L);
    if (decode_values(L, f, r, (int)n) < 0) return -1;
    if (maxvals >= 0 && (int)n > maxvals) lua_settop(L, top + maxvals);
    return lua_gettop(L) - top;
  }
  /* task error: message and traceback, then the error value */
  const char *m = NULL, *tb = NULL;
  size_t ml = 0, tl = 0;
  if (st != LP_REPLY_ERROR || luapool__get_string(r, &m, &ml) || luapool__get_string(r, &tb, &tl))
    luaL_error(L, "malformed reply");
  lua_pushlstring(L, m, ml);
  lua_pushlstring(L, tb, tl);
  if (decode_values(L, f, r, 1) < 0) { /* the value cannot: the text can */
    lua_pop(L, 1);
    lua_pushnil(L);
  }
  luapool__push_error(L, LP_EK_TASK, lua_tostring(L, -3), lua_tostring(L, -2), f->worker, -1);
  lua_replace(L, -4);
  lua_settop(L, lua_gettop(L) - 2);
  return -1;
}

/* Waits (raising a timeout error object when it expires). */
static void wait_done(lua_State *L, lp_future *f, double *timeout) {
  *timeout = opt_timeout(L, 2);
  int r = luapool__future_wait(f, *timeout);
  if (r == -2) raise_stopped(L);
  if (r < 0) luapool__check_signal(L);
  if (r <= 0) {
    lua_pushfstring(L, "no result after %f seconds", *timeout);
    luapool__push_error(L, LP_EK_TIMEOUT, lua_tostring(L, -1), NULL, NULL, 0);
    lua_error(L);
  }
}

/* Every future method first runs the done callbacks the owner owes
** (f->pool is alive: the future's userdata holds the pool's). */
static void poll_owed(lua_State *L, lp_future *f) {
  if (!luapool__pool_owes(f->pool)) return;
  luapool__future_push_pool(L, 1);
  luapool__pool_poll(L, -1);
  lua_pop(L, 1);
}

static lp_future *poll_future(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  poll_owed(L, f);
  return f;
}

/* The outcome of the done future whose userdata is at 1, as
** luapool__future_outcome pushes it; an error object is built once and
** kept with the userdata's extras (see lfuture). */
static int outcome(lua_State *L, lp_future *f, int maxvals) {
  if (get_extra(L, 1, X_ERROR) != LUA_TNIL) return -1;
  lua_pop(L, 1);
  int n = luapool__future_outcome(L, f, NULL, maxvals);
  if (n < 0) {
    lua_pushvalue(L, -1);
    set_extra(L, 1, X_ERROR);
  }
  return n;
}

static int future_result(lua_State *L) {
  double timeout;
  lp_future *f = poll_future(L);
  wait_done(L, f, &timeout);
  poll_owed(L, f); /* callbacks of what finished while we waited */
  int top = lua_gettop(L);
  int n = outcome(L, f, -1);
  if (n < 0) return lua_error(L);
  return lua_gettop(L) - top;
}

static int future_exception(lua_State *L) {
  double timeout;
  lp_future *f = poll_future(L);
  wait_done(L, f, &timeout);
  poll_owed(L, f);
  int n = outcome(L, f, 0);
  if (n < 0) return 1;
  lua_pushnil(L);
  return 1;
}

static int future_done(lua_State *L) {
  lp_future *f = poll_future(L);
  lua_pushboolean(L, is_done(luapool__future_state(f)));
  return 1;
}

static int future_running(lua_State *L) {
  lp_future *f = poll_future(L);
  lua_pushboolean(L, luapool__future_state(f) == LP_RUNNING);
  return 1;
}

static int future_cancelled(lua_State *L) {
  lp_future *f = poll_future(L);
  lua_pushboolean(L, luapool__future_state(f) == LP_CANCELLED);
  return 1;
}

static int future_cancel(lua_State *L) {
  lp_future *f = poll_future(L);
  if (luapool__future_cancel(f)) {
    luapool__future_push_pool(L, 1);
    luapool__pool_poll(L, -1); /* its callbacks run now */
    lua_pop(L, 1);
  }
  lua_pushboolean(L, luapool__future_state(f) == LP_CANCELLED);
  return 1;
}

/* Calls cb (at idx) with the future at fidx; an error is reported on
** stderr with its traceback and goes no further. */
static int cb_msgh(lua_State *L) {
  const char *m = lua_tostring(L, 1);
  if (m == NULL) m = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, m, 1);
  return 1;
}

void luapool__run_callback(lua_State *L, int cb, int fidx) {
  cb = lua_absindex(L, cb);
  fidx = lua_absindex(L, fidx);
  lua_pushcfunction(L, cb_msgh);
  lua_pushvalue(L, cb);
  lua_pushvalue(L, fidx);
  if (lua_pcall(L, 1, 0, -3) != LUA_OK) {
    fprintf(stderr, "luapool: error in a done callback: %s\n", lua_tostring(L, -1));
    fflush(stderr);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Runs the callbacks list of the future at fidx and clears it. */
void luapool__future_run_callbacks(lua_State *L, int fidx) {
  fidx = lua_absindex(L, fidx);
  if (get_extra(L, fidx, X_CALLBACKS) != LUA_TTABLE) {
    lua_pop(L, 1);
    return;
  }
  lua_pushnil(L);
  set_extra(L, fidx, X_CALLBACKS); /* exactly once, even if one re-adds */
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    luapool__run_callback(L, -1, fidx);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static int future_add_done_callback(lua_State *L) {
  lp_future *f = poll_future(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  luapool__future_push_pool(L, 1); /* 3: the pool */
  lp_pool *p = luapool__to_pool(L, 3);
  /* Lua work first (it may raise), then the decision under the lock. */
  if (get_extra(L, 1, X_CALLBACKS) != LUA_TTABLE) { /* 4: callbacks */
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    set_extra(L, 1, X_CALLBACKS);
  }
  if (p) luapool__pool_watch(L, 3, 1);
  lock(f);
  int done = is_done(f->state);
  int notified = f->notify != NULL; /* earlier callbacks: poll clears the watch */
  if (!done && p) f->notify = p;
  unlock(f);
  if (done && p && !notified) { /* nothing will clear the watch: do it now */
    lua_getiuservalue(L, 3, 1);
    lua_pushlightuserdata(L, f);
    lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  if (done || p == NULL) {
    luapool__run_callback(L, 2, 1);
  } else {
    lua_pushvalue(L, 2);
    lua_rawseti(L, 4, (lua_Integer)lua_rawlen(L, 4) + 1);
  }
  return 0;
}

static int future_tostring(lua_State *L) {
  static const char *const names[] = {"pending", "running", "finished", "failed", "cancelled"};
  lp_future *f = luapool__check_future(L, 1);
  lua_pushfstring(L, "luapool.future (%s): %p", names[luapool__future_state(f)], (void *)f);
  return 1;
}

static const luaL_Reg future_methods[] = {{"result", future_result},
                                          {"exception", future_exception},
                                          {"done", future_done},
                                          {"running", future_running},
                                          {"cancelled", future_cancelled},
                                          {"cancel", future_cancel},
                                          {"add_done_callback", future_add_done_callback},
                                          {NULL, NULL}};

/* {======================================================
** Completion queue (luapool.cq): add futures, pop them as they finish
** ======================================================= */

#define LUAPOOL_CQ_MT "luapool.cq"

typedef struct lcq {
  lp_cq *q; /* NULL once closed */
  int nextid;
} lcq;

/* Detaches every node not yet popped from its future, then frees the
** queue. */
static void cq_release(lp_cq *q) {
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
    free(n);
  }
  pthread_mutex_destroy(&q->mu);
  pthread_cond_destroy(&q->cv);
  free(q);
}

static lcq *check_cq(lua_State *L) {
  lcq *u = luaL_checkudata(L, 1, LUAPOOL_CQ_MT);
  if (u->q == NULL) luaL_error(L, "attempt to use a closed completion queue");
  return u;
}

/* The queue's user values hold only what it has not handed out:
**   1: id -> future, for the futures added and not yet popped (the node
**      of each holds the id; pop clears the entry);
**   2: future -> true for every future added, weak keys: add finds a
**      duplicate there without keeping a popped future alive. */
int luapool__cq_new(lua_State *L) {
  lcq *u = lua_newuserdatauv(L, sizeof *u, 2);
  u->q = NULL;
  u->nextid = 0;
  luaL_setmetatable(L, LUAPOOL_CQ_MT);
  lua_newtable(L);
  lua_setiuservalue(L, -2, 1);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_setiuservalue(L, -2, 2);
  lp_cq *q = calloc(1, sizeof *q);
  if (q == NULL) return luaL_error(L, "not enough memory");
  if (pthread_mutex_init(&q->mu, NULL) != 0) {
    free(q);
    return luaL_error(L, "not enough memory");
  }
  if (luapool__cond_init(&q->cv) != 0) {
    pthread_mutex_destroy(&q->mu);
    free(q);
    return luaL_error(L, "not enough memory");
  }
  u->q = q;
  return 1;
}

/* q:add(future) -> true, or false when it was added before */
static int cq_add(lua_State *L) {
  lcq *u = check_cq(L);
  lp_future *f = luapool__check_future(L, 2);
  lua_settop(L, 2);
  lua_getiuservalue(L, 1, 2); /* 3: added */
  lua_pushvalue(L, 2);
  if (lua_rawget(L, 3) != LUA_TNIL) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pop(L, 1);
  /* Lua work first (it may raise), then the node. */
  lua_getiuservalue(L, 1, 1); /* 4: id -> future */
  int id = u->nextid + 1;
  lua_pushvalue(L, 2);
  lua_rawseti(L, 4, id);
  lua_pushvalue(L, 2);
  lua_pushboolean(L, 1);
  lua_rawset(L, 3);
  lp_wnode *n = calloc(1, sizeof *n);
  if (n == NULL) { /* undo: clearing entries allocates nothing */
    lua_pushnil(L);
    lua_rawseti(L, 4, id);
    lua_pushvalue(L, 2);
    lua_pushnil(L);
    lua_rawset(L, 3);
    return luaL_error(L, "not enough memory");
  }
  u->nextid = id;
  luapool__future_ref(f);
  n->f = f;
  n->q = u->q;
  n->id = id;
  n->anext = u->q->all;
  if (n->anext) n->anext->aprev = n;
  u->q->all = n;
  u->q->waiting++;
  lock(f);
  if (is_done(f->state)) {
    fire(n);
  } else {
    n->fnext = f->wnodes;
    f->wnodes = n;
  }
  unlock(f);
  lua_pushboolean(L, 1);
  return 1;
}

/* q:pop([timeout]) -> the next future to finish; nil on timeout; false
** when every future added has been popped.  The queue lets go of the
** future it hands out (its entry, its node and the node's reference): a
** loop that drops each future after using it runs in flat memory. */
static int cq_pop(lua_State *L) {
  lcq *u = check_cq(L);
  double timeout = opt_timeout(L, 2);
  lp_cq *q = u->q;
  if (q->waiting == 0) {
    lua_pushboolean(L, 0);
    return 1;
  }
  double start = luapool__now();
  int task = in_task();
  pthread_mutex_lock(&q->mu);
  int r = 0;
  while (q->head == NULL && r != ETIMEDOUT) {
    if (signal_pending()) { /* raise with no lock held */
      pthread_mutex_unlock(&q->mu);
      luapool__check_signal(L);
      pthread_mutex_lock(&q->mu);
      continue;
    }
    if (task && task_stopped()) {
      pthread_mutex_unlock(&q->mu);
      return raise_stopped(L);
    }
    r = wait_slice(&q->cv, &q->mu, timeout, start, task);
  }
  lp_wnode *n = q->head;
  if (n) {
    q->head = n->qnext;
    if (q->head == NULL) q->tail = NULL;
  }
  pthread_mutex_unlock(&q->mu);
  if (n == NULL) {
    lua_pushnil(L);
    return 1;
  }
  /* A fired node is out of its future's list, and fire() no longer
  ** touches it once it is in the fired list: it is the owner's alone. */
  q->waiting--;
  if (n->aprev)
    n->aprev->anext = n->anext;
  else
    q->all = n->anext;
  if (n->anext) n->anext->aprev = n->aprev;
  int id = n->id;
  lp_future *f = n->f;
  free(n);
  lua_getiuservalue(L, 1, 1);
  lua_rawgeti(L, -1, id); /* the future: its userdata holds a reference */
  lua_pushnil(L);
  lua_rawseti(L, -3, id);
  luapool__future_unref(f);
  luapool__future_push_pool(L, -1); /* the future's pool: its callbacks are due */
  luapool__pool_poll(L, -1);
  lua_pop(L, 1);
  return 1;
}

static int cq_pending(lua_State *L) {
  lua_pushinteger(L, check_cq(L)->q->waiting);
  return 1;
}

static int cq_close(lua_State *L) {
  lcq *u = luaL_checkudata(L, 1, LUAPOOL_CQ_MT);
  if (u->q) {
    cq_release(u->q);
    u->q = NULL;
    lua_pushnil(L); /* what was not popped goes too */
    lua_setiuservalue(L, 1, 1);
  }
  return 0;
}

static const luaL_Reg cq_methods[] = {
    {"add", cq_add}, {"pop", cq_pop}, {"pending", cq_pending}, {"close", cq_close}, {NULL, NULL}};

void luapool__cq_open(lua_State *L) {
  if (luaL_newmetatable(L, LUAPOOL_CQ_MT)) {
    luaL_newlib(L, cq_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, cq_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, cq_close);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
}

/* }====================================================== */

void luapool__future_open(lua_State *L) {
  if (luaL_newmetatable(L, LUAPOOL_FUTURE_MT)) {
    luaL_newlib(L, future_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, future_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, future_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}

/* }====================================================== */
