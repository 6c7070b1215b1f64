/*
** The Lua faces of futures (luapool.future) and completion queues
** (luapool.cq), over the C side in future.c.  Owner's thread only: every
** function here runs on the Lua state that holds the userdata.
*/
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "base/alloc.h"
#include "codec/codec.h"
#include "base/ctrlc.h"
#include "bind/errors.h"
#include "core/future.h"
#include "bind/lfuture.h"
#include "codec/message.h"
#include "base/stop.h"
#include "base/util.h"
#include "worker/wstate.h"

/* The pool's Lua face (executor.c sets it when it opens, before the first
** future userdata exists). */
static _Atomic(const lp_pool_face *) the_pool_face;

void luapool__future_set_pool_face(const lp_pool_face *face) { atomic_store(&the_pool_face, face); }

static const lp_pool_face *pool_face(void) {
  return atomic_load_explicit(&the_pool_face, memory_order_acquire);
}

/* {======================================================
** Lua side
** ======================================================= */

/* The userdata: the future alone, no user value (a million futures are a
** million userdata: 40 bytes each, rather than 88 with the three user
** values it had).  What else a future needs lives elsewhere:
**  - its pool (so that a pool lives at least as long as a future the
**    script still holds): in its metatable, one per pool (a copy of the
**    registry's LUAPOOL_FUTURE_MT with a mark, &FUTURE_KEY, at [1] and the
**    pool at [2]: array slots, so that checking a future on every call is
**    two array reads, not a hash lookup);
**  - its done callbacks and its error object (a future's error is one
**    object: exception() returns it and result() raises it each time),
**    which most futures never have: in a table {callbacks, error} made
**    the first time, in a registry table with weak keys (EXTRAS_KEY);
**    the C future's owner_bits say which it has (X_CALLBACKS | X_ERROR),
**    so that a result() of a future with none (the common case) never
**    looks there, and the userdata stays one pointer. */
typedef struct lfuture {
  lp_future *f;
} lfuture;

static const char FUTURE_KEY = 'f'; /* metatable[1]: marks a future's metatable */
static const char MTS_KEY = 'm';    /* registry: pool -> its futures' metatable (weak keys) */
static const char EXTRAS_KEY = 'x'; /* registry: future -> {callbacks, error} (weak keys) */

enum { X_CALLBACKS = 1, X_ERROR = 2 }; /* slots of the extras table; bits of f->owner_bits */

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
  lua_rawgeti(L, -1, 1);
  int mine = lua_touserdata(L, -1) == &FUTURE_KEY;
  lua_pop(L, 2);
  return mine && lua_rawlen(L, idx) == sizeof *u ? u : NULL;
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
  lua_rawgeti(L, -1, 2);
  lua_remove(L, -2);
}

/* Pushes the callbacks or error (k) of the future at idx (nil: none), and
** returns its type. */
static int get_extra(lua_State *L, int idx, int k) {
  lfuture *u = lua_touserdata(L, idx); /* (checked by the caller) */
  if (u->f == NULL || !(u->f->owner_bits & k)) {
    lua_pushnil(L);
    return LUA_TNIL;
  }
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
  lfuture *u = lua_touserdata(L, idx); /* (checked by the caller: a filled future) */
  u->f->owner_bits |= (unsigned char)k;
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
  /* (a script meets one only after its collection: from a finalizer that
  ** still holds it; a userdata born empty never reaches a script) */
  if (u->f == NULL) luaL_error(L, "attempt to use a collected future");
  return u->f;
}

/* Pushes the metatable of the futures of the pool at pool_idx, made the
** first time. */
void luapool__future_mt(lua_State *L, int pool_idx) {
  pool_idx = lua_absindex(L, pool_idx);
  weak_table(L, &MTS_KEY);
  lua_pushvalue(L, pool_idx);
  if (lua_rawget(L, -2) == LUA_TTABLE) {
    lua_remove(L, -2);
    return;
  }
  lua_pop(L, 1);
  lua_createtable(L, 2, 4);
  luaL_getmetatable(L, LUAPOOL_FUTURE_MT);
  static const char *const fields[] = {"__index", "__gc", "__tostring", "__name"};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    lua_getfield(L, -1, fields[i]);
    lua_setfield(L, -3, fields[i]);
  }
  lua_pop(L, 1);
  lua_pushlightuserdata(L, (void *)&FUTURE_KEY);
  lua_rawseti(L, -2, 1);
  lua_pushvalue(L, pool_idx);
  lua_rawseti(L, -2, 2);
  lua_pushvalue(L, pool_idx);
  lua_pushvalue(L, -2);
  lua_rawset(L, -4); /* the pool's key is weak: the pool goes when nothing holds it */
  lua_remove(L, -2);
}

void *luapool__future_push(lua_State *L, lp_future *f, int mt_idx) {
  mt_idx = lua_absindex(L, mt_idx);
  lfuture *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->f = f;
  lua_pushvalue(L, mt_idx);
  lua_setmetatable(L, -2);
  return u;
}

void luapool__future_fill(void *ud, lp_future *f) { ((lfuture *)ud)->f = f; }

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

/* Reads an optional timeout argument: nil -> -1 (forever).  Refused as
** as_completed, wait and map refuse theirs, value shown ("non-negative
** number expected, got -1"), a string too: it said "timeout must be a
** non-negative number", without the value (helper-52). */
static double opt_timeout(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  lua_Number t = lua_type(L, idx) == LUA_TNUMBER ? lua_tonumber(L, idx) : -1;
  if (!(t >= 0)) /* also NaN */
    luaL_argerror(L, idx,
                  lua_pushfstring(L, "non-negative number expected, got %s", luapool__got(L, idx)));
  return t;
}

/* Decoding in protected mode: a reply the owner cannot take (a name its
** state does not know, no memory) becomes an error of kind "transfer". */
typedef struct pdecode_args {
  lp_reader *r;
  int n;
  int pinned; /* the reply refers to a thread worker's strings (core/future.h) */
} pdecode_args;

static void decode_reply(lua_State *L, lp_reader *r, int n, int pinned) {
  if (pinned)
    luapool__decode_pinned(L, r, n);
  else
    luapool__decode(L, r, n);
}

static int pdecode(lua_State *L) {
  pdecode_args *a = lua_touserdata(L, 1);
  lua_pop(L, 1);
  decode_reply(L, a->r, a->n, a->pinned);
  return a->n;
}

/* Pushes n decoded values (returns n), or an error object (returns -1).
** Only a reply that carries names or functions can fail to decode (a name
** unknown here); the worker flags such replies, and only those pay for
** the protected call. */
static int decode_values(lua_State *L, lp_future *f, lp_reader *r, int n) {
  pdecode_args a = {r, n, luapool__future_pinned(f)};
  luaL_checkstack(L, n + 4, "reading a result");
  if (!luapool__future_flagged(f)) {
    decode_reply(L, r, n, a.pinned);
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
    /* %g, as the Lua layer's timeouts print theirs ("after 0 seconds",
    ** "0.5", "1e+300"): lua_pushfstring's %f said "0.0" (helper-52). */
    char secs[32];
    snprintf(secs, sizeof secs, "%g", *timeout);
    lua_pushfstring(L, "no result after %s seconds", secs);
    luapool__push_error(L, LP_EK_TIMEOUT, lua_tostring(L, -1), NULL, NULL, 0);
    lua_error(L);
  }
}

/* Every future method first runs the done callbacks the owner owes
** (f->pool is alive: the future's userdata holds the pool's). */
static void poll_owed(lua_State *L, lp_future *f) {
  if (f->pool == NULL || !pool_face()->owes(f->pool)) return;
  luapool__future_push_pool(L, 1);
  pool_face()->poll(L, -1);
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
  luapool__future_mark_read(f); /* its worker may go on (threadpool.c, pacing) */
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
  lua_pushboolean(L, luapool__future_state(f) >= LP_FINISHED);
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
    pool_face()->poll(L, -1); /* its callbacks run now */
    lua_pop(L, 1);
  }
  lua_pushboolean(L, luapool__future_state(f) == LP_CANCELLED);
  return 1;
}

/* Calls cb (at idx) with the future at fidx; an error is reported on
** stderr with its traceback and goes no further. */
static int cb_msgh(lua_State *L) {
  if (luapool__is_signal_error(L, 1)) return 1; /* raised on, as it is */
  const char *m = lua_tostring(L, 1);
  if (m == NULL) m = luaL_tolstring(L, 1, NULL);
  luaL_traceback(L, L, m, 1);
  return 1;
}

int luapool__run_callback(lua_State *L, int cb, int fidx) {
  cb = lua_absindex(L, cb);
  fidx = lua_absindex(L, fidx);
  lua_pushcfunction(L, cb_msgh);
  lua_pushvalue(L, cb);
  lua_pushvalue(L, fidx);
  if (lua_pcall(L, 1, 0, -3) != LUA_OK) {
    if (luapool__is_signal_error(L, -1)) {
      lua_remove(L, -2); /* the handler */
      return 1;
    }
    fprintf(stderr, "luapool: error in a done callback: %s\n", lua_tostring(L, -1));
    fflush(stderr);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return 0;
}

/* Runs the callbacks list of the future at fidx and clears it. */
int luapool__future_run_callbacks(lua_State *L, int fidx) {
  fidx = lua_absindex(L, fidx);
  if (get_extra(L, fidx, X_CALLBACKS) != LUA_TTABLE) {
    lua_pop(L, 1);
    return 0;
  }
  lua_pushnil(L);
  set_extra(L, fidx, X_CALLBACKS); /* exactly once, even if one re-adds */
  lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, i);
    if (luapool__run_callback(L, -1, fidx)) { /* list, callback, error */
      lua_replace(L, -3);
      lua_pop(L, 1);
      return 1;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return 0;
}

static int future_add_done_callback(lua_State *L) {
  lp_future *f = poll_future(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  luapool__future_push_pool(L, 1); /* 3: the pool */
  struct lp_pool *p = pool_face()->to_pool(L, 3);
  /* Lua work first (it may raise), then the decision under the lock. */
  if (get_extra(L, 1, X_CALLBACKS) != LUA_TTABLE) { /* 4: callbacks */
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    set_extra(L, 1, X_CALLBACKS);
  }
  if (p) pool_face()->watch(L, 3, 1);
  int notified;
  int done = luapool__future_notify_on(f, p, &notified);
  if (done && p && !notified) { /* nothing will clear the watch: do it now */
    lua_getiuservalue(L, 3, 1);
    lua_pushlightuserdata(L, f);
    lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
  }
  if (done || p == NULL) {
    if (luapool__run_callback(L, 2, 1)) lua_error(L);
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
  int stash; /* id of a future popped but not handed out yet (its pool's poll raised), or 0 */
} lcq;

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
  u->stash = 0;
  luaL_setmetatable(L, LUAPOOL_CQ_MT);
  lua_newtable(L);
  lua_setiuservalue(L, -2, 1);
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
  lua_setiuservalue(L, -2, 2);
  lp_cq *q = luapool__cq_alloc();
  if (q == NULL) return luaL_error(L, "not enough memory");
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
  lp_wnode *n = lp_calloc(1, sizeof *n);
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
  luapool__cq_watch(n);
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
  if (u->stash) { /* taken by a pop whose poll raised: it comes first */
    int id = u->stash;
    u->stash = 0;
    lua_getiuservalue(L, 1, 1);
    lua_rawgeti(L, -1, id);
    lua_pushnil(L);
    lua_rawseti(L, -3, id);
    return 1;
  }
  if (q->waiting == 0) {
    lua_pushboolean(L, 0);
    return 1;
  }
  double start = luapool__now();
  lp_wnode *n;
  int r;
  while ((r = luapool__cq_wait(q, timeout, start, &n)) < 0) {
    if (r == -2) return raise_stopped(L);
    luapool__check_signal(L); /* raises (or the signal went elsewhere: wait on) */
  }
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
  lp_free(n);
  luapool__future_unref(f);   /* (its userdata holds a reference) */
  lua_getiuservalue(L, 1, 1); /* (id -> future keeps it alive meanwhile) */
  /* The future's pool: its callbacks are due.  They may raise (a Ctrl-C in
  ** one): the future is then stashed, the next pop's first; and one of them
  ** may pop this queue itself (then it has it). */
  u->stash = id;
  lua_rawgeti(L, -1, id);
  luapool__future_push_pool(L, -1);
  lua_remove(L, -2);
  pool_face()->poll(L, -1);
  lua_pop(L, 1);
  if (u->stash != id) { /* a callback took it: the next one */
    lua_pop(L, 1);
    return cq_pop(L);
  }
  u->stash = 0;
  lua_rawgeti(L, -1, id);
  lua_pushnil(L);
  lua_rawseti(L, -3, id);
  return 1;
}

static int cq_pending(lua_State *L) {
  lua_pushinteger(L, check_cq(L)->q->waiting);
  return 1;
}

static int cq_close(lua_State *L) {
  lcq *u = luaL_checkudata(L, 1, LUAPOOL_CQ_MT);
  if (u->q) {
    luapool__cq_free(u->q);
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
