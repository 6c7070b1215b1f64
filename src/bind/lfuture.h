/*
** The Lua faces of futures and completion queues (lfuture.c).  The pool
** they belong to is reached through lp_pool_face, which the pool's Lua face
** registers: this layer includes nothing of the pool.
*/
#ifndef LUAPOOL_LFUTURE_H
#define LUAPOOL_LFUTURE_H

#include <lua.h>

#include "base/buf.h"
#include "core/future.h"

#define LUAPOOL_FUTURE_MT "luapool.future"

void luapool__cq_open(lua_State *L);
int luapool__cq_new(lua_State *L); /* Lua: prims.cq() */
/* Pushes the metatable of the futures of the pool at pool_idx, made the
** first time (a pool keeps it, so a submit finds it without a lookup). */
void luapool__future_mt(lua_State *L, int pool_idx);
/* Pushes a userdata for f with the metatable at mt_idx (from
** luapool__future_mt) and returns it for luapool__future_fill: f may be
** NULL, filled later, so that the userdata's allocation, which may raise,
** happens while nothing needs freeing. */
void *luapool__future_push(lua_State *L, lp_future *f, int mt_idx);
void luapool__future_fill(void *ud, lp_future *f);
/* Pushes the pool userdata of the future userdata at idx. */
void luapool__future_push_pool(lua_State *L, int idx);
lp_future *luapool__check_future(lua_State *L, int idx);
int luapool__is_future(lua_State *L, int idx); /* a future's userdata? */
/* Pushes the values (at most maxvals, -1: all) of the next call of a done
** future's reply and returns their count; on an error outcome pushes the
** error object and returns -1.  r walks the reply call by call (set r->p
** to NULL before the first call); NULL means the first call. */
int luapool__future_outcome(lua_State *L, lp_future *f, lp_reader *r, int maxvals);
void luapool__future_open(lua_State *L);
/* Runs the callbacks of the future userdata at fidx (and clears them):
** an error in one is reported and the next runs, but an interruption
** (Ctrl-C while one ran) ends the run: 1 with the error object pushed, for
** the caller to raise once it has put back what it still owes; the
** future's later callbacks do not run (as a KeyboardInterrupt skips them
** in Python).  0 otherwise. */
int luapool__future_run_callbacks(lua_State *L, int fidx);
/* Runs callback cb on the future at fidx: the same outcome for one. */
int luapool__run_callback(lua_State *L, int cb, int fidx);

/* What a future's Lua face needs of its pool (executor.c registers it with
** luapool__future_set_pool_face when it opens, before any future exists). */
typedef struct lp_pool_face {
  /* Is a done callback owed at all?  (cheap; p non-NULL) */
  int (*owes)(struct lp_pool *p);
  /* Runs the done callbacks of the pool at pool_idx's finished futures. */
  void (*poll)(lua_State *L, int pool_idx);
  /* Remembers the future at fidx in the pool at pool_idx until its
  ** callbacks have run. */
  void (*watch)(lua_State *L, int pool_idx, int fidx);
  /* The pool of the pool userdata at idx; NULL when closed. */
  struct lp_pool *(*to_pool)(lua_State *L, int idx);
} lp_pool_face;
void luapool__future_set_pool_face(const lp_pool_face *face);

#endif
