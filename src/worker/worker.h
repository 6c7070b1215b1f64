/*
** Running a task message in a worker (worker.c): every call, its reply.
*/
#ifndef LUAPOOL_WORKER_H
#define LUAPOOL_WORKER_H

#include <stddef.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "codec/message.h"
#include "worker/wstate.h"

#include <lua.h>

/* Runs every call of msg, appending the reply to out.  Returns 0, or -1 when
** out of memory (the caller fails the future). */
int luapool__run_message(lp_wstate *ws, const char *msg, size_t len, lp_buf *out);

/* {====== pinned strings (a thread worker's; core/future.h says why)
** A thread engine sets ws->pins to a zeroed lp_wpins of its own; then a
** reply refers to each string of at least LP_PIN_MIN bytes (codec.h) in
** ws's state instead of copying it.  All on the worker's thread. */
typedef struct lp_wpins {
  struct lp_pinned *live;      /* anchored in the state (a registry table) */
  lp_buf cur;                  /* the lp_pinned * of the reply being built */
  struct lp_pace_reads *reads; /* the pool's, which pacing watches (core/future.h) */
} lp_wpins;
/* Unanchors the strings no reply holds any more: before each task.
** Returns the bytes of those in replies the owner has not read yet. */
size_t luapool__pins_sweep(lp_wstate *ws);
/* The reply in out is to be handed over: appends its pins (each
** lp_pinref, then their count as a u64) for
** luapool__future_finish_pinned.  1 it has pins, 0 none (out as it
** was), -1 no memory (the pins are dropped; the reply must not go). */
int luapool__pins_seal(lp_wstate *ws, lp_buf *out);
/* The reply being built will not be handed over: its pins go. */
void luapool__pins_drop(lp_wstate *ws);
/* Closes ws's state (luapool__wstate_close); the strings replies still
** hold keep their memory, which the last of those replies frees. */
void luapool__pins_close(lp_wstate *ws);
/* }====== */

/* {====== a thread worker state's big blocks
** A thread engine sets ws->big to a zeroed lp_wbig of its own; then the
** worker's Lua state takes every block of LP_BIG_MIN bytes or more from
** its own heap of huge-page regions (base/alloc.h), and small blocks from
** malloc as luaL_newstate's do.  A big result string's pages are faulted
** in 2 MiB at a time, and what the state frees is used again for its next
** big blocks; all of it goes back to the system when the state closes
** (the blocks of strings replies still hold go when the last of those
** replies does).  All on the worker's thread. */
typedef struct lp_wbig {
  lp_bigheap heap;
  /* Big blocks Lua shrank below LP_BIG_MIN when malloc had no small block
  ** for them (a shrink must not fail), linked by luapool__big_link: a
  ** block of a small size is one of these only while this is not NULL. */
  void *shrunk;
} lp_wbig;
/* }====== */

/* ws's Lua state, created on first use (NULL: no memory). */
lua_State *luapool__worker_lua(lp_wstate *ws);

/* "task #N exceeded its deadline of T seconds in worker W" (or "item #K"
** for call `call` of a map chunk starting at item_lo), into m. */
void luapool__deadline_message(char *m, size_t sz, uint64_t task_no, int64_t item_lo, uint32_t call,
                               double timeout, const char *worker);

/* {====== a task as a coroutine (an event loop's Lua tasks)
** The message's calls run inside one coroutine of ws's state, decoded and
** answered as luapool__run_message does; a call may yield to the loop (it
** parks the coroutine on a request or a timer: wstate.h's luapool__io_*)
** and the loop resumes it later.  msg must stay valid until the task is
** freed; ws is shared by the loop's tasks (each resume gives it the
** task's deadline and numbers, and takes them back). */
typedef struct lp_cotask lp_cotask;
enum { LP_CO_YIELD = 1, LP_CO_DONE = 2 };
/* NULL when out of memory.  Its coroutine exists (made in ws's state,
** which is created if need be), but nothing runs until the first resume. */
lp_cotask *luapool__co_new(lp_wstate *ws, const char *msg, size_t len, double call_timeout,
                           uint64_t task_no, int64_t item_lo);
/* Runs the task until it yields (LP_CO_YIELD) or its reply is whole
** (LP_CO_DONE); -1 when out of memory building it.  A yield of exactly
** two light userdata leaves them in yielded (a request handed to the loop:
** kernels/httploop.h), else NULLs. */
int luapool__co_resume(lp_cotask *t, void *yielded[2]);
/* Its coroutine. */
lua_State *luapool__co_thread(const lp_cotask *t);
/* Ends a task stopped from outside without resuming it (a closing pool):
** the call it was in replies an error with message m, and the calls after
** it are not run.  -1: no memory. */
int luapool__co_end(lp_cotask *t, const char *m);
/* The whole reply, taken (malloc'd; the caller frees it). */
char *luapool__co_reply(lp_cotask *t, size_t *len);
/* Closes its coroutine (its pending to-be-closed variables run) and frees
** it.  NULL: nothing. */
void luapool__co_free(lp_cotask *t);
/* }====== */

#endif
