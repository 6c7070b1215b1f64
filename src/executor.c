/*
** What both pools share: the task queue, the worker threads' loop, and the
** Lua face (new, submit, map, starmap, shutdown, close).
**
** Pool invariants (mutex p->mu guards the queue and the counters):
**  - a worker thread waits on p->cv only while the queue is empty and the
**    pool is not closing; submit signals only when some worker idles, and
**    starts a new worker when none idles and fewer than max_workers run;
**  - the queue holds one reference to each queued future;
**  - only the owner's thread (the Lua state that created the pool) submits,
**    shuts down and joins; workers never touch the owner's Lua state.
** A backend (threadpool.c, processpool.c) only says how a worker starts,
** runs one task and stops.
*/
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "luapool.h"

/* {======================================================
** Queue and workers
** ======================================================= */

/* mutex must be locked */
static lp_future *queue_pop(lp_pool *p) {
  lp_future *f = p->head;
  if (f) {
    p->head = f->next;
    if (p->head == NULL) p->tail = NULL;
    f->next = NULL;
    p->npending--;
  }
  return f;
}

void luapool__pool_break(lp_pool *p, const char *why) {
  pthread_mutex_lock(&p->mu);
  if (p->broken == NULL) p->broken = strdup(why); /* NULL: "no memory" below */
  lp_future *q = p->head;
  p->head = p->tail = NULL;
  p->npending = 0;
  pthread_mutex_unlock(&p->mu);
  while (q) {
    lp_future *next = q->next;
    luapool__future_fail(q, LP_EK_BROKEN, "%s", why);
    luapool__future_unref(q);
    q = next;
  }
}

int luapool__reply_failed(const char *reply, size_t len, char *msg, size_t sz) {
  lp_reader r = {reply, reply + len};
  unsigned st;
  const char *m = "malformed reply";
  size_t ml = strlen(m);
  if (luapool__get_u8(&r, &st) == 0 && st == LP_REPLY_OK) return 0;
  if (st == LP_REPLY_ERROR || st == LP_REPLY_TRANSFER) {
    const char *t;
    size_t tl;
    if (luapool__get_string(&r, &t, &tl) == 0) m = t, ml = tl;
  }
  snprintf(msg, sz, "%.*s", (int)ml, m);
  return -1;
}

static void *worker_main(void *arg) {
  lp_worker *w = arg;
  lp_pool *p = w->pool;
  p->be->worker_start(w);
  for (;;) {
    pthread_mutex_lock(&p->mu);
    while (p->head == NULL && !p->closing) {
      p->idle++;
      pthread_cond_wait(&p->cv, &p->mu);
      p->idle--;
    }
    lp_future *f = queue_pop(p);
    pthread_mutex_unlock(&p->mu);
    if (f == NULL) break; /* closing, and nothing left to run */
    if (luapool__future_start(f, w->name)) p->be->run(w, f);
    luapool__future_unref(f);
    /* p->broken is written once, under the lock, before the queue is
    ** failed; a task popped before that still runs, which is harmless. */
  }
  p->be->worker_stop(w);
  return NULL;
}

/* mutex must be locked.  Starts worker number nworkers+1; -1 on failure. */
static int start_worker(lp_pool *p, char *err, size_t errsz) {
  int i = p->nworkers;
  lp_worker *w = calloc(1, p->be->worker_size);
  if (w == NULL) {
    snprintf(err, errsz, "cannot start a worker: not enough memory");
    return -1;
  }
  w->pool = p;
  w->index = i + 1;
  snprintf(w->name, sizeof w->name, "%s-%d", p->name, i + 1);
  atomic_init(&w->interrupt, 0);
  int r = pthread_create(&w->thread, NULL, worker_main, w);
  if (r != 0) {
    snprintf(err, errsz, "cannot start a worker thread: %s", strerror(r));
    free(w);
    return -1;
  }
  p->workers[i] = w;
  p->nworkers++;
  return 0;
}

/* Queues f (taking a reference).  -1 with err when the pool cannot run it:
** closing, or no worker could be started at all. */
static int pool_enqueue(lp_pool *p, lp_future *f, char *err, size_t errsz) {
  pthread_mutex_lock(&p->mu);
  if (p->closing) {
    pthread_mutex_unlock(&p->mu);
    snprintf(err, errsz, "cannot submit after shutdown");
    return -1;
  }
  if (p->broken) { /* the future fails at once, like those queued before */
    luapool__future_fail(f, LP_EK_BROKEN, "%s", p->broken);
    pthread_mutex_unlock(&p->mu);
    return 0;
  }
  if (p->idle <= (int)p->npending && p->nworkers < p->max_workers &&
      start_worker(p, err, errsz) != 0 && p->nworkers == 0) {
    pthread_mutex_unlock(&p->mu);
    return -1; /* with no worker at all the task would wait forever */
  }
  luapool__future_ref(f);
  if (p->tail)
    p->tail->next = f;
  else
    p->head = f;
  p->tail = f;
  p->npending++;
  if (p->idle > 0) pthread_cond_signal(&p->cv);
  pthread_mutex_unlock(&p->mu);
  return 0;
}

/* Stops taking tasks; optionally cancels the queued ones, interrupts the
** running ones, and joins the workers. */
static void pool_stop(lp_pool *p, int wait, int cancel, int interrupt) {
  pthread_mutex_lock(&p->mu);
  p->closing = 1;
  lp_future *cancelled = NULL;
  if (cancel) {
    cancelled = p->head;
    p->head = p->tail = NULL;
    p->npending = 0;
  }
  pthread_cond_broadcast(&p->cv);
  int n = p->nworkers;
  pthread_mutex_unlock(&p->mu);
  while (cancelled) {
    lp_future *next = cancelled->next;
    luapool__future_cancel(cancelled);
    luapool__future_unref(cancelled);
    cancelled = next;
  }
  /* Workers are only started by the owner (submit), which is this thread:
  ** n cannot grow while we join. */
  if (interrupt)
    for (int i = 0; i < n; i++) {
      if (p->workers[i] == NULL) continue; /* joined by an earlier stop */
      atomic_store(&p->workers[i]->interrupt, 1);
      if (p->be->interrupt) p->be->interrupt(p->workers[i]);
    }
  if (!wait) return;
  for (int i = 0; i < n; i++) {
    if (p->workers[i] == NULL) continue;
    pthread_join(p->workers[i]->thread, NULL);
    free(p->workers[i]);
    p->workers[i] = NULL;
  }
}

static void pool_free(lp_pool *p) {
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cv);
  free(p->workers);
  free(p->path);
  free(p->cpath);
  free(p->init_msg);
  free(p->broken);
  free(p);
}

/* }====================================================== */

/* {======================================================
** Lua face
** ======================================================= */

/* The userdata is born closed (p == NULL) and opened once the C pool
** exists, so a failed creation leaves nothing to free twice. */
typedef struct lpool {
  lp_pool *p;
} lpool;

static lpool *to_lpool(lua_State *L, int idx) {
  return luaL_checkudata(L, idx, LUAPOOL_POOL_MT);
}

lp_pool *luapool__check_pool(lua_State *L, int idx) {
  lpool *u = to_lpool(L, idx);
  if (u->p == NULL) luaL_error(L, "attempt to use a closed pool");
  return u->p;
}

static int default_workers(const lp_backend *be) {
  int n = luapool__cpu_count();
  if (be == &luapool__thread_backend) return n + 4 < 32 ? n + 4 : 32;
  return n;
}

/* Pushes package[field] when it is a string, else "". */
static const char *push_package_field(lua_State *L, const char *field) {
  int top = lua_gettop(L);
  if (lua_getglobal(L, "package") != LUA_TTABLE ||
      lua_getfield(L, -1, field) != LUA_TSTRING) {
    lua_settop(L, top);
    lua_pushliteral(L, "");
  } else {
    lua_remove(L, -2);
  }
  return lua_tostring(L, -1);
}

int luapool__pool_new(lua_State *L, const lp_backend *be) {
  int max_workers = default_workers(be);
  char name[48];
  snprintf(name, sizeof name, "%s", be->kind);
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 1)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
      if (k && strcmp(k, "max_workers") == 0) {
        if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1 ||
            lua_tointeger(L, -1) > 4096)
          return luaL_error(L, "bad option 'max_workers' to 'new' (integer "
                               "from 1 to 4096 expected, got %s)",
                            lua_isinteger(L, -1) ? lua_tostring(L, -1)
                                                 : luaL_typename(L, -1));
        max_workers = (int)lua_tointeger(L, -1);
      } else if (k && strcmp(k, "name") == 0) {
        size_t len;
        const char *s = lua_tolstring(L, -1, &len);
        if (lua_type(L, -1) != LUA_TSTRING || len == 0 || len >= sizeof name - 8)
          return luaL_error(L, "bad option 'name' to 'new' (non-empty string "
                               "of at most %d bytes expected)",
                            (int)sizeof name - 9);
        snprintf(name, sizeof name, "%s", s);
      } else if (k && strcmp(k, "initializer") == 0) {
        if (lua_type(L, -1) != LUA_TFUNCTION)
          return luaL_error(L, "bad option 'initializer' to 'new' (function "
                               "expected, got %s)", luaL_typename(L, -1));
      } else if (k && strcmp(k, "initargs") == 0) {
        if (!lua_istable(L, -1))
          return luaL_error(L, "bad option 'initargs' to 'new' (table "
                               "expected, got %s)", luaL_typename(L, -1));
      } else {
        lua_pop(L, 1);
        return luaL_error(L, "unknown option '%s' to 'new'",
                          k ? k : luaL_tolstring(L, -1, NULL));
      }
      lua_pop(L, 1);
    }
  }
  /* The initializer travels as one task message, encoded once now so that
  ** what cannot travel is refused here, not in a worker. */
  lp_buf *ib = NULL;
  if (!lua_isnoneornil(L, 1)) {
    lua_settop(L, 1);
    if (lua_getfield(L, 1, "initializer") != LUA_TNIL) { /* 2 */
      int nargs = 0;
      if (lua_getfield(L, 1, "initargs") == LUA_TTABLE) { /* 3 */
        nargs = (int)lua_rawlen(L, 3);
        luaL_checkstack(L, nargs, "too many initargs");
        for (int i = 1; i <= nargs; i++) lua_rawgeti(L, 3, i);
      }
      lua_remove(L, 3);
      ib = luapool__scratch(L);
      lp_encode_ctx ctx = {"initializer argument", 1, {0}};
      if (luapool__put_u8(ib, LP_MSG_SINGLE) ||
          luapool__put_u32(ib, (uint32_t)nargs + 1))
        return luaL_error(L, "cannot create a pool: not enough memory");
      if (luapool__encode(L, ib, 2, nargs + 1, &ctx) != 0) {
        ib->len = 0;
        return luaL_error(L, "%s", ctx.err);
      }
    }
    lua_settop(L, 1);
  } else if (lua_isnil(L, 1)) {
    lua_settop(L, 0);
  }
  const char *lpath = push_package_field(L, "path");
  const char *lcpath = push_package_field(L, "cpath");
  lpool *u = lua_newuserdatauv(L, sizeof *u, 0);
  u->p = NULL;
  luaL_setmetatable(L, LUAPOOL_POOL_MT);
  /* Everything below is plain C until the pool is complete: no raise.
  ** (ib is the state's scratch buffer: the userdata above does not touch
  ** it.) */
  char *init_msg = NULL, *path = NULL, *cpath = NULL;
  size_t init_len = 0;
  lp_pool *p = NULL;
  lp_worker **workers = NULL;
  if (ib && (init_msg = malloc(ib->len)) != NULL) {
    memcpy(init_msg, ib->p, ib->len);
    init_len = ib->len;
  }
  if (ib) ib->len = 0;
  if (ib && init_msg == NULL) goto nomem;
  path = strdup(lpath);
  cpath = strdup(lcpath);
  p = calloc(1, sizeof *p);
  workers = calloc((size_t)max_workers, sizeof *workers);
  if (p == NULL || workers == NULL || path == NULL || cpath == NULL)
    goto nomem;
  if (pthread_mutex_init(&p->mu, NULL) != 0) goto nomem;
  if (pthread_cond_init(&p->cv, NULL) != 0) {
    pthread_mutex_destroy(&p->mu);
    goto nomem;
  }
  p->be = be;
  p->max_workers = max_workers;
  p->workers = workers;
  p->path = path;
  p->cpath = cpath;
  p->init_msg = init_msg;
  p->init_len = init_len;
  snprintf(p->name, sizeof p->name, "%s", name);
  u->p = p;
  return 1;
nomem:
  free(init_msg);
  free(path);
  free(cpath);
  free(workers);
  free(p);
  return luaL_error(L, "cannot create a pool: not enough memory");
}

static void check_fn(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TFUNCTION)
    luaL_typeerror(L, idx, "function or kernel");
}

/* Queues a message as a new future and pushes its userdata.  Raises on
** failure (the message is freed first). */
static lp_future *submit_message(lua_State *L, lp_pool *p, int pool_idx,
                                 lp_buf *b, int ncalls) {
  luapool__future_push(L, NULL, pool_idx); /* born empty: may raise */
  lp_future *f = luapool__future_new(b, ncalls);
  if (f == NULL) luaL_error(L, "cannot submit: not enough memory");
  char err[160];
  if (pool_enqueue(p, f, err, sizeof err) != 0) {
    luapool__future_unref(f);
    luaL_error(L, "%s", err);
  }
  luapool__future_set(L, -1, f);
  return f;
}

static int pool_submit(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  check_fn(L, 2);
  if (p->closing) return luaL_error(L, "cannot submit after shutdown");
  int n = lua_gettop(L) - 1;
  lp_buf *b = luapool__scratch(L);
  lp_encode_ctx ctx = {"argument", 1, {0}};
  if (luapool__put_u8(b, LP_MSG_SINGLE) || luapool__put_u32(b, (uint32_t)n))
    return luaL_error(L, "cannot submit: not enough memory");
  if (luapool__encode(L, b, 2, n, &ctx) != 0) {
    b->len = 0;
    return luaL_error(L, "%s", ctx.err);
  }
  submit_message(L, p, 1, b, 1);
  return 1;
}

static int opt_int_field(lua_State *L, int t, const char *k, int def, int min,
                         const char *fname) {
  int r = def;
  if (lua_getfield(L, t, k) != LUA_TNIL) {
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < min ||
        lua_tointeger(L, -1) > 1 << 24)
      luaL_error(L, "bad option '%s' to '%s' (integer >= %d expected)", k,
                 fname, min);
    r = (int)lua_tointeger(L, -1);
  }
  lua_pop(L, 1);
  return r;
}

/* Chunk size when the caller gives none.  A process round trip costs tens
** of microseconds, so process pools batch enough calls to amortize it while
** keeping ~4 chunks per worker for balance; thread pools hand out single
** calls, which keeps latency-bound jobs (fetches) evenly spread. */
static int auto_chunksize(lp_pool *p, lua_Integer n) {
  if (p->be != &luapool__process_backend) return 1;
  lua_Integer per = n / ((lua_Integer)p->max_workers * 4);
  if (per < 1) return 1;
  return per > 1024 ? 1024 : (int)per;
}

/* map and starmap: items at 3, options at 4. */
static int pool_map_impl(lua_State *L, int star, const char *fname) {
  lp_pool *p = luapool__check_pool(L, 1);
  check_fn(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  if (!lua_isnoneornil(L, 4)) luaL_checktype(L, 4, LUA_TTABLE);
  lua_settop(L, 4);
  lua_Integer n = (lua_Integer)lua_rawlen(L, 3);
  int chunk = lua_isnil(L, 4)
                  ? auto_chunksize(p, n)
                  : opt_int_field(L, 4, "chunksize", auto_chunksize(p, n), 1, fname);
  if (p->closing) return luaL_error(L, "cannot submit after shutdown");
  lua_Integer nchunks = (n + chunk - 1) / chunk;
  lua_createtable(L, (int)(nchunks > 1 << 20 ? 1 << 20 : nchunks), 0); /* 5 */
  lp_encode_ctx ctx = {"argument", 1, {0}};
  for (lua_Integer c = 0; c < nchunks; c++) {
    lua_Integer lo = c * chunk + 1, hi = lo + chunk - 1;
    if (hi > n) hi = n;
    lp_buf *b = luapool__scratch(L);
    if (luapool__put_u8(b, LP_MSG_BATCH) || luapool__put_u32(b, (uint32_t)(hi - lo + 1)))
      return luaL_error(L, "cannot submit: not enough memory");
    ctx.root = "argument";
    ctx.root_base = 1;
    if (luapool__encode(L, b, 2, 1, &ctx) != 0) goto refuse;
    for (lua_Integer i = lo; i <= hi; i++) {
      lua_rawgeti(L, 3, i);
      int top = lua_gettop(L), nargs = 1;
      if (star) {
        if (!lua_istable(L, top)) {
          b->len = 0;
          return luaL_error(L, "bad item #%I to '%s' (table of arguments "
                               "expected, got %s)",
                            (LUAI_UACINT)i, fname, luaL_typename(L, top));
        }
        nargs = (int)lua_rawlen(L, top);
        luaL_checkstack(L, nargs, "too many arguments");
        for (int a = 1; a <= nargs; a++) lua_rawgeti(L, top, a);
      }
      ctx.root = "item";
      ctx.root_base = (int)i;
      if (luapool__put_u32(b, (uint32_t)nargs))
        return luaL_error(L, "cannot submit: not enough memory");
      int r = luapool__encode(L, b, star ? top + 1 : top, nargs, &ctx);
      lua_settop(L, 5);
      if (r != 0) goto refuse;
    }
    submit_message(L, p, 1, b, (int)(hi - lo + 1));
    lua_rawseti(L, 5, c + 1);
  }
  /* Collect in input order; the first error cancels what has not started. */
  lua_createtable(L, (int)(n > 1 << 24 ? 1 << 24 : n), 0); /* 6 */
  lua_Integer idx = 0;
  for (lua_Integer c = 1; c <= nchunks; c++) {
    lua_rawgeti(L, 5, c);
    lp_future *f = luapool__check_future(L, -1);
    luapool__future_wait(f, -1);
    lp_reader r = {NULL, NULL};
    for (int k = 0; k < f->ncalls; k++) {
      if (luapool__future_outcome(L, f, &r, 1) < 0) {
        for (lua_Integer d = c + 1; d <= nchunks; d++) {
          lua_rawgeti(L, 5, d);
          luapool__future_cancel(luapool__check_future(L, -1));
          lua_pop(L, 1);
        }
        return lua_error(L);
      }
      idx++;
      if (lua_gettop(L) == 7) lua_pushnil(L); /* no value returned */
      lua_rawseti(L, 6, idx);
    }
    lua_pop(L, 1);
  }
  return 1;
refuse:
  luapool__scratch(L);
  for (lua_Integer d = 1; d <= (lua_Integer)lua_rawlen(L, 5); d++) {
    lua_rawgeti(L, 5, d);
    luapool__future_cancel(luapool__check_future(L, -1));
    lua_pop(L, 1);
  }
  return luaL_error(L, "%s", ctx.err);
}

static int pool_map(lua_State *L) { return pool_map_impl(L, 0, "map"); }
static int pool_starmap(lua_State *L) { return pool_map_impl(L, 1, "starmap"); }

static int pool_shutdown(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  int wait = 1, cancel = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
      if (strcmp(k, "wait") == 0)
        wait = lua_toboolean(L, -1);
      else if (strcmp(k, "cancel_futures") == 0)
        cancel = lua_toboolean(L, -1);
      else
        return luaL_error(L, "unknown option '%s' to 'shutdown'", k);
      lua_pop(L, 1);
    }
  }
  pool_stop(p, wait, cancel, 0);
  return 0;
}

/* <close>: waits for the work; when the scope is left by an error, the
** queued tasks are cancelled first (the script is failing anyway). */
static int pool_close(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p) pool_stop(u->p, 1, !lua_isnoneornil(L, 2), 0);
  return 0;
}

/* Collected or still open at exit: never hang, never leave a worker.
** Queued tasks are cancelled and running ones interrupted. */
static int pool_gc(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p) {
    pool_stop(u->p, 1, 1, 1);
    pool_free(u->p);
    u->p = NULL;
  }
  return 0;
}

static int pool_tostring(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p == NULL)
    lua_pushliteral(L, "luapool.pool (closed)");
  else
    lua_pushfstring(L, "%s '%s' (%d workers max)%s", u->p->be->kind, u->p->name,
                    u->p->max_workers, u->p->closing ? " (shut down)" : "");
  return 1;
}

/* Fallback __index of the methods table: the pool's read-only fields. */
static int pool_field(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "max_workers") == 0)
    lua_pushinteger(L, p->max_workers);
  else if (strcmp(k, "name") == 0)
    lua_pushstring(L, p->name);
  else if (strcmp(k, "kind") == 0)
    lua_pushstring(L, p->be->kind);
  else
    lua_pushnil(L);
  return 1;
}

static const luaL_Reg pool_methods[] = {{"submit", pool_submit},
                                        {"map", pool_map},
                                        {"starmap", pool_starmap},
                                        {"shutdown", pool_shutdown},
                                        {NULL, NULL}};

void luapool__pool_open(lua_State *L) {
  if (luaL_newmetatable(L, LUAPOOL_POOL_MT)) {
    /* methods are found in the table itself; fields fall through */
    luaL_newlib(L, pool_methods);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, pool_field);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, pool_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, pool_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, pool_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}

/* }====================================================== */
