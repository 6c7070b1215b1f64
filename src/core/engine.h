/*
** The engine interface: what every pool kind implements (engines/), and
** what the pool core (core/pool.c) calls.  The core never asks which
** engine it has; the Lua layer reads only the properties below (kind,
** chunking).  A new engine is one file in engines/ and one entry in
** engines/engines.c's table.
**
** Lock order (a thread holding one may take only those to its right):
**   live_mu (pool.c) -> p->mu -> f->mu (future stripe) -> { q->mu (completion
**   queue), p->cbmu }
** Engine-private locks (a process worker's pidmu, a loop's queue lock) come
** after p->mu and before f->mu: an engine may take its own lock under
** p->mu, and settle a future under its own lock, never the reverse.
** No lock is held across a Lua call or a blocking system call, except that
** interrupt() runs under live_mu and p->mu and so must only signal (a
** pthread_kill, a kill(2), a write to an eventfd or wake-up pipe).
**
** Which thread may call what:
**
**   | thread                 | may call                                          |
**   | ---------------------- | ------------------------------------------------- |
**   | owner (the Lua state   | pool create/submit/shutdown/destroy, every        |
**   | that made the pool)    | engine entry point; the only one that starts      |
**   |                        | threads or joins them                             |
**   | engine threads         | luapool__pool_take (under p->mu), future_start/   |
**   | (workers, proxies,     | finish/fail/cancel_running, luapool__pool_break   |
**   | loops, progress)       | (no pool lock held); never the owner's Lua state  |
**   | watchdog (workers.c)   | the worker set's interrupt, under p->mu           |
**   | Ctrl-C (host's signal  | luapool__interrupt_all -> engine interrupt, under |
**   | thread, or an owner)   | live_mu and p->mu; never from a signal handler    |
**   | signal handler         | nothing here: it only sets the stop hook (wstate) |
**
** A future is queued on the pool core's queue (one reference held by the
** queue); an engine takes it with luapool__pool_take, starts it with
** luapool__future_start (which fails for one cancelled meanwhile) and
** settles it once with finish or fail.  It starts the future (and makes
** it visible to its interrupt()) before it lets go of p->mu: else an
** interrupt between the two finds the task neither queued nor running.
** (A task an engine sends ahead stays PENDING but is held: cancel_held
** below; it is taken under p->mu and marked held before p->mu goes, and
** luapool__pool_requeue gives it back unstarted.)  The pool's counters and done
** callbacks follow from the future core's hooks: an engine writes neither.
*/
#ifndef LUAPOOL_ENGINE_H
#define LUAPOOL_ENGINE_H

#include <stddef.h>

#include <lua.h> /* lua_Integer in option bounds */

#include "core/future.h"

typedef struct lp_pool lp_pool;
typedef struct lp_worker_ops lp_worker_ops; /* core/workers.h */

/* {====== options
** Every option of new() is described once, as data: its name, what it
** takes, and where its value goes.  The common options are the core's
** (pool.h's lp_pool_config); an engine lists its own, read into a struct of
** config_size bytes that the pool keeps (p->config).  bind/lpool.c reads
** both with Lua's rules, so every option refuses and reports alike. */
typedef enum {
  LP_OPT_INT,      /* integer in [min, max] (an integral float counts) */
  LP_OPT_SECONDS,  /* positive number of seconds, stored as double */
  LP_OPT_NAME,     /* non-empty string, stored in a char[48] */
  LP_OPT_CHOICE,   /* one of choices[], stored as its index (int) */
  LP_OPT_FUNCTION, /* a Lua function (read by the Lua face itself) */
  LP_OPT_TABLE,    /* a Lua table (likewise) */
  LP_OPT_BOOL      /* boolean, stored as int */
} lp_opt_type;

typedef struct lp_option {
  const char *name;
  lp_opt_type type;
  /* A worker process's own (its crash, its tasks, its memory): refused
  ** by an engine with none, whose foreign_note says why. */
  int per_process;
  lua_Integer min, max;       /* LP_OPT_INT: "integer from min to max expected" */
  const char *const *choices; /* LP_OPT_CHOICE: NULL-terminated */
  size_t offset;              /* into the config struct (not FUNCTION/TABLE) */
} lp_option;
/* }====== */

typedef struct lp_engine {
  const char *kind; /* "threadpool": the Lua constructor's name too */
  /* Why another engine's per-process options (lp_option.per_process) do
  ** not apply here, for the refusal ("threads share one process"); NULL:
  ** nothing to add. */
  const char *foreign_note;
  const lp_option *options; /* its own options, ended by {.name = NULL}; NULL: none */
  size_t config_size;       /* where they are read to (p->config), 0: nowhere */
  /* The struct config_size describes starts filled by this (NULL: zeros). */
  void (*config_defaults)(void *config);
  /* max_workers when the script gives none, from the CPU count. */
  int (*default_workers)(int ncpu);
  /* A call costs a round trip worth batching: map chunks items by itself
  ** (the Lua layer reads it as pool.chunking). */
  int chunking;
  /* How many tasks it runs at once in the whole pool, where that is not
  ** its workers (an event loop runs many): the Lua layer reads it as
  ** pool.concurrency, and imap keeps that many tasks in flight, one item
  ** each (a task's items would run one after another where the engine
  ** runs tasks at once).  NULL: its workers. */
  int (*concurrency)(const lp_pool *p);
  /* For worker-set engines (core/workers.c): how one worker starts, runs
  ** one task and stops.  NULL for engines that run tasks otherwise. */
  const lp_worker_ops *workers;

  /* Makes the engine's state (p->es) for a pool being created: no thread
  ** is started yet.  Owner, no lock.  0, or -1 with err. */
  int (*open)(lp_pool *p, char *err, size_t errsz);
  /* A future was just queued: make sure something will run it (start a
  ** worker, wake a loop).  Owner, under p->mu.  -1 with err only when
  ** nothing ever could (the future is then not queued). */
  int (*queued)(lp_pool *p, char *err, size_t errsz);
  /* Cancels f, which this engine started and is still running: 1 when f
  ** is now cancelled (luapool__future_cancel_running), 0 when a running
  ** task cannot be cancelled here.  Owner, no lock.  NULL: never. */
  int (*cancel)(lp_pool *p, lp_future *f);
  /* For an engine that sends a worker its next task before the one it
  ** runs ends (processes): such a task is held (f->held), PENDING and out
  ** of the queue.  cancel_held: f:cancel() on a held f, under f's stripe
  ** lock (so atomics only): 1 when its worker will never start it, 0 when
  ** it has.  cancel_held_all: cancels every held task not started yet, as
  ** the queue is cancelled (Ctrl-C, shutdown{cancel_futures}); under
  ** p->mu; the calls it cancelled.  NULL: the engine holds no task. */
  int (*cancel_held)(lp_pool *p, lp_future *f);
  size_t (*cancel_held_all)(lp_pool *p);
  /* shutdown{cancel_running = true}: cancels the running tasks too (an
  ** event loop aborts their transfers).  Owner, no lock, after the pool
  ** was closed and its queue cancelled.  NULL: running tasks cannot be
  ** cancelled here (the option is refused). */
  void (*cancel_running)(lp_pool *p);
  /* Stops every running task now (Ctrl-C: their futures fail with kind
  ** "interrupted"); the pool stays usable.  Any thread, under live_mu and
  ** p->mu: it only signals. */
  void (*interrupt)(lp_pool *p);
  /* The pool is closing (p->closing is set, the queue holds what is left
  ** to run): when interrupt, the running tasks are told to stop too; when
  ** wait, returns once every engine thread has ended (or the stop grace
  ** passed: the number of threads left running, and the pool must then
  ** not be freed).  Owner, no lock.  Called again after a wait = 0 call. */
  int (*stop)(lp_pool *p, int interrupt, int wait);
  /* Frees p->es after a stop that waited and returned 0.  Owner. */
  void (*free)(lp_pool *p);
  /* Threads (or loops, ranks) alive and idle, for stats().  Under p->mu. */
  void (*stats)(lp_pool *p, int *workers, int *idle);
} lp_engine;

#endif
