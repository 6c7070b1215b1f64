/*
** The stop block: how the owner (a deadline, a closing pool, Ctrl-C) tells
** the task a worker runs to stop.  The worker owns the block,
** anyone holding a pointer to it may read or set it (atomics, no lock).
*/
#ifndef LUAPOOL_STOP_H
#define LUAPOOL_STOP_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* How a worker tells its running task to stop.  `closing` stops whatever
** runs (the pool is going away, Ctrl-C); `kill_seq` stops only the task
** whose sequence number it names (a deadline), so a stop that arrives late
** can never hit the task after it. */
typedef struct lp_interrupt {
  atomic_int closing;
  atomic_uint_fast64_t seq;      /* the running task's number */
  atomic_uint_fast64_t kill_seq; /* stop the task with this number */
  atomic_int reason;             /* why kill_seq was set: LP_STOP_* */
} lp_interrupt;

enum { LP_STOP_DEADLINE = 1, LP_STOP_SIGNAL = 2 };

static inline int luapool__interrupted(const lp_interrupt *i) {
  return i != NULL && (atomic_load_explicit(&i->closing, memory_order_relaxed) ||
                       atomic_load_explicit(&i->kill_seq, memory_order_relaxed) ==
                           atomic_load_explicit(&i->seq, memory_order_relaxed));
}

/* The running task was stopped by Ctrl-C (not by its deadline). */
static inline int luapool__signal_stopped(const lp_interrupt *i) {
  return atomic_load(&i->kill_seq) == atomic_load(&i->seq) &&
         atomic_load(&i->reason) == LP_STOP_SIGNAL;
}

/* The running task was stopped as a whole: the pool closes, or Ctrl-C.
** Not a failure of the task's own, so nothing is broken by it. */
static inline int luapool__stopped_whole(const lp_interrupt *i) {
  return atomic_load(&i->closing) || luapool__signal_stopped(i);
}

/* Ctrl-C stops the task running now, whichever call of it runs: kill_seq
** follows seq until seq holds still, and a call that takes a new number
** meanwhile (luapool__stop_renumber) carries a signal stop over, so no
** interleaving of the two loses the stop. */
static inline void luapool__stop_task(lp_interrupt *i) {
  atomic_store(&i->reason, LP_STOP_SIGNAL);
  uint_fast64_t s;
  do {
    s = atomic_load(&i->seq);
    atomic_store(&i->kill_seq, s);
  } while (atomic_load(&i->seq) != s);
}

/* The next call of the running task takes a new number: a deadline stop
** aimed at the call before misses it, a signal stop of the task does not
** (see luapool__stop_task). */
static inline void luapool__stop_renumber(lp_interrupt *i) {
  uint_fast64_t old = atomic_load(&i->seq);
  atomic_store(&i->seq, old + 1);
  if (atomic_load(&i->reason) == LP_STOP_SIGNAL)
    atomic_compare_exchange_strong(&i->kill_seq, &old, old + 1);
}

/* A kernel whose wait was cut by the task's deadline marks its task as
** stopped by it, so the worker reports the timeout whatever the clocks
** say.  (The block is the worker's, never really const.) */
static inline void luapool__stop_self(const lp_interrupt *i) {
  lp_interrupt *w = (lp_interrupt *)i;
  if (w == NULL) return;
  atomic_store(&w->reason, LP_STOP_DEADLINE);
  atomic_store(&w->kill_seq, atomic_load(&w->seq));
}

/* The stop block and deadline of the task running on the calling thread
** (set by the worker runtime as a task starts; NULL and 0 elsewhere), so
** a wait inside a task (a future's result) ends with the task (stop.c). */
void luapool__set_thread_stop(const lp_interrupt *i, const double *deadline);
const lp_interrupt *luapool__thread_interrupt(double *deadline);

#endif
