/*
** A worker set: N threads taking tasks from the pool's queue one at a
** time, started on demand, and the deadline watchdog of thread workers.
** workers.h has the wake-up protocol; engine.h the lock order.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <time.h>

#include "base/alloc.h"
#include "base/util.h"
#include "core/workers.h"

/* How long a worker that found the queue empty watches for the next
** submit before it sleeps on s->cv: a few times the owner's cost of one
** submit, so that in a stream of tiny tasks the owner wakes nobody (a
** futex call and a context switch per task, on both sides) and a worker
** does not sleep between two of them; short enough that an idle pool
** burns nothing to speak of (it yields the CPU while it watches). */
#define SPIN_SECONDS 30e-6

/* Watches s->qseq (no lock held) until it moves past seq or the spin is
** over. */
static void spin_for_task(lp_wset *s, uint_fast64_t seq) {
  double end = luapool__now() + SPIN_SECONDS;
  for (;;) {
    for (int i = 0; i < 64; i++) {
      if (atomic_load_explicit(&s->qseq, memory_order_relaxed) != seq) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    if (luapool__now() >= end) return;
    sched_yield(); /* the owner may want this CPU */
  }
}

static void *worker_main(void *arg) {
  lp_worker *w = arg;
  lp_pool *p = w->pool;
  lp_wset *s = luapool__wset(p);
  const lp_worker_ops *ops = p->eng->workers;
  ops->start(w);
  for (;;) {
    pthread_mutex_lock(&p->mu);
    if (p->head == NULL && !p->closing) { /* spin a moment first */
      uint_fast64_t seq = atomic_load_explicit(&s->qseq, memory_order_relaxed);
      s->spinning++;
      pthread_mutex_unlock(&p->mu);
      spin_for_task(s, seq);
      pthread_mutex_lock(&p->mu);
      s->spinning--;
    }
    while (p->head == NULL && !p->closing) {
      s->idle++;
      pthread_cond_wait(&s->cv, &p->mu);
      s->idle--;
    }
    lp_future *f = luapool__pool_take(p);
    /* Started, numbered and marked busy before p->mu is let go (p->mu
    ** comes before the future's stripe in the lock order): an interrupt,
    ** which holds p->mu, finds each task either still queued (it is
    ** cancelled) or this worker busy with it (it is stopped).  Started
    ** after the unlock, a task taken just before an interrupt was neither
    ** and ran on (spec/core_test.c, "interrupt race").
    ** The new number: a stop aimed at an earlier task (a deadline that
    ** fired late) no longer matches.  (A call with a deadline takes a
    ** number of its own: worker.c; the engine tells the watchdog its
    ** deadline, luapool__worker_deadline.) */
    int run = f != NULL && luapool__future_start(f, w->name);
    if (run) {
      atomic_store(&w->intr.seq, atomic_load(&w->intr.seq) + 1);
      atomic_store(&w->busy, 1);
    }
    pthread_mutex_unlock(&p->mu);
    if (f == NULL) break; /* closing, and nothing left to run */
    if (run) {
      ops->run(w, f);
      atomic_store(&w->busy, 0);
    }
    luapool__future_unref(f);
    if (ops->pace) ops->pace(w);
    /* p->broken is written once, under the lock, before the queue is
    ** failed; a task taken before that still runs, which is harmless. */
  }
  ops->stop(w);
  pthread_mutex_lock(&p->mu);
  s->nalive--;
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

void luapool__worker_deadline(lp_worker *w, double deadline) {
  lp_pool *p = w->pool;
  lp_wset *s = luapool__wset(p);
  pthread_mutex_lock(&p->mu);
  w->deadline = deadline;
  if (deadline > 0) {
    w->deadline_seq = atomic_load(&w->intr.seq);
    if (s->wd_started) pthread_cond_signal(&s->wdcv);
  }
  pthread_mutex_unlock(&p->mu);
}

/* The deadline watchdog of a thread set: stops each task that outlives
** its deadline by aiming its worker's kill_seq at it (the worker's Lua
** hook and the kernels then give up), then sleeps until the next deadline.
** Process workers need none: each proxy waits for its reply with a
** timeout. */
static void *watchdog_main(void *arg) {
  lp_pool *p = arg;
  lp_wset *s = luapool__wset(p);
  pthread_mutex_lock(&p->mu);
  while (!s->wd_stop) {
    double now = luapool__now(), next = now + 1.0;
    for (int i = 0; i < s->nworkers; i++) {
      lp_worker *w = s->workers[i];
      if (w == NULL || w->deadline <= 0) continue;
      if (now >= w->deadline) {
        atomic_store(&w->intr.reason, LP_STOP_DEADLINE);
        atomic_store(&w->intr.kill_seq, w->deadline_seq);
        p->eng->workers->interrupt(w); /* at once, not at the next count */
        w->deadline = 0;               /* fired */
      } else if (w->deadline < next) {
        next = w->deadline;
      }
    }
    struct timespec ts;
    ts.tv_sec = (time_t)next;
    ts.tv_nsec = (long)((next - (double)ts.tv_sec) * 1e9);
    pthread_cond_timedwait(&s->wdcv, &p->mu, &ts);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

int luapool__wset_open(lp_pool *p, char *err, size_t errsz) {
  lp_wset *s = lp_calloc(1, sizeof *s);
  /* an array of pointers, one per worker */
  lp_worker **workers =
      lp_calloc((size_t)p->max_workers, sizeof *workers); // NOLINT(bugprone-sizeof-expression)
  if (s == NULL || workers == NULL) goto nomem;
  atomic_init(&s->qseq, 0);
  if (pthread_cond_init(&s->cv, NULL) != 0) goto nomem;
  if (luapool__cond_init(&s->wdcv) != 0) {
    pthread_cond_destroy(&s->cv);
    goto nomem;
  }
  s->workers = workers;
  p->es = s;
  return 0;
nomem:
  lp_free(workers);
  lp_free(s);
  snprintf(err, errsz, "cannot create a pool: not enough memory");
  return -1;
}

/* p->mu locked.  Starts worker number nworkers+1; -1 on failure. */
static int start_worker(lp_pool *p, lp_wset *s, char *err, size_t errsz) {
  int i = s->nworkers;
  const lp_worker_ops *ops = p->eng->workers;
  lp_worker *w = lp_calloc(1, ops->worker_size);
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
  if (ops->init) ops->init(w);
  int r = luapool__pool_thread(&w->thread, worker_main, w);
  if (r != 0) {
    snprintf(err, errsz, "cannot start a worker thread: %s", strerror(r));
    lp_free(w);
    return -1;
  }
  s->workers[i] = w;
  s->nworkers++;
  s->nalive++;
  return 0;
}

int luapool__wset_queued(lp_pool *p, char *err, size_t errsz) {
  lp_wset *s = luapool__wset(p);
  /* (npending counts the task just queued: idle < npending means it would
  ** find no idle worker of its own) */
  atomic_fetch_add_explicit(&s->qseq, 1, memory_order_relaxed); /* (a spinner's hint) */
  if (s->idle + s->spinning < (int)p->npending && s->nworkers < p->max_workers &&
      start_worker(p, s, err, errsz) != 0 && s->nworkers == 0)
    return -1; /* with no worker at all the task would wait forever */
  if (p->tail->timeout > 0 && p->eng->workers->watchdog && !s->wd_started &&
      luapool__pool_thread(&s->wd, watchdog_main, p) == 0)
    s->wd_started = 1; /* (without it, a deadline is still checked after) */
  if (s->idle > 0 && (int)p->npending > s->spinning) pthread_cond_signal(&s->cv);
  return 0;
}

void luapool__wset_interrupt(lp_pool *p) {
  lp_wset *s = luapool__wset(p);
  for (int i = 0; i < s->nworkers; i++) {
    lp_worker *w = s->workers[i];
    if (w->joined || !atomic_load(&w->busy)) continue;
    luapool__stop_task(&w->intr);
    p->eng->workers->interrupt(w);
  }
}

int luapool__wset_stop(lp_pool *p, int interrupt, int wait) {
  lp_wset *s = luapool__wset(p);
  pthread_mutex_lock(&p->mu);
  pthread_cond_broadcast(&s->cv);
  /* Workers are only started by the owner (submit), which is this
  ** thread: n cannot grow while we join. */
  int n = s->nworkers;
  if (interrupt)
    for (int i = 0; i < n; i++) {
      lp_worker *w = s->workers[i];
      if (w->joined) continue; /* by an earlier stop */
      atomic_store(&w->intr.closing, 1);
      p->eng->workers->interrupt(w);
    }
  pthread_mutex_unlock(&p->mu);
  if (!wait) return 0;
  int stuck = 0;
  lp_join j;
  luapool__join_begin(&j, interrupt);
  for (int i = 0; i < n; i++) {
    lp_worker *w = s->workers[i];
    if (w->joined) continue;
    if (!luapool__pool_join(p, w->thread, &j)) {
      stuck++;
      continue;
    }
    pthread_mutex_lock(&p->mu); /* read by interrupts from other threads */
    w->joined = 1;
    pthread_mutex_unlock(&p->mu);
  }
  if (stuck) return stuck; /* the watchdog stays: the stuck thread may use it */
  if (s->wd_started) {     /* deadlines were enforced until the last task ended */
    pthread_mutex_lock(&p->mu);
    s->wd_stop = 1;
    pthread_cond_signal(&s->wdcv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(s->wd, NULL);
    s->wd_started = 0;
  }
  return 0;
}

void luapool__wset_free(lp_pool *p) {
  lp_wset *s = luapool__wset(p);
  if (s == NULL) return;
  for (int i = 0; i < s->nworkers; i++)
    lp_free(s->workers[i]);
  pthread_cond_destroy(&s->wdcv);
  pthread_cond_destroy(&s->cv);
  lp_free(s->workers);
  lp_free(s);
  p->es = NULL;
}

void luapool__wset_stats(lp_pool *p, int *workers, int *idle) {
  lp_wset *s = luapool__wset(p);
  *workers = s->nalive;
  *idle = s->idle + s->spinning;
}
