/*
** The pool's Lua face: new (its options), submit, shutdown, stats,
** <close>, __gc, and the primitives the Lua layer (lua/luapool/
** executor.lua: map, starmap, imap, as_completed, wait) is written on.
** The pool itself is core/pool.c; what runs the tasks is its engine.
*/
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>

#include "base/alloc.h"
#include "base/ctrlc.h"
#include "base/util.h"
#include "bind/errors.h"
#include "bind/lfuture.h"
#include "bind/lpool.h"
#include "codec/codec.h"
#include "codec/message.h"
#include "core/pool.h"
#include "engines/engines.h"

/* {======================================================
** Lua face
** ======================================================= */

/* The userdata is born closed (p == NULL) and opened once the C pool
** exists, so a failed creation leaves nothing to free twice.  Its user
** values: 1 the futures whose done callbacks are owed, 2 and 3 the
** package.path and cpath strings seen last, 4 the package table, 5 the
** metatable its futures get, 6 the codec state (submit encodes with it at
** hand: no registry lookup per task). */
typedef struct lpool {
  lp_pool *p;
  /* the package.path/cpath strings seen last (pinned: user values 2, 3) */
  const void *seen_path, *seen_cpath;
} lpool;

/* The pool metatable's [1] is this mark: checking a pool on every submit
** is then two array reads, not luaL_checkudata's lookup by name. */
static const char POOL_MARK = 'p';

static lpool *test_lpool(lua_State *L, int idx) {
  lpool *u = lua_touserdata(L, idx);
  if (u == NULL || !lua_getmetatable(L, idx)) return NULL;
  lua_rawgeti(L, -1, 1);
  int mine = lua_touserdata(L, -1) == &POOL_MARK;
  lua_pop(L, 2);
  return mine ? u : NULL;
}

static lpool *to_lpool(lua_State *L, int idx) {
  lpool *u = test_lpool(L, idx);
  if (u == NULL) luaL_typeerror(L, idx, LUAPOOL_POOL_MT);
  return u;
}

lp_pool *luapool__to_pool(lua_State *L, int idx) {
  lpool *u = test_lpool(L, idx);
  return u ? u->p : NULL;
}

void luapool__pool_watch(lua_State *L, int pool_idx, int fidx) {
  lp_future *f = luapool__check_future(L, fidx);
  fidx = lua_absindex(L, fidx);
  lua_getiuservalue(L, pool_idx, 1);
  lua_pushlightuserdata(L, f);
  lua_pushvalue(L, fidx);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

void luapool__pool_poll(lua_State *L, int pool_idx) {
  lp_pool *p = luapool__to_pool(L, pool_idx);
  if (p == NULL || atomic_load_explicit(&p->ncb, memory_order_acquire) == 0) return;
  pool_idx = lua_absindex(L, pool_idx);
  lp_future *rev = luapool__pool_take_callbacks(p); /* oldest first */
  lua_getiuservalue(L, pool_idx, 1);                /* lightuserdata(f) -> future */
  int watch = lua_gettop(L);
  while (rev) {
    lp_future *f = rev;
    rev = f->cbnext;
    lua_pushlightuserdata(L, f);
    if (lua_rawget(L, watch) == LUA_TUSERDATA) {
      lua_pushlightuserdata(L, f);
      lua_pushnil(L);
      lua_rawset(L, watch);
      if (luapool__future_run_callbacks(L, -1)) { /* Ctrl-C in one: the rest wait */
        luapool__future_unref(f);
        luapool__pool_return_callbacks(p, rev);
        lua_error(L);
      }
    }
    lua_pop(L, 1);
    luapool__future_unref(f);
  }
  lua_pop(L, 1);
}

lp_pool *luapool__check_pool(lua_State *L, int idx) {
  lpool *u = to_lpool(L, idx);
  if (u->p == NULL) luaL_error(L, "attempt to use a closed pool");
  return u->p;
}

/* Pushes package[field] when it is a string, else "" (the package table
** require uses: package.loaded.package, whatever the global holds). */
static void push_package_field(lua_State *L, const char *field) {
  int top = lua_gettop(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  if (lua_getfield(L, -1, "package") != LUA_TTABLE || lua_getfield(L, -1, field) != LUA_TSTRING) {
    lua_settop(L, top);
    lua_pushliteral(L, "");
  } else {
    lua_replace(L, top + 1);
    lua_settop(L, top + 1);
  }
}

/* The paths a task submitted now must see: the pool keeps the strings it
** saw last (user values 2 and 3, so they stay alive: while they do, an
** unchanged string is the same object, found by its address alone) and
** makes a new lp_paths when either changed.  On every submit: keep it to
** two field reads of the package table (user value 4). */
static void check_paths(lua_State *L, int pool_idx, lp_pool *p) {
  lpool *u = lua_touserdata(L, pool_idx); /* (checked by the caller) */
  lua_getiuservalue(L, pool_idx, 4);
  if (!lua_istable(L, -1)) { /* (a package table that was not one at creation) */
    lua_pop(L, 1);
    push_package_field(L, "path");
    push_package_field(L, "cpath");
  } else {
    if (lua_getfield(L, -1, "path") != LUA_TSTRING) {
      lua_pop(L, 1);
      lua_pushliteral(L, "");
    }
    if (lua_getfield(L, -2, "cpath") != LUA_TSTRING) {
      lua_pop(L, 1);
      lua_pushliteral(L, "");
    }
    lua_remove(L, -3);
  }
  if (lua_topointer(L, -2) == u->seen_path && lua_topointer(L, -1) == u->seen_cpath) {
    lua_pop(L, 2);
    return;
  }
  lua_getiuservalue(L, pool_idx, 2);
  lua_getiuservalue(L, pool_idx, 3);
  int same = lua_rawequal(L, -4, -2) && lua_rawequal(L, -3, -1); /* new strings, same text */
  lua_pop(L, 2);
  if (!same) {
    size_t pl, cl;
    const char *path = lua_tolstring(L, -2, &pl), *cpath = lua_tolstring(L, -1, &cl);
    lp_paths *ps = luapool__paths_new(path, pl, cpath, cl, p->paths->gen + 1);
    if (ps == NULL) luaL_error(L, "cannot submit: not enough memory");
    luapool__paths_unref(p->paths);
    p->paths = ps;
  }
  u->seen_path = lua_topointer(L, -2);
  u->seen_cpath = lua_topointer(L, -1);
  lua_setiuservalue(L, pool_idx, 3);
  lua_setiuservalue(L, pool_idx, 2);
}

/* {====== pool options
** The common options are described here, an engine's own in its lp_engine
** (engine.h); one reader checks them all with Lua's rules (an integer
** option takes an integral float, 4.0; no option takes a string for a
** number), so every option refuses and reports alike. */

static const lp_option common_options[] = {
    {.name = "max_workers",
     .type = LP_OPT_INT,
     .min = 1,
     .max = 4096,
     .offset = offsetof(lp_pool_config, max_workers)},
    {.name = "name", .type = LP_OPT_NAME, .offset = offsetof(lp_pool_config, name)},
    {.name = "task_timeout",
     .type = LP_OPT_SECONDS,
     .offset = offsetof(lp_pool_config, task_timeout)},
    {.name = "initializer", .type = LP_OPT_FUNCTION},
    {.name = "initargs", .type = LP_OPT_TABLE},
    {.name = NULL},
};

/* "'a' or 'b'", "'a', 'b' or 'c'" */
static void push_choices(lua_State *L, const char *const *c) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (int i = 0; c[i]; i++) {
    if (i > 0) luaL_addstring(&b, c[i + 1] ? ", " : " or ");
    lua_pushfstring(L, "'%s'", c[i]);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
}

/* Reads the value at -1 into the struct at base as d says; raises on a
** bad value. */
static void read_option(lua_State *L, const lp_option *d, char *base) {
  char *field = base + d->offset;
  int isint = 0;
  lua_Integer i = lua_type(L, -1) == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : 0;
  switch (d->type) {
    case LP_OPT_INT:
      /* The range, always: "positive integer expected, got
      ** 1000000000000.0" named no bound the value broke (helper-52). */
      if (!isint || i < d->min || i > d->max)
        luaL_error(L, "bad option '%s' to 'new' (integer from %I to %I expected, got %s)", d->name,
                   (lua_Integer)d->min, (lua_Integer)d->max, luapool__got(L, -1));
      memcpy(field, &(int){(int)i}, sizeof(int));
      break;
    case LP_OPT_SECONDS: {
      lua_Number n = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
      if (!(n > 0)) /* also NaN */
        luaL_error(L, "bad option '%s' to 'new' (positive number of seconds expected, got %s)",
                   d->name, luapool__got(L, -1));
      memcpy(field, &(double){(double)n}, sizeof(double));
      break;
    }
    case LP_OPT_NAME: {
      size_t len = 0, cap = sizeof((lp_pool_config *)0)->name;
      const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
      /* A NUL is refused: the C string stops there ("a\0b" was silently cut
      ** to "a").  ("else if": the analyzer does not know that luaL_error
      ** never returns.) */
      if (s == NULL) /* (what it got, as every other option says it) */
        luaL_error(
            L, "bad option '%s' to 'new' (non-empty string of at most %d bytes expected, got %s)",
            d->name, (int)cap - 9, luapool__got(L, -1));
      else if (len == 0 || len >= cap - 8)
        luaL_error(
            L,
            "bad option '%s' to 'new' (non-empty string of at most %d bytes expected, got %I "
            "bytes)",
            d->name, (int)cap - 9, (lua_Integer)len);
      else if (memchr(s, '\0', len) != NULL)
        luaL_error(L, "bad option '%s' to 'new' (string without NUL bytes expected)", d->name);
      else
        snprintf(field, cap, "%s", s);
      break;
    }
    case LP_OPT_CHOICE: {
      const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
      int k = 0;
      while (v && d->choices[k] && strcmp(d->choices[k], v) != 0)
        k++;
      if (v == NULL || d->choices[k] == NULL) {
        /* (what it got first: luapool__got() may push, and the order in which a
        ** call's arguments are worked out is C's to choose: "(1 expected,
        ** got 1)" for on_crash = 1) */
        const char *g = v ? v : luapool__got(L, -1);
        push_choices(L, d->choices);
        luaL_error(L, "bad option '%s' to 'new' (%s expected, got %s)", d->name,
                   lua_tostring(L, -1), g);
      }
      memcpy(field, &k, sizeof(int));
      break;
    }
    case LP_OPT_BOOL:
      if (lua_type(L, -1) != LUA_TBOOLEAN)
        luaL_error(L, "bad option '%s' to 'new' (boolean expected, got %s)", d->name,
                   luapool__got(L, -1));
      memcpy(field, &(int){lua_toboolean(L, -1)}, sizeof(int));
      break;
    case LP_OPT_FUNCTION:
      if (lua_type(L, -1) != LUA_TFUNCTION)
        luaL_error(L, "bad option '%s' to 'new' (function expected, got %s)", d->name,
                   luaL_typename(L, -1));
      break;
    case LP_OPT_TABLE:
      if (!lua_istable(L, -1))
        luaL_error(L, "bad option '%s' to 'new' (table expected, got %s)", d->name,
                   luaL_typename(L, -1));
      break;
  }
}

static const lp_option *find_option(const lp_option *list, const char *name) {
  for (; list && list->name; list++)
    if (strcmp(list->name, name) == 0) return list;
  return NULL;
}

/* An option of no pool of this kind: say which kinds have it. */
/* "a" or "an" before a pool kind, as said: "an mpipool" (em-pee-eye). */
static const char *article(const char *kind) {
  return strchr("aeiou", kind[0]) != NULL || strncmp(kind, "mpi", 3) == 0 ? "an" : "a";
}

static void refuse_option(lua_State *L, const lp_engine *e, const char *name) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  int n = 0, per_process = 0;
  const lp_option *d;
  for (int i = 0; luapool__engines[i]; i++)
    if (luapool__engines[i] != e && (d = find_option(luapool__engines[i]->options, name))) {
      if (n++) luaL_addchar(&b, '/');
      luaL_addstring(&b, luapool__engines[i]->kind);
      per_process |= d->per_process;
    }
  luaL_pushresult(&b);
  if (n == 0) luaL_error(L, "unknown option '%s' to 'new'", name);
  const char *kinds = lua_tostring(L, -1);
  const char *note = per_process ? e->foreign_note : NULL;
  luaL_error(L, "bad option '%s' to 'new' (%s %s option%s%s)", name, article(kinds), kinds,
             note ? ": " : "", note ? note : "");
}

/* Is the table at 1 a module (its "new" a function)?  No options table
** has that key. */
static int is_module(lua_State *L) {
  lua_pushliteral(L, "new");
  int fn = lua_rawget(L, 1) == LUA_TFUNCTION;
  lua_pop(L, 1);
  return fn;
}

/* Checks every key of the options table at 1 and fills c and config. */
static void read_options(lua_State *L, const lp_engine *e, lp_pool_config *c, void *config) {
  /* (named: called through pcall, luaL_checktype would say '?') */
  if (!lua_istable(L, 1))
    luaL_error(L, "bad argument #1 to 'new' (table expected, got %s)", luaL_typename(L, 1));
  /* threadpool:new{...}: the module itself came as the options (it said
  ** "unknown option 'new' to 'new'": helper-52) */
  if (is_module(L)) {
    luaL_error(L,
               "bad argument #1 to 'new' (options table expected, got the %s module: write "
               "%s.new{...}, with a dot)",
               e->kind, e->kind);
  }
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    const lp_option *d = k ? find_option(common_options, k) : NULL;
    if (d) {
      read_option(L, d, (char *)c);
    } else if (k && (d = find_option(e->options, k)) != NULL) {
      read_option(L, d, config);
    } else {
      lua_pop(L, 1);
      refuse_option(L, e, luaL_tolstring(L, -1, NULL));
    }
    lua_pop(L, 1);
  }
}
/* }====== */

int luapool__pool_new(lua_State *L, const lp_engine *e) {
  lp_pool_config c = {.max_workers = 0};
  /* the engine's options, read in place: no engine has more than this */
  _Alignas(max_align_t) char config[256] = {0};
  if (e->config_size > sizeof config) return luaL_error(L, "%s: options too large", e->kind);
  if (e->config_defaults) e->config_defaults(config);
  if (!lua_isnoneornil(L, 1)) read_options(L, e, &c, config);
  /* The initializer travels as one task message, encoded once now so that
  ** what cannot travel is refused here, not in a worker. */
  lp_buf *ib = NULL;
  int ib_idx = 0;
  if (!lua_isnoneornil(L, 1)) {
    lua_settop(L, 1);
    if (lua_getfield(L, 1, "initializer") != LUA_TNIL) { /* 2 */
      ib = luapool__scratch(L);                          /* 3 */
      lua_insert(L, 2);                                  /* scratch 2, initializer 3 */
      ib_idx = 2;
      int nargs = 0;
      if (lua_getfield(L, 1, "initargs") == LUA_TTABLE) { /* 4 */
        nargs = (int)lua_rawlen(L, 4);
        luaL_checkstack(L, nargs, "too many initargs");
        for (int i = 1; i <= nargs; i++)
          lua_rawgeti(L, 4, i);
      }
      lua_remove(L, 4);
      lp_encode_ctx ctx = {.root = "initializer argument", .root_base = 1, .first = "initializer"};
      if (luapool__put_u8(ib, LP_MSG_SINGLE) || luapool__put_u32(ib, (uint32_t)nargs + 1))
        return luaL_error(L, "cannot create a pool: not enough memory");
      if (luapool__encode(L, ib, 3, nargs + 1, &ctx) != 0) {
        luapool__scratch_release(L, 2);
        return luaL_error(L, "%s", ctx.err);
      }
      lua_settop(L, 2);
    } else {
      lua_settop(L, 1);
    }
  } else if (lua_isnil(L, 1)) {
    lua_settop(L, 0);
  }
  size_t pl, cl;
  push_package_field(L, "path");
  push_package_field(L, "cpath");
  const char *lpath = lua_tolstring(L, -2, &pl), *lcpath = lua_tolstring(L, -1, &cl);
  lpool *u = lua_newuserdatauv(L, sizeof *u, 6);
  u->p = NULL;
  luaL_setmetatable(L, LUAPOOL_POOL_MT);
  lua_newtable(L); /* futures whose done callbacks are still owed */
  lua_setiuservalue(L, -2, 1);
  lua_pushvalue(L, -3); /* the paths seen last (see check_paths) */
  lua_setiuservalue(L, -2, 2);
  lua_pushvalue(L, -2);
  lua_setiuservalue(L, -2, 3);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  lua_getfield(L, -1, "package"); /* the table require reads */
  lua_remove(L, -2);
  lua_setiuservalue(L, -2, 4);
  luapool__future_mt(L, -1); /* what its futures get */
  lua_setiuservalue(L, -2, 5);
  luapool__codec_state(L);
  lua_setiuservalue(L, -2, 6);
  u->seen_path = lua_topointer(L, -3);
  u->seen_cpath = lua_topointer(L, -2);
  /* Everything below is plain C until the pool is complete: no raise.
  ** (ib is a scratch buffer this call owns: anchored at ib_idx.) */
  char *init_msg = NULL;
  size_t init_len = 0;
  char err[512]; /* (an mpipool refusal names two builds) */
  if (ib && (init_msg = lp_malloc(ib->len)) != NULL) {
    memcpy(init_msg, ib->p, ib->len);
    init_len = ib->len;
  }
  if (ib) ib->len = 0; /* (released once the pool is complete) */
  lp_paths *paths = luapool__paths_new(lpath, pl, lcpath, cl, 1);
  if ((ib && init_msg == NULL) || paths == NULL) {
    snprintf(err, sizeof err, "cannot create a pool: not enough memory");
  } else {
    u->p = luapool__pool_create(e, &c, config, init_msg, init_len, paths, err, sizeof err);
  }
  if (ib_idx) luapool__scratch_release(L, ib_idx);
  if (u->p == NULL) {
    lp_free(init_msg);
    luapool__paths_unref(paths);
    return luaL_error(L, "%s", err);
  }
  return 1;
}

static void check_fn(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TFUNCTION) luaL_typeerror(L, idx, "function or kernel");
}

/* Queues a message as a new future and pushes its userdata.  Raises on
** failure (the message is freed first). */
static lp_future *submit_message(lua_State *L, lp_pool *p, int pool_idx, lp_buf *b, int ncalls,
                                 double timeout, uint64_t task_no, int64_t lo) {
  check_paths(L, pool_idx, p);
  lua_getiuservalue(L, pool_idx, 5);            /* the futures' metatable */
  void *ud = luapool__future_push(L, NULL, -1); /* born empty: may raise */
  lua_remove(L, -2);
  lp_future *f = luapool__future_new(b, ncalls);
  if (f == NULL) {
    luaL_error(L, "cannot submit: not enough memory");
    return NULL; /* not reached */
  }
  luapool__paths_ref(p->paths);
  f->paths = p->paths;
  f->timeout = timeout;
  f->task_no = task_no;
  f->item_lo = lo;
  char err[160];
  if (luapool__pool_submit(p, f, err, sizeof err) != 0) {
    luapool__future_unref(f);
    luaL_error(L, "%s", err);
  }
  luapool__future_fill(ud, f);
  return f;
}

static int pool_submit(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  check_fn(L, 2);
  if (atomic_load_explicit(&p->ncb, memory_order_acquire)) luapool__pool_poll(L, 1); /* owed? */
  if (p->closing) return luaL_error(L, "cannot submit after shutdown");
  int n = lua_gettop(L) - 1;
  lua_getiuservalue(L, 1, 6);             /* the codec state, at n+2 */
  lp_buf *b = luapool__scratch_in(L, -1); /* at n+3 */
  lp_encode_ctx ctx = {.root = "argument", .root_base = 1, .cstate = n + 2};
  if (luapool__buf_reserve(b, 5)) return luaL_error(L, "cannot submit: not enough memory");
  uint32_t nargs = (uint32_t)n;
  b->p[0] = LP_MSG_SINGLE; /* (the buffer is empty) */
  memcpy(b->p + 1, &nargs, 4);
  b->len = 5;
  if (luapool__encode(L, b, 2, n, &ctx) != 0) {
    luapool__scratch_release(L, n + 3);
    return luaL_error(L, "%s", ctx.err);
  }
  submit_message(L, p, 1, b, 1, p->task_timeout, ++p->nsubmitted, 0);
  luapool__scratch_release(L, n + 3);
  return 1;
}

/* {======================================================
** Primitives of the Lua layer (lua/luapool/executor.lua): map, starmap,
** imap, as_completed and wait are written there on top of these.
** ======================================================= */

/* submit_chunk(pool, fn, items, lo, hi, star [, task_timeout [, first]])
** -> future, or nil + message (first: the caller's number for items[lo],
** default lo, used in labels and refusals)
** when a value cannot travel or the pool takes no more work (the caller
** raises at its caller's level).  One task message runs fn on items[lo..hi]
** (each an argument list when star). */
static int prim_submit_chunk(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_Integer lo = luaL_checkinteger(L, 4), hi = luaL_checkinteger(L, 5);
  int star = lua_toboolean(L, 6);
  double timeout = luaL_optnumber(L, 7, p->task_timeout);
  lua_Integer first_no = luaL_optinteger(L, 8, lo), shift = first_no - lo;
  lua_settop(L, 6);
  luaL_argcheck(L, lo >= 1 && hi >= lo && hi - lo < INT32_MAX, 4, "bad chunk");
  luapool__pool_poll(L, 1);
  if (p->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "cannot submit after shutdown");
    return 2;
  }
  lp_buf *b = luapool__scratch(L); /* 7 */
  lp_encode_ctx ctx = {.root = "argument", .root_base = 1};
  if (luapool__put_u8(b, LP_MSG_BATCH) || luapool__put_u32(b, (uint32_t)(hi - lo + 1)))
    return luaL_error(L, "cannot submit: not enough memory");
  if (luapool__encode(L, b, 2, 1, &ctx) != 0) goto refuse;
  for (lua_Integer i = lo; i <= hi; i++) {
    lua_rawgeti(L, 3, i); /* 8 */
    int nargs = 1, first = 8;
    if (star) {
      if (!lua_istable(L, 8)) {
        snprintf(ctx.err, sizeof ctx.err, "bad item #%lld (table of arguments expected, got %s)",
                 (long long)(i + shift), luaL_typename(L, 8));
        goto refuse;
      }
      nargs = (int)lua_rawlen(L, 8);
      luaL_checkstack(L, nargs, "too many arguments");
      for (int a = 1; a <= nargs; a++)
        lua_rawgeti(L, 8, a);
      first = 9;
    }
    char of_item[40];
    if (star) { /* starmap: "argument #2 of item #7" */
      snprintf(of_item, sizeof of_item, " of item #%lld", (long long)(i + shift));
      ctx.root = "argument";
      ctx.root_base = 1;
      ctx.suffix = of_item;
    } else {
      ctx.root = "item";
      ctx.root_base = (int)(i + shift);
    }
    if (luapool__put_u32(b, (uint32_t)nargs))
      return luaL_error(L, "cannot submit: not enough memory");
    int r = luapool__encode(L, b, first, nargs, &ctx);
    ctx.suffix = NULL;
    lua_settop(L, 7);
    if (r != 0) goto refuse;
  }
  submit_message(L, p, 1, b, (int)(hi - lo + 1), timeout, 0, lo + shift);
  luapool__scratch_release(L, 7);
  return 1;
refuse:
  luapool__scratch_release(L, 7);
  lua_pushnil(L);
  lua_pushstring(L, ctx.err);
  return 2;
}

/* Lets the collector take the step its debt asks for, as every API call
** that makes an object does.  lua_rawseti grows `out` with no such check,
** so a map of many small results (numbers, booleans: nothing of their own
** to allocate) ran up the debt of out's whole array unpaid, and the first
** allocation after the map, in whatever the script did next, paid it at
** once: a collector step as long as the debt, a whole cycle of 7-38 ms
** after a map of 100,000 (issue #13: the CPU job's first chunk waited so
** on rank 0).  Checked at each chunk, the debt is paid within the map
** that ran it up.  ("" is interned: the push makes nothing.) */
static void collector_check(lua_State *L) {
  lua_pushliteral(L, "");
  lua_pop(L, 1);
}

/* chunk_into(future, out, offset [, timeout]) -> true when every call's
** first value is stored at out[offset + k]; false + the error object of
** the first call that failed + its number in the chunk (from 1; also when
** one call failed the chunk as a whole, a process worker killed at its
** deadline: f->fail_call; absent when the chunk failed for no one call: a
** crash, a cancel...), the values before it stored; nil when the timeout
** expired first. */
static int prim_chunk_into(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer offset = luaL_checkinteger(L, 3);
  double timeout = lua_isnoneornil(L, 4) ? -1 : luaL_checknumber(L, 4);
  lua_settop(L, 3);
  luapool__future_push_pool(L, 1);
  luapool__pool_poll(L, 4);
  int w = luapool__future_wait(f, timeout < 0 ? -1 : timeout);
  if (w < 0) luapool__check_signal(L);
  if (w <= 0) {
    lua_pushnil(L);
    return 1;
  }
  lp_reader r = {NULL, NULL};
  int finished = luapool__future_state(f) == LP_FINISHED; /* each call has its outcome */
  luapool__future_mark_read(f);                           /* (lfuture.c's outcome) */
  for (int k = 0; k < f->ncalls; k++) {
    int top = lua_gettop(L);
    if (luapool__future_outcome(L, f, &r, 1) < 0) {
      lua_pushboolean(L, 0);
      lua_insert(L, -2);
      if (!finished) { /* the whole chunk failed: one call may have made it */
        if (luapool__future_state(f) != LP_FAILED || f->fail_call == 0) return 2;
        lua_pushinteger(L, (lua_Integer)f->fail_call);
        return 3;
      }
      lua_pushinteger(L, k + 1);
      return 3;
    }
    if (lua_gettop(L) == top) lua_pushnil(L);
    lua_rawseti(L, 2, offset + k);
  }
  collector_check(L);
  lua_pushboolean(L, 1);
  return 1;
}

/* cancel(future) -> true when it was still queued and is now cancelled */
static int prim_cancel(lua_State *L) {
  lp_future *f = luapool__check_future(L, 1);
  lua_pushboolean(L, luapool__future_cancel(f));
  return 1;
}

/* error(kind, message) -> an error object */
static int prim_error(lua_State *L) {
  static const char *const kinds[] = {"task",   "timeout",  "cancelled",   "crashed",
                                      "broken", "transfer", "interrupted", NULL};
  int k = luaL_checkoption(L, 1, NULL, kinds);
  luapool__push_error(L, (lp_ekind)k, luaL_checkstring(L, 2), NULL, NULL, 0);
  return 1;
}

static int prim_isatty(lua_State *L) {
  lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)));
  return 1;
}

static int prim_is_future(lua_State *L) {
  lua_pushboolean(L, luapool__is_future(L, 1));
  return 1;
}

static int prim_chunk_size(lua_State *L) {
  lua_pushinteger(L, luapool__check_future(L, 1)->ncalls);
  return 1;
}

/* closing(pool) -> whether the pool takes no more work: map and imap of an
** empty input submit nothing, and so did not raise "cannot submit after
** shutdown" as a non-empty one does (helper-52). */
static int prim_closing(lua_State *L) {
  lua_pushboolean(L, luapool__check_pool(L, 1)->closing);
  return 1;
}

static const luaL_Reg prims[] = {{"submit_chunk", prim_submit_chunk},
                                 {"closing", prim_closing},
                                 {"chunk_into", prim_chunk_into},
                                 {"chunk_size", prim_chunk_size},
                                 {"cancel", prim_cancel},
                                 {"error", prim_error},
                                 {"isatty", prim_isatty},
                                 {"is_future", prim_is_future},
                                 {"cq", luapool__cq_new},
                                 {NULL, NULL}};

void luapool__push_prims(lua_State *L) { luaL_newlib(L, prims); }

/* }====================================================== */

static int pool_stats(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  luapool__pool_poll(L, 1);
  int workers = 0, idle = 0;
  pthread_mutex_lock(&p->mu);
  p->eng->stats(p, &workers, &idle);
  pthread_mutex_unlock(&p->mu);
  lua_createtable(L, 0, 8);
  lua_pushinteger(L, workers);
  lua_setfield(L, -2, "workers");
  lua_pushinteger(L, idle);
  lua_setfield(L, -2, "idle");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_pending));
  lua_setfield(L, -2, "pending");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_running));
  lua_setfield(L, -2, "running");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_done));
  lua_setfield(L, -2, "done");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_failed));
  lua_setfield(L, -2, "failed");
  lua_pushinteger(L, (lua_Integer)atomic_load(&p->c_cancelled));
  lua_setfield(L, -2, "cancelled");
  return 1;
}

static int pool_shutdown(lua_State *L) {
  lp_pool *p = luapool__check_pool(L, 1);
  int wait = 1, cancel = 0, cancel_running = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, 2)) {
      if (lua_type(L, -2) != LUA_TSTRING) { /* named by a copy: lua_next needs the key */
        lua_pushvalue(L, -2);
        return luaL_error(L, "unknown option '%s' to 'shutdown'", luaL_tolstring(L, -1, NULL));
      }
      const char *k = lua_tostring(L, -2);
      int *flag = strcmp(k, "wait") == 0             ? &wait
                  : strcmp(k, "cancel_futures") == 0 ? &cancel
                  : strcmp(k, "cancel_running") == 0 ? &cancel_running
                                                     : NULL;
      if (flag == NULL) return luaL_error(L, "unknown option '%s' to 'shutdown'", k);
      /* Booleans only, as every other options table: read by truthiness,
      ** wait = "no" (or "false") waited and cancel_futures = 0 cancelled
      ** (helper-52). */
      if (lua_type(L, -1) != LUA_TBOOLEAN)
        return luaL_error(L, "bad option '%s' to 'shutdown' (boolean expected, got %s)", k,
                          luapool__got(L, -1));
      *flag = lua_toboolean(L, -1);
      lua_pop(L, 1);
    }
  }
  /* cancel_running: what runs is cancelled too, where the engine can (an
  ** iopool aborts its transfers); cancel_futures alone leaves it running,
  ** as concurrent.futures does. */
  if (cancel_running && p->eng->cancel_running == NULL)
    return luaL_error(L,
                      "bad option 'cancel_running' to 'shutdown' (%s %s cannot cancel a "
                      "running task)",
                      article(p->eng->kind), p->eng->kind);
  /* wait = false: do not block now, but the work still runs, and the
  ** pool's collection (at the latest the program's end) waits for it. */
  if (!wait) p->drain = 1;
  if (cancel_running) {
    luapool__pool_stop(p, 0, 1, 0, NULL); /* closed, the queue cancelled */
    p->eng->cancel_running(p);
  }
  luapool__pool_stop(p, wait, cancel, 0, NULL);
  luapool__pool_poll(L, 1);
  luapool__check_signal(L);
  return 0;
}

/* <close>: waits for the work; when the scope is left by an error, the
** queued tasks are cancelled first (the script is failing anyway). */
static int pool_close(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p) {
    luapool__pool_stop(u->p, 1, !lua_isnoneornil(L, 2), 0, NULL);
    luapool__pool_poll(L, 1);
  }
  return 0;
}

/* Collected or still open at exit: never hang, never leave a worker.
** Queued tasks are cancelled and running ones interrupted. */
static int pool_gc(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p) {
    lp_pool *p = u->p;
    lp_stop_counts c = {0, 0};
    /* Shut down with wait = false: its work still runs to the end. */
    int was_open = !p->closing;
    int stuck =
        p->drain ? luapool__pool_stop(p, 1, 0, 0, NULL) : luapool__pool_stop(p, 1, 1, 1, &c);
    if (was_open && (c.cancelled || c.interrupted)) {
      fprintf(stderr,
              "luapool: pool '%s' was collected while still open: %zu queued task%s "
              "cancelled, %zu running task%s interrupted (close it, or call shutdown(), "
              "to wait for its work)\n",
              p->name, c.cancelled, c.cancelled == 1 ? "" : "s", c.interrupted,
              c.interrupted == 1 ? "" : "s");
      fflush(stderr);
    }
    if (stuck) { /* the pool stays allocated: its stuck threads use it */
      fprintf(stderr,
              "luapool: %d worker thread(s) of pool '%s' did not stop within %.2g "
              "seconds and were left running\n",
              stuck, u->p->name, u->p->stuck_after);
      luapool__pool_forget(u->p);
    } else {
      luapool__pool_destroy(u->p);
    }
    u->p = NULL;
  }
  return 0;
}

static int pool_tostring(lua_State *L) {
  lpool *u = to_lpool(L, 1);
  if (u->p == NULL)
    lua_pushliteral(L, "luapool.pool (closed)");
  else
    lua_pushfstring(L, "%s '%s' (%d worker%s max)%s", u->p->eng->kind, u->p->name,
                    u->p->max_workers, u->p->max_workers == 1 ? "" : "s",
                    u->p->closing ? " (shut down)" : "");
  return 1;
}

/* __index: a method (one raw lookup in the methods table, the upvalue),
** else one of the pool's read-only fields. */
static int pool_index(lua_State *L) {
  lua_settop(L, 2);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
  lp_pool *p = luapool__check_pool(L, 1);
  const char *k = lua_tostring(L, 2);
  if (k == NULL) k = ""; /* no such field */
  if (strcmp(k, "max_workers") == 0)
    lua_pushinteger(L, p->max_workers);
  else if (strcmp(k, "name") == 0)
    lua_pushstring(L, p->name);
  else if (strcmp(k, "task_timeout") == 0 && p->task_timeout > 0)
    lua_pushnumber(L, p->task_timeout);
  else if (strcmp(k, "kind") == 0)
    lua_pushstring(L, p->eng->kind);
  else if (strcmp(k, "chunking") == 0)
    lua_pushboolean(L, p->eng->chunking);
  else if (strcmp(k, "concurrency") == 0 && p->eng->concurrency)
    lua_pushinteger(L, p->eng->concurrency(p));
  else
    lua_pushnil(L);
  return 1;
}

/* map, starmap and imap are added by the Lua layer. */
static const luaL_Reg pool_methods[] = {
    {"submit", pool_submit}, {"shutdown", pool_shutdown}, {"stats", pool_stats}, {NULL, NULL}};

static int pool_owes(lp_pool *p) { return luapool__pool_owes(p); }

static const lp_pool_face pool_face = {.owes = pool_owes,
                                       .poll = luapool__pool_poll,
                                       .watch = luapool__pool_watch,
                                       .to_pool = luapool__to_pool};

void luapool__pool_open(lua_State *L) {
  luapool__future_set_pool_face(&pool_face);
  if (luaL_newmetatable(L, LUAPOOL_POOL_MT)) {
    lua_pushlightuserdata(L, (void *)&POOL_MARK);
    lua_rawseti(L, -2, 1);
    luaL_newlib(L, pool_methods);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "methods"); /* for the Lua layer to extend */
    lua_pushcclosure(L, pool_index, 1);
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
