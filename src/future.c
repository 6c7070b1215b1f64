/*
** Futures: a thread-safe state machine (C side) and its Lua face.
**
**   PENDING --start--> RUNNING --finish--> FINISHED (reply bytes)
**      |                  \----fail-----> FAILED   (kind + message)
**      +--cancel--> CANCELLED      (fail also from PENDING: broken pools)
**
** Every transition happens under the future's mutex and exactly once: the
** first of cancel/start/fail wins, so a future ends in exactly one state.
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

static void drop_msg(lp_future *f) {
  if (f->msg != f->inline_msg) free(f->msg);
  f->msg = NULL;
}

/* Messages up to this size live in the future's own allocation: one malloc
** per task, freed by the thread that drops the last reference. */
#define INLINE_MSG_MAX 4096

lp_future *luapool__future_new(lp_buf *b, int ncalls) {
  size_t inl = b->len <= INLINE_MSG_MAX ? b->len : 0;
  lp_future *f = calloc(1, sizeof *f + inl);
  if (f == NULL) return NULL;
  if (inl) {
    memcpy(f->inline_msg, b->p, inl);
    f->msg = f->inline_msg;
    f->msglen = inl;
    b->len = 0; /* the scratch buffer keeps its capacity */
  } else {
    f->msg = luapool__buf_take(b, &f->msglen);
  }
  pthread_condattr_t ca;
  if (pthread_condattr_init(&ca) != 0) goto fail_free;
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  if (pthread_mutex_init(&f->mu, NULL) != 0) {
    pthread_condattr_destroy(&ca);
    goto fail_free;
  }
  if (pthread_cond_init(&f->cv, &ca) != 0) {
    pthread_condattr_destroy(&ca);
    pthread_mutex_destroy(&f->mu);
    goto fail_free;
  }
  pthread_condattr_destroy(&ca);
  atomic_init(&f->refs, 1);
  f->state = LP_PENDING;
  f->ncalls = ncalls;
  return f;
fail_free:
  drop_msg(f);
  free(f);
  return NULL;
}

void luapool__future_ref(lp_future *f) {
  atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
}

void luapool__future_unref(lp_future *f) {
  if (atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1) return;
  pthread_mutex_destroy(&f->mu);
  pthread_cond_destroy(&f->cv);
  drop_msg(f);
  if (f->reply != f->inline_reply) free(f->reply);
  free(f->emsg);
  free(f);
}

/* mutex must be locked: wakes whoever waits for the outcome. */
static void settle(lp_future *f) {
  /* The task will not run (again): a large message is dropped now rather
  ** than when the script lets go of the future.  Safe because settle runs
  ** on the thread that ran the task, or for a task that never started. */
  if (f->msg != f->inline_msg) drop_msg(f);
  if (f->nwaiters > 0) pthread_cond_broadcast(&f->cv);
}

int luapool__future_start(lp_future *f, const char *worker) {
  pthread_mutex_lock(&f->mu);
  int ok = f->state == LP_PENDING;
  if (ok) {
    f->state = LP_RUNNING;
    snprintf(f->worker, sizeof f->worker, "%s", worker);
  }
  pthread_mutex_unlock(&f->mu);
  return ok;
}

void luapool__future_finish(lp_future *f, char *reply, size_t len, int copy) {
  char *own = copy ? NULL : reply; /* freed here unless f keeps it */
  if (copy) {
    if (len <= sizeof f->inline_reply) {
      own = NULL;
    } else if ((own = malloc(len)) == NULL) {
      luapool__future_fail(f, LP_EK_TRANSFER, "no memory for the reply (%zu bytes)", len);
      return;
    } else {
      memcpy(own, reply, len);
    }
  }
  pthread_mutex_lock(&f->mu);
  if (f->state == LP_RUNNING || f->state == LP_PENDING) {
    f->state = LP_FINISHED;
    if (own == NULL) {
      memcpy(f->inline_reply, reply, len);
      f->reply = f->inline_reply;
    } else {
      f->reply = own;
      own = NULL;
    }
    f->replylen = len;
    settle(f);
  }
  pthread_mutex_unlock(&f->mu);
  free(own); /* it lost a race: already failed elsewhere */
}

void luapool__future_fail(lp_future *f, lp_ekind k, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  char *m = strdup(buf); /* NULL on no memory: the kind still tells */
  pthread_mutex_lock(&f->mu);
  if (f->state == LP_RUNNING || f->state == LP_PENDING) {
    f->state = LP_FAILED;
    f->ekind = k;
    f->emsg = m;
    m = NULL;
    settle(f);
  }
  pthread_mutex_unlock(&f->mu);
  free(m);
}

int luapool__future_cancel(lp_future *f) {
  pthread_mutex_lock(&f->mu);
  if (f->state == LP_PENDING) {
    f->state = LP_CANCELLED;
    settle(f);
  }
  int r = f->state == LP_CANCELLED;
  pthread_mutex_unlock(&f->mu);
  return r;
}

lp_fstate luapool__future_state(lp_future *f) {
  pthread_mutex_lock(&f->mu);
  lp_fstate s = f->state;
  pthread_mutex_unlock(&f->mu);
  return s;
}

static int is_done(lp_fstate s) { return s >= LP_FINISHED; }

int luapool__future_wait(lp_future *f, double timeout) {
  struct timespec dl;
  if (timeout >= 0) {
    clock_gettime(CLOCK_MONOTONIC, &dl);
    double whole = floor(timeout);
    if (whole > 1e9) whole = 1e9; /* ~31 years: forever, without overflow */
    dl.tv_sec += (time_t)whole;
    dl.tv_nsec += (long)((timeout - floor(timeout)) * 1e9);
    if (dl.tv_nsec >= 1000000000L) {
      dl.tv_sec++;
      dl.tv_nsec -= 1000000000L;
    }
  }
  pthread_mutex_lock(&f->mu);
  f->nwaiters++;
  int r = 0;
  while (!is_done(f->state) && r != ETIMEDOUT) {
    if (timeout >= 0)
      r = pthread_cond_timedwait(&f->cv, &f->mu, &dl);
    else
      pthread_cond_wait(&f->cv, &f->mu);
  }
  f->nwaiters--;
  int done = is_done(f->state);
  pthread_mutex_unlock(&f->mu);
  return done;
}

/* }====================================================== */

/* {======================================================
** Lua side
** ======================================================= */

/* The userdata: the future, and in its user value the pool, so that a pool
** lives at least as long as a future the script still holds. */
typedef struct lfuture {
  lp_future *f;
} lfuture;

lp_future *luapool__check_future(lua_State *L, int idx) {
  lfuture *u = luaL_checkudata(L, idx, LUAPOOL_FUTURE_MT);
  if (u->f == NULL) luaL_error(L, "attempt to use an unfinished future");
  return u->f;
}

void luapool__future_push(lua_State *L, lp_future *f, int pool_idx) {
  pool_idx = lua_absindex(L, pool_idx);
  lfuture *u = lua_newuserdatauv(L, sizeof *u, 1);
  u->f = f;
  luaL_setmetatable(L, LUAPOOL_FUTURE_MT);
  lua_pushvalue(L, pool_idx);
  lua_setiuservalue(L, -2, 1);
}

void luapool__future_set(lua_State *L, int idx, lp_future *f) {
  lfuture *u = luaL_checkudata(L, idx, LUAPOOL_FUTURE_MT);
  u->f = f;
}

static int future_gc(lua_State *L) {
  lfuture *u = luaL_checkudata(L, 1, LUAPOOL_FUTURE_MT);
  if (u->f) {
    luapool__future_unref(u->f);
    u->f = NULL;
  }
  return 0;
}

/* Reads an optional timeout argument: nil -> -1 (forever). */
static double opt_timeout(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return -1;
  lua_Number t = luaL_checknumber(L, idx);
  luaL_argcheck(L, t >= 0 && t == t, idx, "timeout must be a non-negative number");
  return t;
}

static const char *ekind_names[] = {"task",    "timeout", "cancelled",
                                    "crashed", "broken",  "transfer",
                                    "interrupted"};

const char *luapool__ekind_name(lp_ekind k) { return ekind_names[k]; }

int luapool__future_outcome(lua_State *L, lp_future *f, lp_reader *rd,
                            int maxvals) {
  /* A finished future's state and reply never change again: safe to read
  ** without the lock once a wait or a state read has seen it done. */
  lp_fstate s = luapool__future_state(f);
  if (s == LP_CANCELLED) {
    luapool__push_error(L, LP_EK_CANCELLED, "the task was cancelled", NULL,
                        NULL, 0);
    return -1;
  }
  if (s == LP_FAILED) {
    luapool__push_error(L, f->ekind, f->emsg ? f->emsg : "(no memory for message)",
                        NULL, f->worker[0] ? f->worker : NULL, 0);
    return -1;
  }
  lp_reader first, *r = rd ? rd : &first;
  if (rd == NULL || rd->p == NULL) *r = (lp_reader){f->reply, f->reply + f->replylen};
  unsigned st;
  uint32_t n;
  luaL_checkstack(L, 8, "reading a result");
  if (luapool__get_u8(r, &st)) luaL_error(L, "malformed reply");
  if (st == LP_REPLY_TRANSFER) {
    const char *m;
    size_t l;
    if (luapool__get_string(r, &m, &l)) luaL_error(L, "malformed reply");
    lua_pushlstring(L, m, l);
    luapool__push_error(L, LP_EK_TRANSFER, lua_tostring(L, -1), NULL,
                        f->worker, 0);
    lua_remove(L, -2);
    return -1;
  }
  if (st == LP_REPLY_OK) {
    if (luapool__get_u32(r, &n) || n > f->replylen) luaL_error(L, "malformed reply");
    int top = lua_gettop(L);
    luapool__decode(L, r, (int)n);
    if (maxvals >= 0 && (int)n > maxvals) lua_settop(L, top + maxvals);
    return lua_gettop(L) - top;
  }
  /* task error: message and traceback, then the error value */
  const char *m = NULL, *tb = NULL;
  size_t ml = 0, tl = 0;
  if (st != LP_REPLY_ERROR || luapool__get_string(r, &m, &ml) ||
      luapool__get_string(r, &tb, &tl))
    luaL_error(L, "malformed reply");
  lua_pushlstring(L, m, ml);
  lua_pushlstring(L, tb, tl);
  luapool__decode(L, r, 1);
  luapool__push_error(L, LP_EK_TASK, lua_tostring(L, -3), lua_tostring(L, -2),
                      f->worker, -1);
  lua_replace(L, -4);
  lua_settop(L, lua_gettop(L) - 2);
  return -1;
}

/* Waits (raising a timeout error object when it expires). */
static lp_future *wait_done(lua_State *L, double *timeout) {
  lp_future *f = luapool__check_future(L, 1);
  *timeout = opt_timeout(L, 2);
  if (!luapool__future_wait(f, *timeout)) {
    lua_pushfstring(L, "no result after %f seconds", *timeout);
    luapool__push_error(L, LP_EK_TIMEOUT, lua_tostring(L, -1), NULL, NULL, 0);
    lua_error(L);
  }
  return f;
}

static int future_result(lua_State *L) {
  double timeout;
  lp_future *f = wait_done(L, &timeout);
  int top = lua_gettop(L);
  int n = luapool__future_outcome(L, f, NULL, -1);
  if (n < 0) return lua_error(L);
  return lua_gettop(L) - top;
}

static int future_exception(lua_State *L) {
  double timeout;
  lp_future *f = wait_done(L, &timeout);
  int n = luapool__future_outcome(L, f, NULL, 0);
  if (n < 0) return 1;
  lua_pushnil(L);
  return 1;
}

static int future_done(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  lua_pushboolean(L, is_done(luapool__future_state(f)));
  return 1;
}

static int future_running(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  lua_pushboolean(L, luapool__future_state(f) == LP_RUNNING);
  return 1;
}

static int future_cancelled(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  lua_pushboolean(L, luapool__future_state(f) == LP_CANCELLED);
  return 1;
}

static int future_cancel(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  lua_pushboolean(L, luapool__future_cancel(f));
  return 1;
}

static int future_tostring(lua_State *L) {
  static const char *const names[] = {"pending", "running", "finished",
                                      "failed", "cancelled"};
  lp_future *f = luapool__check_future(L, 1);
  lua_pushfstring(L, "luapool.future (%s): %p",
                  names[luapool__future_state(f)], (void *)f);
  return 1;
}

static const luaL_Reg future_methods[] = {
    {"result", future_result},       {"exception", future_exception},
    {"done", future_done},           {"running", future_running},
    {"cancelled", future_cancelled}, {"cancel", future_cancel},
    {NULL, NULL}};

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
