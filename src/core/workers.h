/*
** A worker set (workers.c): the engine piece "N threads, one task each",
** with the deadline watchdog.  The thread and process engines are worker
** sets: they say how one worker starts, runs one task and stops
** (lp_worker_ops), and take the engine entry points from here
** (LP_WORKER_SET).  An engine that runs tasks otherwise (an event loop)
** does not use it.
**
** Wake-up protocol (every wait re-checks its condition under its mutex
** after waking, and every change that can satisfy it is made under that
** mutex before the wake, so no wake falls between a check and a wait):
**  - a set starts with no worker: only a submit (the owner, under p->mu)
**    starts one, when the idle workers do not outnumber the tasks already
**    queued (idle <= npending) and fewer than max_workers exist, so a task
**    that would find no idle worker gets a new one (up to the limit) and
**    workers are never started ahead of work;
**  - a worker that finds the queue empty first spins for a moment
**    (SPIN_SECONDS, workers.c) without the lock, counted in s->spinning,
**    watching s->qseq (bumped by every submit): a submit that a spinner
**    will take wakes nobody, so a burst of tiny tasks costs no futex call
**    per task on either side; after the spin it re-checks under the lock
**    and, the queue still empty, waits on s->cv;
**  - workers wait on s->cv while the queue is empty and the pool is not
**    closing; a submit signals when idle > 0 and the tasks queued outnumber
**    the spinners (each spinner takes one); a worker counts itself idle
**    from before its wait until after it woke, so a signalled worker that
**    has not run yet still counts and is matched against the task queued
**    before (a second submit then starts a new worker below the limit), and
**    it takes from the queue until it is empty before waiting again;
**    closing broadcasts;
**  - the watchdog waits on s->wdcv until the earliest deadline; a worker
**    that sets a deadline signals it under p->mu.
*/
#ifndef LUAPOOL_WORKERS_H
#define LUAPOOL_WORKERS_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "base/stop.h"
#include "core/engine.h"
#include "core/pool.h"

typedef struct lp_worker lp_worker;

struct lp_worker_ops {
  size_t worker_size; /* an engine's worker struct, lp_worker first */
  int watchdog;       /* deadlines need the set's watchdog thread (threads) */
  /* Owner, under p->mu, before the worker's thread exists (NULL: none). */
  void (*init)(lp_worker *w);
  /* The worker's own thread, before its first task. */
  int (*start)(lp_worker *w);
  /* The worker's own thread: runs f (started) and settles it. */
  void (*run)(lp_worker *w, lp_future *f);
  /* The worker's own thread, after each task, before it takes the next
  ** (NULL: none): it may wait there (pacing, threadpool.c). */
  void (*pace)(lp_worker *w);
  /* The worker's own thread, after its last task. */
  void (*stop)(lp_worker *w);
  /* Stops the running task now: only a signal or a kill, since it is
  ** called under p->mu (Ctrl-C, the watchdog, a closing stop). */
  void (*interrupt)(lp_worker *w);
};

struct lp_worker {
  lp_pool *pool;
  int index; /* 1-based */
  pthread_t thread;
  lp_interrupt intr;
  /* The running call's deadline, for the watchdog (mutex: p->mu). */
  double deadline;
  uint64_t deadline_seq;
  /* Its thread was joined (mutex: p->mu; the owner, which alone writes
  ** it, may read it without). */
  int joined;
  atomic_int busy; /* running a task */
  char name[64];
};

/* A worker set's state (p->es).  Mutex p->mu, except where said. */
typedef struct lp_wset {
  pthread_cond_t cv; /* workers wait here for tasks */
  int nworkers, idle;
  int spinning;              /* workers spinning for a task (idle too) */
  atomic_uint_fast64_t qseq; /* submits so far: what a spinner watches */
  int nalive;                /* worker threads that have not exited yet */
  lp_worker **workers;       /* [max_workers]; grows only on the owner's thread */
  pthread_t wd;              /* the deadline watchdog, started with the first
                       ** task that has a deadline */
  int wd_started;            /* owner only */
  int wd_stop;
  pthread_cond_t wdcv;
} lp_wset;

/* The worker set of pool p. */
static inline lp_wset *luapool__wset(lp_pool *p) { return (lp_wset *)p->es; }
/* A worker's call with a deadline starts, or ends (deadline 0): the
** watchdog learns it.  The worker's own thread, no lock held. */
void luapool__worker_deadline(lp_worker *w, double deadline);

int luapool__wset_open(lp_pool *p, char *err, size_t errsz);
int luapool__wset_queued(lp_pool *p, char *err, size_t errsz);
void luapool__wset_interrupt(lp_pool *p);
int luapool__wset_stop(lp_pool *p, int interrupt, int wait);
void luapool__wset_free(lp_pool *p);
void luapool__wset_stats(lp_pool *p, int *workers, int *idle);

/* The engine entry points of a worker set, for an lp_engine initialiser. */
#define LP_WORKER_SET(ops)                                                                         \
  .workers = (ops), .open = luapool__wset_open, .queued = luapool__wset_queued,                    \
  .interrupt = luapool__wset_interrupt, .stop = luapool__wset_stop, .free = luapool__wset_free,    \
  .stats = luapool__wset_stats

#endif
