/*
** The pool core: the queue every engine takes its tasks from, what a
** settling future tells its pool (counters, done callbacks), the
** live-pool list for Ctrl-C, and stop/break/interrupt in terms of the
** engine's entry points.  engine.h has the lock order and which thread
** may call what.
*/
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/alloc.h"
#include "base/ctrlc.h"
#include "base/util.h"
#include "codec/codec.h"
#include "codec/message.h"
#include "core/pool.h"

/* {====== the queue */

lp_future *luapool__pool_take(lp_pool *p) {
  lp_future *f = p->head;
  if (f) {
    p->head = f->next;
    if (p->head == NULL) p->tail = NULL;
    f->next = NULL;
    p->npending--;
  }
  return f;
}

void luapool__pool_requeue(lp_pool *p, lp_future *f) {
  if (p->broken) {
    luapool__future_fail(f, LP_EK_BROKEN, "%s", p->broken);
    luapool__future_unref(f);
    return;
  }
  f->next = p->head;
  p->head = f;
  if (p->tail == NULL) p->tail = f;
  p->npending++;
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
** or failed with kind "broken" and `why` when why is not NULL.  Returns
** the calls they held. */
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

/* p->broken when there was no memory for its copy of why: the pool must
** stay broken all the same (a NULL would let submits queue again). */
static char broken_no_memory[] = "the pool is broken (no memory to say why)";

void luapool__pool_break(lp_pool *p, const char *why) {
  pthread_mutex_lock(&p->mu);
  if (p->broken == NULL && (p->broken = lp_strdup(why)) == NULL) p->broken = broken_no_memory;
  lp_future *q = take_queue(p);
  pthread_mutex_unlock(&p->mu);
  end_list(q, why);
}
/* }====== */

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

/* f:cancel() on a running future: the engine may be able to stop it
** (no lock held). */
static int pool_cancel_running(lp_pool *p, lp_future *f) {
  return p->eng->cancel ? p->eng->cancel(p, f) : 0;
}

/* f:cancel() on a future its engine holds sent ahead (stripe locked). */
static int pool_cancel_held(lp_pool *p, lp_future *f) {
  return p->eng->cancel_held ? p->eng->cancel_held(p, f) : 1;
}

static const lp_future_hooks future_hooks = {.count = count_calls,
                                             .notify = pool_notify,
                                             .cancel_running = pool_cancel_running,
                                             .cancel_held = pool_cancel_held};
static pthread_once_t hooks_once = PTHREAD_ONCE_INIT;
static void hooks_install(void) { luapool__future_set_hooks(&future_hooks); }

lp_future *luapool__pool_take_callbacks(lp_pool *p) {
  pthread_mutex_lock(&p->cbmu);
  lp_future *list = p->cbhead, *rev = NULL;
  p->cbhead = NULL;
  atomic_store(&p->ncb, 0);
  pthread_mutex_unlock(&p->cbmu);
  while (list) { /* pushed newest first: reversed, oldest first */
    lp_future *next = list->cbnext;
    list->cbnext = rev;
    rev = list;
    list = next;
  }
  return rev;
}

void luapool__pool_return_callbacks(lp_pool *p, lp_future *oldest_first) {
  if (oldest_first == NULL) return;
  lp_future *newest = NULL;
  for (lp_future *f = oldest_first; f;) { /* back to newest first */
    lp_future *next = f->cbnext;
    f->cbnext = newest;
    newest = f;
    f = next;
  }
  pthread_mutex_lock(&p->cbmu);
  lp_future **tail = &p->cbhead; /* they are older than any owed since */
  while (*tail)
    tail = &(*tail)->cbnext;
  *tail = newest;
  atomic_store(&p->ncb, 1);
  pthread_mutex_unlock(&p->cbmu);
}
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

int luapool__pool_thread(pthread_t *t, void *(*fn)(void *), void *arg) {
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

void luapool__pool_forget(lp_pool *p) {
  pthread_mutex_lock(&live_mu);
  if (p->prev_live)
    p->prev_live->next_live = p->next_live;
  else if (live_head == p)
    live_head = p->next_live;
  if (p->next_live) p->next_live->prev_live = p->prev_live;
  p->prev_live = p->next_live = NULL;
  pthread_mutex_unlock(&live_mu);
}

/* live_mu held (or the pool not in the list). */
static void interrupt_locked(lp_pool *p) {
  pthread_mutex_lock(&p->mu);
  lp_future *q = take_queue(p);
  if (p->eng->cancel_held_all) p->eng->cancel_held_all(p); /* before the kills */
  p->eng->interrupt(p);
  pthread_mutex_unlock(&p->mu);
  end_list(q, NULL);
}

void luapool__pool_interrupt(lp_pool *p) {
  pthread_mutex_lock(&live_mu);
  interrupt_locked(p);
  pthread_mutex_unlock(&live_mu);
}

void luapool__interrupt_all(void) {
  pthread_mutex_lock(&live_mu);
  for (lp_pool *p = live_head; p; p = p->next_live)
    interrupt_locked(p);
  pthread_mutex_unlock(&live_mu);
}
/* }====== */

lp_pool *luapool__pool_create(const lp_engine *e, const lp_pool_config *c, const void *config,
                              char *init_msg, size_t init_len, lp_paths *paths, char *err,
                              size_t errsz) {
  pthread_once(&hooks_once, hooks_install); /* before this pool's first future */
  lp_pool *p = lp_calloc(1, sizeof *p);
  void *cfg = e->config_size ? lp_malloc(e->config_size) : NULL;
  if (p == NULL || (e->config_size && cfg == NULL)) goto nomem;
  if (cfg) memcpy(cfg, config, e->config_size);
  if (luapool__mutex_init_spinning(&p->mu) != 0) goto nomem;
  if (pthread_mutex_init(&p->cbmu, NULL) != 0) {
    pthread_mutex_destroy(&p->mu);
    goto nomem;
  }
  p->eng = e;
  p->config = cfg;
  p->max_workers = c->max_workers > 0 ? c->max_workers : e->default_workers(luapool__cpu_count());
  snprintf(p->name, sizeof p->name, "%s", c->name[0] ? c->name : e->kind);
  p->task_timeout = c->task_timeout;
  p->paths = paths;
  p->init_msg = init_msg;
  p->init_len = init_len;
  if (e->open(p, err, errsz) != 0) {
    pthread_mutex_destroy(&p->cbmu);
    pthread_mutex_destroy(&p->mu);
    lp_free(cfg);
    lp_free(p);
    return NULL; /* init_msg and paths stay the caller's */
  }
  live_add(p);
  return p;
nomem:
  lp_free(cfg);
  lp_free(p);
  snprintf(err, errsz, "cannot create a pool: not enough memory");
  return NULL;
}

int luapool__pool_submit(lp_pool *p, lp_future *f, char *err, size_t errsz) {
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
  luapool__future_ref(f);
  if (p->tail)
    p->tail->next = f;
  else
    p->head = f;
  p->tail = f;
  p->npending++;
  if (p->eng->queued(p, err, errsz) != 0) { /* nothing could ever run it: unqueue */
    lp_future **link = &p->head, *prev = NULL;
    while (*link != f)
      prev = *link, link = &(*link)->next;
    *link = NULL;
    p->tail = prev;
    p->npending--;
    pthread_mutex_unlock(&p->mu);
    luapool__future_unref(f);
    return -1;
  }
  f->pool = p; /* from here on its transitions move the pool's counters */
  atomic_fetch_add(&p->c_pending, (size_t)f->ncalls);
  pthread_mutex_unlock(&p->mu);
  return 0;
}

/* How long a thread may take to end once a signal stopped its task. */
#define SIGNAL_GRACE 0.5

/* How long a stop that interrupted its tasks waits for its threads (see
** luapool__join_begin). */
static double stop_grace(void) {
  return atomic_load(&luapool__ending_on_signal) ? SIGNAL_GRACE : 5.0;
}

void luapool__join_begin(lp_join *j, int interrupt) {
  j->began = luapool__now();
  j->give_up = interrupt ? j->began + stop_grace() : 0;
  j->stopped = 0;
}

int luapool__pool_join(lp_pool *p, pthread_t t, lp_join *j) {
  /* With the host's handler installed, a Ctrl-C during the wait stops the
  ** running tasks (the caller raises once the threads are gone).  When the
  ** tasks were told to stop, a thread that still runs after the grace is
  ** stuck where no stop reaches (a C call, a Lua message handler, which
  ** runs without hooks): it is left alone.  A Ctrl-C in a wait with no
  ** stop of its own (shutdown, <close>) starts that grace: joined with no
  ** limit, one task in os.execute held the script past its Ctrl-C, and
  ** one stuck for good held it for ever (helper-49). */
  while (j->give_up > 0 || atomic_load(&luapool__signals_handled)) {
    struct timespec ts; /* joins as soon as the thread ends, else 20 ms */
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 20000000L;
    if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
    if (pthread_timedjoin_np(t, NULL, &ts) == 0) return 1;
    if (!j->stopped && luapool__signal_for_me()) {
      luapool__pool_interrupt(p);
      j->stopped = 1;
      double soon = luapool__now() + SIGNAL_GRACE; /* (a closing pool's 5 s too) */
      if (j->give_up == 0 || j->give_up > soon) j->give_up = soon;
    }
    if (j->give_up > 0 && luapool__now() > j->give_up) {
      p->stuck_after = j->give_up - j->began; /* for its report (the owner's) */
      return 0;
    }
  }
  pthread_join(t, NULL);
  return 1;
}

int luapool__pool_stop(lp_pool *p, int wait, int cancel, int interrupt, lp_stop_counts *counts) {
  pthread_mutex_lock(&p->mu);
  p->closing = 1;
  lp_future *cancelled = cancel ? take_queue(p) : NULL;
  /* (the tasks an engine sent ahead count as queued, as in stats()) */
  size_t ncancelled = cancel && p->eng->cancel_held_all ? p->eng->cancel_held_all(p) : 0;
  pthread_mutex_unlock(&p->mu);
  /* Calls still running (an engine's own busy marks lag its futures'
  ** outcomes, which the owner may already have seen: the counters count). */
  size_t running = atomic_load(&p->c_running);
  ncancelled += end_list(cancelled, NULL);
  if (counts) *counts = (lp_stop_counts){ncancelled, interrupt ? running : 0};
  luapool__pace_kick(); /* (its workers may be pacing: future.h) */
  return p->eng->stop(p, interrupt, wait);
}

void luapool__pool_destroy(lp_pool *p) {
  luapool__pool_forget(p);
  p->eng->free(p);
  /* callbacks still owed (the pool was collected): dropped with it */
  for (lp_future *f = p->cbhead, *next; f; f = next) {
    next = f->cbnext;
    luapool__future_unref(f);
  }
  pthread_mutex_destroy(&p->cbmu);
  pthread_mutex_destroy(&p->mu);
  luapool__paths_unref(p->paths);
  lp_free(p->config);
  lp_free(p->init_msg);
  if (p->broken != broken_no_memory) lp_free(p->broken);
  lp_free(p);
}
