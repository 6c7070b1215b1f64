/*
** The pool core (pool.c): a queue of futures, the call counters, done
** callbacks owed to the owner, the live-pool list Ctrl-C walks, and the
** calls into the pool's engine (engine.h, which has the lock order and
** who may call what).  No Lua: a pool can be made and driven from C (a
** serving MPI rank does, and spec/core_test.c).
*/
#ifndef LUAPOOL_POOL_H
#define LUAPOOL_POOL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "core/engine.h"
#include "core/future.h"

/* The options every engine has (bind/lpool.c reads them from new{}). */
typedef struct lp_pool_config {
  int max_workers;     /* 0: the engine's default for this machine */
  char name[48];       /* "": the engine's kind */
  double task_timeout; /* seconds per call; 0: none */
} lp_pool_config;

struct lp_pool {
  const lp_engine *eng;
  void *es;     /* the engine's state (eng->open) */
  void *config; /* the engine's options (eng->options), config_size bytes */
  /* mu guards the queue, closing and broken, and what an engine says it
  ** guards in its state.  Not under it: the c_* counters and ncb
  ** (atomics), cbhead (cbmu), the live-pool links (pool.c's live_mu),
  ** what only the owner's thread writes and reads (paths, nsubmitted,
  ** drain), and what is fixed once the pool exists (eng, es, config,
  ** name, max_workers, task_timeout, init_msg). */
  pthread_mutex_t mu;
  lp_future *head, *tail; /* the queue: one reference to each */
  size_t npending;
  int max_workers;
  int closing; /* no more submits; engines end once the queue is empty */
  int drain;   /* shut down with wait = false: the work still runs, and
               ** collecting the pool (or the program's end) waits */
  char name[48];
  lp_paths *paths;          /* package.path/cpath as last submitted (owner only) */
  lp_pace_reads pace_reads; /* reads of its workers' pinned replies (core/future.h) */
  /* Calls (a map chunk counts its items) by where they are; atomics, as
  ** engine threads update them outside the lock (future core hooks). */
  atomic_size_t c_pending, c_running, c_done, c_failed, c_cancelled;
  /* Finished futures whose done callbacks the owner has yet to run. */
  pthread_mutex_t cbmu;
  lp_future *cbhead; /* mutex: cbmu; each holds a reference */
  atomic_int ncb;    /* non-zero when cbhead may be non-empty */
  double task_timeout;
  double stuck_after;                    /* seconds the last stop that gave up waited */
  uint64_t nsubmitted;                   /* owner only: numbers tasks for reports */
  struct lp_pool *prev_live, *next_live; /* all live pools (Ctrl-C); mutex: live_mu */
  char *init_msg;                        /* initializer + initargs as a task message */
  size_t init_len;
  char *broken; /* set once an initializer failed or a crash broke it: why (mutex: mu) */
};

/* Makes a pool of engine e (c: the common options, filled in with the
** engine's defaults where 0; config: the engine's options, copied;
** init_msg: the initializer's message or NULL, taken over; paths: a
** reference taken over).  NULL with err.  Owner. */
lp_pool *luapool__pool_create(const lp_engine *e, const lp_pool_config *c, const void *config,
                              char *init_msg, size_t init_len, lp_paths *paths, char *err,
                              size_t errsz);
/* Queues f (taking a reference) and tells the engine.  -1 with err when
** the pool cannot run it: closing, or no worker could be started at all.
** A broken pool fails f at once and returns 0.  Owner. */
int luapool__pool_submit(lp_pool *p, lp_future *f, char *err, size_t errsz);
/* Under p->mu: the oldest queued future (its reference passes to the
** caller), or NULL. */
lp_future *luapool__pool_take(lp_pool *p);
/* Under p->mu: puts f (its reference passes to the queue) back at the
** head of the queue: an engine gives back a task it held and never
** started.  On a broken pool f fails instead, as the queue did. */
void luapool__pool_requeue(lp_pool *p, lp_future *f);

/* What a stop did, for the note of a pool collected while open. */
typedef struct lp_stop_counts {
  size_t cancelled;   /* queued calls cancelled */
  size_t interrupted; /* running calls told to stop */
} lp_stop_counts;
/* Stops taking tasks; optionally cancels the queued ones, interrupts the
** running ones, and waits for the engine's threads.  Returns the number
** of threads that did not stop within the grace (then the pool must not
** be destroyed).  Owner. */
int luapool__pool_stop(lp_pool *p, int wait, int cancel, int interrupt, lp_stop_counts *counts);
/* Frees a pool whose stop waited and returned 0.  Owner. */
void luapool__pool_destroy(lp_pool *p);
/* Takes p out of the live list without freeing it (its threads were
** left running: they still use it). */
void luapool__pool_forget(lp_pool *p);

/* Cancels the queued tasks and stops the running ones; the pool stays
** usable.  Any thread holding no pool lock. */
void luapool__pool_interrupt(lp_pool *p);
/* Marks the pool broken (first reason wins) and fails every queued future
** with kind "broken".  Any thread holding no pool lock. */
void luapool__pool_break(lp_pool *p, const char *why);
/* Stops the work of every live pool (Ctrl-C). */
void luapool__interrupt_all(void);

/* The joins of one engine stop, shared by all of them. */
typedef struct lp_join {
  double began;   /* luapool__now() at the stop */
  double give_up; /* when the joins give up; 0: no limit (yet) */
  int stopped;    /* a Ctrl-C during the joins interrupted the pool */
} lp_join;
/* Starts a stop's joins: when the stop interrupted its tasks, with a
** limit of 5 seconds, or half a second once the host is ending on an
** uncaught Ctrl-C/SIGTERM (it must exit within a second); else none. */
void luapool__join_begin(lp_join *j, int interrupt);
/* Joins thread t of pool p for an engine's stop: with the host's signal
** handling, a Ctrl-C during the wait interrupts the pool (once) and
** brings j->give_up to half a second later at the most (when it is 0, a
** stop that interrupts nothing, it sets it); gives up at j->give_up when
** it is not 0, and then records in p->stuck_after how long it waited.
** 1 joined, 0 given up (the thread is left running). */
int luapool__pool_join(lp_pool *p, pthread_t t, lp_join *j);
/* Starts a thread for an engine with the asynchronous signals blocked, so
** SIGINT and SIGTERM reach the host and a dead socket never raises
** SIGPIPE in it.  pthread_create's result. */
int luapool__pool_thread(pthread_t *t, void *(*fn)(void *), void *arg);

/* The owed done callbacks, oldest first (their references pass to the
** caller), or NULL.  Owner. */
lp_future *luapool__pool_take_callbacks(lp_pool *p);
/* Gives back what is left of such a list (oldest first, with its
** references), ahead of anything owed since: the next poll runs it. */
void luapool__pool_return_callbacks(lp_pool *p, lp_future *oldest_first);
/* Whether a done callback may be owed (cheap). */
static inline int luapool__pool_owes(lp_pool *p) {
  return atomic_load_explicit(&p->ncb, memory_order_acquire);
}

/* Checks an initializer's reply: 0 when it succeeded, else -1 with the
** error text in msg. */
int luapool__reply_failed(const char *reply, size_t len, char *msg, size_t sz);

#endif
