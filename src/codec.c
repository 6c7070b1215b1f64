/*
** The value codec: Lua values <-> bytes.  One format for every backend.
**
** A message is a sequence of tagged values.  Tables and Lua functions get
** reference ids in the order they are first met, so shared references and
** cycles arrive as they left.  Lua functions travel as bytecode (with debug
** info, so tracebacks keep file:line) plus their upvalues copied by value;
** the `_ENV` upvalue becomes the receiver's globals.
** C functions travel by name; only the standard library's and luapool's are
** known, and library tables and functions travel by name too.  The decoder trusts no byte: every length is checked against what
** is left, every tag and reference id is validated.  (Bytecode itself is
** checked only as far as Lua's own loader does: messages come only from this
** pool's own processes and threads, never from the network.)
*/
#include <math.h>
#include <pthread.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "luapool.h"

enum {
  T_NIL,
  T_FALSE,
  T_TRUE,
  T_INT,
  T_FLT,
  T_SSTR,   /* u8 length */
  T_STR,    /* u32 length */
  T_LSTR,   /* u64 length */
  T_TABLE,  /* u32 narr, u32 nhash, narr values, nhash pairs, metatable */
  T_REF,    /* u32 id of a table or function already in the message */
  T_LFUNC,  /* u64 fid, u64 checksum, u32 len, bytecode, u8 nups, u8 flags,
            ** upvalues */
  T_NAMED,  /* name: a library table or function, see push_names */
  T_KERNEL, /* u8 index into luapool__kernels */
  T_INT128, /* 16 bytes */
  T_ENV,    /* (as an upvalue only) the receiver's globals */
  T_LAST
};

/* {======================================================
** Buffer
** ======================================================= */

int luapool__buf_reserve(lp_buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return 0;
  if (extra > SIZE_MAX / 2 - b->len) return -1;
  size_t ncap = b->cap ? b->cap : 256;
  while (ncap - b->len < extra)
    ncap *= 2;
  char *np = realloc(b->p, ncap);
  if (np == NULL) return -1;
  b->p = np;
  b->cap = ncap;
  return 0;
}

int luapool__buf_add(lp_buf *b, const void *p, size_t n) {
  if (luapool__buf_reserve(b, n) != 0) return -1;
  if (n) memcpy(b->p + b->len, p, n);
  b->len += n;
  return 0;
}

void luapool__buf_free(lp_buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

char *luapool__buf_take(lp_buf *b, size_t *len) {
  char *p = b->p;
  *len = b->len;
  b->p = NULL;
  b->len = b->cap = 0;
  return p;
}

int luapool__put_u8(lp_buf *b, unsigned v) {
  unsigned char c = (unsigned char)v;
  return luapool__buf_add(b, &c, 1);
}

int luapool__put_u32(lp_buf *b, uint32_t v) { return luapool__buf_add(b, &v, 4); }

static int put_u64(lp_buf *b, uint64_t v) { return luapool__buf_add(b, &v, 8); }

int luapool__put_string(lp_buf *b, const char *s, size_t len) {
  if (luapool__buf_reserve(b, len + 9) != 0) return -1;
  if (len < 256) {
    luapool__put_u8(b, T_SSTR);
    luapool__put_u8(b, (unsigned)len);
  } else if (len <= UINT32_MAX) {
    luapool__put_u8(b, T_STR);
    luapool__put_u32(b, (uint32_t)len);
  } else {
    luapool__put_u8(b, T_LSTR);
    put_u64(b, (uint64_t)len);
  }
  return luapool__buf_add(b, s, len);
}

int luapool__put_value(lp_buf *b, const lp_value *v) {
  switch (v->type) {
    case LP_NIL: return luapool__put_u8(b, T_NIL);
    case LP_BOOL: return luapool__put_u8(b, v->u.b ? T_TRUE : T_FALSE);
    case LP_INT:
      if (luapool__put_u8(b, T_INT)) return -1;
      return luapool__buf_add(b, &v->u.i, sizeof(lua_Integer));
    case LP_NUM:
      if (luapool__put_u8(b, T_FLT)) return -1;
      return luapool__buf_add(b, &v->u.n, sizeof(lua_Number));
    case LP_STR: return luapool__put_string(b, v->u.s.p, v->u.s.len);
    case LP_INT128:
      if (luapool__put_u8(b, T_INT128)) return -1;
      return luapool__buf_add(b, &v->u.big, 16);
    default: return luapool__put_u8(b, T_NIL);
  }
}

/* }====================================================== */

/* {======================================================
** Encoder
** ======================================================= */

/* One step of the path from the root to the value being encoded; the text
** is produced only when an error needs it. */
enum { SEG_INDEX, SEG_FIELD, SEG_KEYOF, SEG_ISKEY, SEG_META, SEG_UPVAL };
typedef struct seg {
  int kind;
  int idx;          /* stack index of the key, or of the function */
  lua_Integer i;    /* SEG_INDEX */
  const char *name; /* SEG_UPVAL */
} seg;

/* One encode in progress: on the C stack of luapool__encode, so that an
** encode cut short by a Lua error leaves nothing behind, and one started by
** a __gc in the middle of another is independent of it. */
typedef struct luapool_encoder {
  lp_buf *bp; /* where it writes */
  lua_State *L;
  lp_encode_ctx *ctx;
  int seen; /* stack index of the table (value -> ref id), 0 until needed */
  uint32_t nseen;
  int depth;
  int root; /* number of the root value being encoded */
  seg path[LUAPOOL_MAXDEPTH + 2];
} luapool_encoder;

/* The state's scratch buffer lives in a userdata: a Lua error raised while
** it holds bytes cannot leak them. */
typedef struct scratch {
  lp_buf b;
  int taken; /* handed out and not released yet */
} scratch;

/* Registry keys: the addresses of these (pointer keys are found without
** hashing a string, and these lookups are on every submit). */
static const char SCRATCH_KEY, DUMPS_KEY, CFNAMES_KEY, FCACHE_KEY;

/* Function ids: a random base per process plus a counter, so ids from
** different worker processes never collide in a receiver's cache. */
static atomic_uint_fast64_t next_fid;
static pthread_once_t fid_once = PTHREAD_ONCE_INIT;

static void fid_init(void) {
  uint64_t base;
  if (getrandom(&base, sizeof base, 0) != (ssize_t)sizeof base)
    base = ((uint64_t)getpid() << 40) ^ (uint64_t)time(NULL);
  atomic_store(&next_fid, base | 1);
}

/* FNV-1a, 64 bits: enough to catch corrupted bytecode. */
static uint64_t checksum(const char *p, size_t n) {
  uint64_t h = 14695981039346656037ull;
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)p[i];
    h *= 1099511628211ull;
  }
  return h;
}

static int scratch_gc(lua_State *L) {
  scratch *sc = lua_touserdata(L, 1);
  luapool__buf_free(&sc->b);
  return 0;
}

/* The state's buffer is handed out with a flag, not taken out of the
** registry (that cost more than the rest of a submit).  A caller nested
** meanwhile (a __gc that submits in the middle of an encode) finds it
** taken and gets a buffer of its own, which the GC frees.  A Lua error
** between take and release (no memory) leaves the flag set: later callers
** then get their own buffers too, correct if a little slower. */
lp_buf *luapool__scratch(lua_State *L) {
  scratch *sc = NULL;
  int registered = lua_rawgetp(L, LUA_REGISTRYINDEX, &SCRATCH_KEY) == LUA_TUSERDATA;
  if (registered) sc = lua_touserdata(L, -1);
  if (sc == NULL || sc->taken) {
    lua_pop(L, 1);
    sc = lua_newuserdatauv(L, sizeof *sc, 0);
    memset(sc, 0, sizeof *sc);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    if (!registered) { /* the first one becomes the state's */
      lua_pushvalue(L, -1);
      lua_rawsetp(L, LUA_REGISTRYINDEX, &SCRATCH_KEY);
    }
  }
  sc->taken = 1;
  sc->b.len = 0;
  return &sc->b; /* its userdata is on top of the stack */
}

void luapool__scratch_release(lua_State *L, int idx) {
  scratch *sc = lua_touserdata(L, idx);
  sc->b.len = 0;
  sc->taken = 0;
}

/* Pushes a registry table, creating it (weak-keyed when asked) if needed. */
static void registry_table(lua_State *L, const char *key, const char *mode) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, key) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_newtable(L);
  if (mode) {
    lua_createtable(L, 0, 1);
    lua_pushstring(L, mode);
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
  }
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, key);
}

static int enc_nomem(luapool_encoder *e);

/* Values that travel by name: the standard library tables and luapool's
** (with its sub-tables), and every function in them, Lua or C.  The
** receiver looks the name up in its own package.loaded, so a task that
** captured `local luapool = require "luapool"` or `string.format` gets the
** worker's own. */
static void add_named(lua_State *L, int names, const char *prefix, int depth) {
  /* table to scan at -1; its own name is prefix */
  lua_pushvalue(L, -1);
  lua_pushstring(L, prefix);
  lua_rawset(L, names);
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      const char *k = lua_tostring(L, -2);
      char sub[96];
      if (strcmp(prefix, "_G") == 0)
        snprintf(sub, sizeof sub, "%s", k);
      else
        snprintf(sub, sizeof sub, "%s.%s", prefix, k);
      if (lua_type(L, -1) == LUA_TFUNCTION) {
        lua_pushvalue(L, -1);
        lua_rawget(L, names);
        int known = !lua_isnil(L, -1); /* first name found wins */
        lua_pop(L, 1);
        if (!known) {
          lua_pushvalue(L, -1);
          lua_pushstring(L, sub);
          lua_rawset(L, names);
        }
      } else if (depth > 0 && lua_istable(L, -1)) {
        add_named(L, names, sub, depth - 1);
      }
    }
    lua_pop(L, 1);
  }
}

static void push_names(lua_State *L) {
  static const char *const libs[] = {"luapool", "string",    "table", "math",    "io", "os",
                                     "utf8",    "coroutine", "debug", "package", "_G", NULL};
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &CFNAMES_KEY) == LUA_TTABLE) return;
  lua_pop(L, 1);
  lua_newtable(L);
  int names = lua_gettop(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  for (int i = 0; libs[i]; i++) {
    if (lua_getfield(L, -1, libs[i]) == LUA_TTABLE) {
      lua_pushvalue(L, -1);
      lua_rawget(L, names);
      int known = !lua_isnil(L, -1);
      lua_pop(L, 1);
      if (!known) add_named(L, names, libs[i], strcmp(libs[i], "luapool") == 0);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_pushvalue(L, names);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &CFNAMES_KEY);
}

/* Writes a reference by name when the value at idx has one: 1 written,
** 0 not a named value, -1 no memory. */
static int enc_named(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  push_names(L);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) != LUA_TSTRING) {
    lua_pop(L, 2);
    return 0;
  }
  size_t len;
  const char *name = lua_tolstring(L, -1, &len);
  int r = luapool__put_u8(e->bp, T_NAMED) || luapool__put_string(e->bp, name, len);
  e->ctx->named = 1;
  lua_pop(L, 2);
  return r ? enc_nomem(e) : 1;
}

static const char *describe(lua_State *L, int idx) {
  switch (lua_type(L, idx)) {
    case LUA_TUSERDATA: return "a userdata";
    case LUA_TLIGHTUSERDATA: return "a light userdata";
    case LUA_TTHREAD: return "a coroutine";
    case LUA_TFUNCTION:
      return "a C function that is neither in the standard library nor in "
             "luapool";
    default: return "a value that cannot travel";
  }
}

static void seg_text(luapool_encoder *e, const seg *s, luaL_Buffer *b) {
  lua_State *L = e->L;
  switch (s->kind) {
    case SEG_INDEX: lua_pushfstring(L, "index %I", (LUAI_UACINT)s->i); break;
    case SEG_FIELD: {
      const char *k = lua_tostring(L, s->idx);
      lua_pushfstring(L, "field '%s'", k);
      break;
    }
    case SEG_KEYOF: lua_pushfstring(L, "value at a %s key", luaL_typename(L, s->idx)); break;
    case SEG_ISKEY: lua_pushliteral(L, "a key"); break;
    case SEG_META: lua_pushliteral(L, "metatable"); break;
    case SEG_UPVAL: {
      lua_Debug ar;
      lua_pushvalue(L, s->idx);
      lua_getinfo(L, ">S", &ar);
      lua_pushfstring(L, "upvalue '%s' of function <%s:%d>", s->name, ar.short_src, ar.linedefined);
      break;
    }
  }
  luaL_addvalue(b);
}

#define SUFFIX(e) ((e)->ctx->suffix ? (e)->ctx->suffix : "")

/* Writes "cannot send ROOT #N: PATH is WHAT" into ctx->err. */
static int enc_error(luapool_encoder *e, const char *what) {
  lua_State *L = e->L;
  luaL_Buffer b;
  if (!lua_checkstack(L, 8)) {
    snprintf(e->ctx->err, sizeof e->ctx->err, "cannot send %s #%d%s: %s", e->ctx->root, e->root,
             SUFFIX(e), what);
    return -1;
  }
  luaL_buffinit(L, &b);
  lua_pushfstring(L, "cannot send %s #%d%s: ", e->ctx->root, e->root, SUFFIX(e));
  luaL_addvalue(&b);
  if (e->depth == 0 || what[0] == 'n') {
    luaL_addstring(&b, what);
  } else {
    for (int d = e->depth; d >= 1; d--) {
      seg_text(e, &e->path[d], &b);
      if (d > 1) luaL_addstring(&b, " of ");
    }
    luaL_addstring(&b, " is ");
    luaL_addstring(&b, what);
  }
  luaL_pushresult(&b);
  snprintf(e->ctx->err, sizeof e->ctx->err, "%s", lua_tostring(L, -1));
  lua_pop(L, 1);
  return -1;
}

static int enc_nomem(luapool_encoder *e) {
  snprintf(e->ctx->err, sizeof e->ctx->err, "cannot send %s #%d%s: not enough memory", e->ctx->root,
           e->root, SUFFIX(e));
  return -1;
}

static int enc_value(luapool_encoder *e, int idx);

/* Returns 1 (and writes a reference) when the object at idx was seen; else
** records it with the next id and returns 0. */
static int enc_seen(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  if (e->seen == 0) {
    lua_newtable(L);
    e->seen = lua_gettop(L);
  } else {
    lua_pushvalue(L, idx);
    if (lua_rawget(L, e->seen) == LUA_TNUMBER) {
      uint32_t id = (uint32_t)lua_tointeger(L, -1);
      lua_pop(L, 1);
      if (luapool__put_u8(e->bp, T_REF) || luapool__put_u32(e->bp, id)) return enc_nomem(e);
      return 1;
    }
    lua_pop(L, 1);
  }
  lua_pushvalue(L, idx);
  lua_pushinteger(L, e->nseen++);
  lua_rawset(L, e->seen);
  return 0;
}

static int enc_enter(luapool_encoder *e, int kind, int idx, lua_Integer i, const char *name) {
  if (e->depth + 1 >= LUAPOOL_MAXDEPTH) { /* the root is level 1 */
    char msg[64];
    snprintf(msg, sizeof msg, "nesting deeper than %d levels", LUAPOOL_MAXDEPTH);
    return enc_error(e, msg);
  }
  e->depth++;
  e->path[e->depth] = (seg){kind, idx, i, name};
  return 0;
}

static int enc_table(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  int r = enc_named(e, idx);
  if (r != 0) return r < 0 ? -1 : 0;
  r = enc_seen(e, idx);
  if (r != 0) return r < 0 ? -1 : 0;
  if (!lua_checkstack(L, 6)) return enc_nomem(e);
  lua_Unsigned narr = lua_rawlen(L, idx);
  if (narr > UINT32_MAX) narr = UINT32_MAX;
  if (luapool__put_u8(e->bp, T_TABLE) || luapool__put_u32(e->bp, (uint32_t)narr) ||
      luapool__put_u32(e->bp, 0))
    return enc_nomem(e);
  size_t hpos = e->bp->len - 4;
  for (lua_Unsigned i = 1; i <= narr; i++) {
    lua_rawgeti(L, idx, (lua_Integer)i);
    e->path[e->depth + 1] = (seg){SEG_INDEX, 0, (lua_Integer)i, NULL};
    if (enc_enter(e, SEG_INDEX, 0, (lua_Integer)i, NULL) || enc_value(e, lua_gettop(L))) return -1;
    e->depth--;
    lua_pop(L, 1);
  }
  uint32_t nhash = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int k = lua_gettop(L) - 1, v = k + 1;
    int kt = lua_type(L, k);
    if (kt == LUA_TNUMBER && lua_isinteger(L, k)) {
      lua_Integer ki = lua_tointeger(L, k);
      if (ki >= 1 && (lua_Unsigned)ki <= narr) {
        lua_pop(L, 1);
        continue;
      }
    }
    if (nhash == UINT32_MAX) return enc_error(e, "a table with too many keys");
    if (enc_enter(e, SEG_ISKEY, k, 0, NULL) || enc_value(e, k)) return -1;
    e->depth--;
    int r2;
    if (kt == LUA_TSTRING)
      r2 = enc_enter(e, SEG_FIELD, k, 0, NULL);
    else if (kt == LUA_TNUMBER && lua_isinteger(L, k))
      r2 = enc_enter(e, SEG_INDEX, k, lua_tointeger(L, k), NULL);
    else
      r2 = enc_enter(e, SEG_KEYOF, k, 0, NULL);
    if (r2 || enc_value(e, v)) return -1;
    e->depth--;
    nhash++;
    lua_pop(L, 1);
  }
  memcpy(e->bp->p + hpos, &nhash, 4);
  if (lua_getmetatable(L, idx)) {
    if (enc_enter(e, SEG_META, 0, 0, NULL) || enc_value(e, lua_gettop(L))) return -1;
    e->depth--;
    lua_pop(L, 1);
  } else if (luapool__put_u8(e->bp, T_NIL)) {
    return enc_nomem(e);
  }
  return 0;
}

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  (void)L;
  return luapool__buf_add(ud, p, sz);
}

/* Pushes the cached "fid .. checksum .. bytecode" string of the Lua function at idx,
** dumping it the first time it is sent. */
static int push_dump(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  registry_table(L, &DUMPS_KEY, "k");
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) == LUA_TSTRING) {
    lua_remove(L, -2);
    return 0;
  }
  lua_pop(L, 1);
  lp_buf d = {0};
  pthread_once(&fid_once, fid_init);
  uint64_t fid = atomic_fetch_add(&next_fid, 1);
  if (put_u64(&d, fid) || put_u64(&d, 0)) return enc_nomem(e);
  lua_pushvalue(L, idx);
  int st = lua_dump(L, dump_writer, &d, 0);
  lua_pop(L, 1);
  if (st != 0) {
    luapool__buf_free(&d);
    return enc_nomem(e);
  }
  uint64_t sum = checksum(d.p + 16, d.len - 16);
  memcpy(d.p + 8, &sum, 8);
  /* lua_pushlstring may raise on memory: free d first by copying through
  ** a protected-enough path (the string is built before d is freed, so on a
  ** raise d leaks; keep that window to the one allocation). */
  lua_pushvalue(L, idx);
  lua_pushlstring(L, d.p, d.len);
  luapool__buf_free(&d);
  lua_pushvalue(L, -1);
  lua_insert(L, -4); /* result below table, key */
  lua_rawset(L, -3);
  lua_pop(L, 1);
  return 0;
}

/* Function flags: every upvalue is _ENV, so a receiver may hand out the
** closure it loaded for an earlier message (nothing in it can differ). */
#define FN_REUSABLE 1

static int enc_function(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  if (lua_iscfunction(L, idx)) {
    int k = luapool__kernel_index(lua_tocfunction(L, idx));
    if (k >= 0) {
      if (luapool__put_u8(e->bp, T_KERNEL) || luapool__put_u8(e->bp, (unsigned)k))
        return enc_nomem(e);
      return 0;
    }
  }
  int n = enc_named(e, idx);
  if (n != 0) return n < 0 ? -1 : 0;
  if (lua_iscfunction(L, idx)) return enc_error(e, describe(L, idx));
  int r = enc_seen(e, idx);
  if (r != 0) return r < 0 ? -1 : 0;
  if (!lua_checkstack(L, 6)) return enc_nomem(e);
  if (push_dump(e, idx)) return -1;
  size_t dlen;
  const char *d = lua_tolstring(L, -1, &dlen);
  if (dlen - 16 > UINT32_MAX) {
    lua_pop(L, 1);
    return enc_error(e, "a function too large to send");
  }
  e->ctx->named = 1; /* a function's upvalues may hold names */
  if (luapool__put_u8(e->bp, T_LFUNC) || luapool__buf_add(e->bp, d, 16) ||
      luapool__put_u32(e->bp, (uint32_t)(dlen - 16)) ||
      luapool__buf_add(e->bp, d + 16, dlen - 16)) {
    lua_pop(L, 1);
    return enc_nomem(e);
  }
  lua_pop(L, 1);
  int nups = 0, only_env = 1;
  const char *uname;
  while ((uname = lua_getupvalue(L, idx, nups + 1)) != NULL) {
    if (strcmp(uname, "_ENV") != 0) only_env = 0;
    lua_pop(L, 1);
    nups++;
  }
  if (luapool__put_u8(e->bp, (unsigned)nups) || luapool__put_u8(e->bp, only_env ? FN_REUSABLE : 0))
    return enc_nomem(e);
  for (int i = 1; i <= nups; i++) {
    const char *name = lua_getupvalue(L, idx, i);
    int top = lua_gettop(L);
    /* _ENV always becomes the receiver's globals, whatever table it is
    ** here (the script's globals, or a sandbox such as busted's). */
    if (strcmp(name, "_ENV") == 0) {
      lua_pop(L, 1);
      if (luapool__put_u8(e->bp, T_ENV)) return enc_nomem(e);
      continue;
    }
    if (enc_enter(e, SEG_UPVAL, idx, 0, name) || enc_value(e, top)) return -1;
    e->depth--;
    lua_pop(L, 1);
  }
  return 0;
}

static int enc_value(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  lp_buf *b = e->bp;
  switch (lua_type(L, idx)) {
    case LUA_TNIL: return luapool__put_u8(b, T_NIL) ? enc_nomem(e) : 0;
    case LUA_TBOOLEAN:
      return luapool__put_u8(b, lua_toboolean(L, idx) ? T_TRUE : T_FALSE) ? enc_nomem(e) : 0;
    case LUA_TNUMBER: {
      if (luapool__buf_reserve(b, 9)) return enc_nomem(e);
      if (lua_isinteger(L, idx)) {
        lua_Integer i = lua_tointeger(L, idx);
        b->p[b->len++] = T_INT;
        memcpy(b->p + b->len, &i, 8);
      } else {
        lua_Number n = lua_tonumber(L, idx);
        b->p[b->len++] = T_FLT;
        memcpy(b->p + b->len, &n, 8);
      }
      b->len += 8;
      return 0;
    }
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      return luapool__put_string(b, s, len) ? enc_nomem(e) : 0;
    }
    case LUA_TTABLE: return enc_table(e, idx);
    case LUA_TFUNCTION: return enc_function(e, idx);
    case LUA_TUSERDATA: {
      lp_int128 v;
      if (luapool__int128_test(L, idx, &v)) {
        if (luapool__put_u8(b, T_INT128) || luapool__buf_add(b, &v, 16)) return enc_nomem(e);
        return 0;
      }
      return enc_error(e, describe(L, idx));
    }
    default: return enc_error(e, describe(L, idx));
  }
}

int luapool__encode(lua_State *L, lp_buf *b, int first, int n, lp_encode_ctx *ctx) {
  luapool_encoder enc, *e = &enc; /* path[] is filled as it descends */
  first = lua_absindex(L, first);
  int top = lua_gettop(L);
  e->L = L;
  e->bp = b;
  e->ctx = ctx;
  e->seen = 0;
  e->nseen = 0;
  int r = 0;
  for (int i = 0; i < n && r == 0; i++) {
    e->depth = 0;
    e->root = ctx->root_base + i;
    r = enc_value(e, first + i);
  }
  lua_settop(L, top);
  return r;
}

/* }====================================================== */

/* {======================================================
** Reader and decoder
** ======================================================= */

static int get_bytes(lp_reader *r, void *dst, size_t n) {
  if ((size_t)(r->end - r->p) < n) return -1;
  memcpy(dst, r->p, n);
  r->p += n;
  return 0;
}

int luapool__get_u8(lp_reader *r, unsigned *v) {
  if (r->p >= r->end) return -1;
  *v = (unsigned char)*r->p++;
  return 0;
}

int luapool__get_u32(lp_reader *r, uint32_t *v) { return get_bytes(r, v, 4); }

/* Reads the length that follows a string tag t. */
static int get_strlen(lp_reader *r, unsigned t, size_t *len) {
  if (t == T_SSTR) {
    unsigned l;
    if (luapool__get_u8(r, &l)) return -1;
    *len = l;
  } else if (t == T_STR) {
    uint32_t l;
    if (luapool__get_u32(r, &l)) return -1;
    *len = l;
  } else {
    uint64_t l;
    if (get_bytes(r, &l, 8)) return -1;
    if (l > SIZE_MAX) return -1;
    *len = (size_t)l;
  }
  return (size_t)(r->end - r->p) < *len ? -1 : 0;
}

int luapool__get_string(lp_reader *r, const char **s, size_t *len) {
  unsigned t;
  if (luapool__get_u8(r, &t)) return -1;
  if (t != T_SSTR && t != T_STR && t != T_LSTR) return -1;
  if (get_strlen(r, t, len)) return -1;
  *s = r->p;
  r->p += *len;
  return 0;
}

int luapool__get_scalar(lp_reader *r, lp_value *v) {
  if (r->p >= r->end) return -1;
  lp_reader save = *r;
  unsigned t = (unsigned char)*r->p++;
  switch (t) {
    case T_NIL:
      v->type = LP_NIL;
      v->tname = "nil";
      return 1;
    case T_FALSE:
    case T_TRUE:
      v->type = LP_BOOL;
      v->tname = "boolean";
      v->u.b = t == T_TRUE;
      return 1;
    case T_INT:
      v->type = LP_INT;
      v->tname = "number";
      return get_bytes(r, &v->u.i, 8) ? -1 : 1;
    case T_FLT:
      v->type = LP_NUM;
      v->tname = "number";
      return get_bytes(r, &v->u.n, 8) ? -1 : 1;
    case T_SSTR:
    case T_STR:
    case T_LSTR:
      v->type = LP_STR;
      v->tname = "string";
      if (get_strlen(r, t, &v->u.s.len)) return -1;
      v->u.s.p = r->p;
      r->p += v->u.s.len;
      return 1;
    case T_INT128:
      v->type = LP_INT128;
      v->tname = "userdata";
      return get_bytes(r, &v->u.big, 16) ? -1 : 1;
    default: *r = save; return t < T_LAST ? 0 : -1;
  }
}

int luapool__peek_kernel(lp_reader *r) {
  if (r->end - r->p < 2 || (unsigned char)r->p[0] != T_KERNEL) return -1;
  unsigned k = (unsigned char)r->p[1];
  for (unsigned i = 0; i <= k; i++)
    if (luapool__kernels[i].name == NULL) return -1;
  r->p += 2;
  return (int)k;
}

typedef struct dec {
  lua_State *L;
  lp_reader *r;
  int refs; /* stack slot of the id -> object table (nil until needed) */
  uint32_t nrefs;
  int depth;
  int fcache; /* reuse functions loaded by earlier messages (workers) */
} dec;

__attribute__((noreturn)) static void malformed(dec *d, const char *what) {
  luaL_error(d->L, "malformed message: %s", what);
  abort(); /* not reached: luaL_error does not return */
}

static void dec_value(dec *d);

static void dec_register(dec *d) {
  lua_State *L = d->L;
  if (lua_isnil(L, d->refs)) {
    lua_newtable(L);
    lua_replace(L, d->refs);
  }
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->refs, (lua_Integer)d->nrefs++);
}

static void dec_enter(dec *d) {
  if (++d->depth > LUAPOOL_MAXDEPTH) malformed(d, "nesting too deep");
  luaL_checkstack(d->L, 8, "decoding a message");
}

static void dec_table(dec *d) {
  lua_State *L = d->L;
  uint32_t narr, nhash;
  if (luapool__get_u32(d->r, &narr) || luapool__get_u32(d->r, &nhash))
    malformed(d, "truncated table");
  size_t left = (size_t)(d->r->end - d->r->p);
  /* every value takes at least one byte: bound the preallocation */
  if (narr > left || nhash > left / 2) malformed(d, "table size exceeds message");
  dec_enter(d);
  lua_createtable(L, (int)(narr > INT32_MAX ? 0 : narr), (int)(nhash > INT32_MAX ? 0 : nhash));
  dec_register(d);
  int t = lua_gettop(L);
  for (uint32_t i = 1; i <= narr; i++) {
    dec_value(d);
    lua_rawseti(L, t, (lua_Integer)i);
  }
  for (uint32_t i = 0; i < nhash; i++) {
    dec_value(d);
    if (lua_isnil(L, -1)) malformed(d, "nil table key");
    if (lua_type(L, -1) == LUA_TNUMBER && isnan(lua_tonumber(L, -1))) malformed(d, "NaN table key");
    dec_value(d);
    lua_rawset(L, t);
  }
  dec_value(d);
  if (lua_istable(L, -1))
    lua_setmetatable(L, t);
  else if (lua_isnil(L, -1))
    lua_pop(L, 1);
  else
    malformed(d, "metatable is not a table");
  d->depth--;
}

typedef struct load_state {
  const char *p;
  size_t len;
} load_state;

static const char *load_reader(lua_State *L, void *ud, size_t *sz) {
  load_state *ls = ud;
  (void)L;
  *sz = ls->len;
  ls->len = 0;
  return *sz ? ls->p : NULL;
}

/* Worker-side cache of loaded functions by fid, so a function sent for
** every task is loaded once (task messages only: a result or
** codec.decode always gets a fresh closure).  Bounded: cleared when it grows past
** FCACHE_MAX, so a script that sends a fresh closure per task cannot make a
** worker grow without limit. */
#define FCACHE_MAX 512

/* {====== a structural check of Lua 5.4 bytecode
** Lua's loader takes the main closure's upvalue count from one byte and its
** prototype's from another, and never compares them; a mismatch makes
** lua_setupvalue read past the prototype.  Only the bytes up to the
** prototype's count are walked (header, source, code, constants). */

typedef struct bc {
  const unsigned char *p, *end;
} bc;

static int bc_byte(bc *b, unsigned *v) {
  if (b->p >= b->end) return -1;
  *v = *b->p++;
  return 0;
}

static int bc_size(bc *b, size_t *v) { /* ldump's varint: MSB first */
  size_t x = 0;
  unsigned c;
  do {
    if (bc_byte(b, &c) || x > (SIZE_MAX >> 7)) return -1;
    x = (x << 7) | (c & 0x7f);
  } while ((c & 0x80) == 0);
  *v = x;
  return 0;
}

static int bc_skip(bc *b, size_t n) {
  if ((size_t)(b->end - b->p) < n) return -1;
  b->p += n;
  return 0;
}

/* 0 when the closure's and the prototype's upvalue counts agree (and equal
** nups, the count the message sends), -1 otherwise. */
#define BC_HEADER 31 /* signature, version, format, data, 3 sizes, int, float */

static int bytecode_check(const char *code, size_t len, unsigned nups) {
  bc b = {(const unsigned char *)code, (const unsigned char *)code + len};
  size_t n, k;
  unsigned cl_nups, tt;
  /* Lua's loader checks the header; the walk below relies on 5.4's layout
  ** and on 4-byte instructions and 8-byte integers and floats. */
  if (len < BC_HEADER + 1 || (unsigned char)code[4] != 0x54 || code[12] != 4 || code[13] != 8 ||
      code[14] != 8)
    return -1;
  b.p += BC_HEADER;
  if (bc_byte(&b, &cl_nups) || cl_nups != nups) return -1;
  if (bc_size(&b, &n) || (n > 0 && bc_skip(&b, n - 1))) return -1; /* source */
  size_t line, lastline;
  if (bc_size(&b, &line) || bc_size(&b, &lastline)) return -1;
  if (bc_skip(&b, 3)) return -1; /* numparams, is_vararg, maxstacksize */
  if (bc_size(&b, &n) || n > len / 4 || bc_skip(&b, n * 4)) return -1; /* code */
  if (bc_size(&b, &k)) return -1;                                      /* constants */
  for (size_t i = 0; i < k; i++) {
    if (bc_byte(&b, &tt)) return -1;
    switch (tt) {
      case 0:
      case 1:
      case 17: break; /* nil, false, true */
      case 3:
      case 19:
        if (bc_skip(&b, 8)) return -1;
        break; /* int, float */
      case 4:
      case 20: /* strings */
        if (bc_size(&b, &n) || (n > 0 && bc_skip(&b, n - 1))) return -1;
        break;
      default: return -1;
    }
  }
  if (bc_size(&b, &n)) return -1; /* the prototype's upvalue count */
  return n == cl_nups ? 0 : -1;
}

/* }====== */

static void load_function(dec *d, const char *code, uint32_t len, uint64_t sum, unsigned nups) {
  lua_State *L = d->L;
  load_state ls = {code, len};
  if (len < 4 || memcmp(code, LUA_SIGNATURE, 4) != 0) malformed(d, "function is not Lua bytecode");
  if (checksum(code, len) != sum) malformed(d, "function bytecode checksum mismatch");
  if (bytecode_check(code, len, nups) != 0) malformed(d, "bad function bytecode");
  if (lua_load(L, load_reader, &ls, "=(bytecode)", "b") != LUA_OK)
    luaL_error(L, "malformed message: %s", lua_tostring(L, -1));
}

static void dec_function(dec *d) {
  lua_State *L = d->L;
  uint64_t fid, sum;
  uint32_t len;
  unsigned nups, flags;
  if (get_bytes(d->r, &fid, 8) || get_bytes(d->r, &sum, 8) || luapool__get_u32(d->r, &len) ||
      (size_t)(d->r->end - d->r->p) < len)
    malformed(d, "truncated function");
  const char *code = d->r->p;
  d->r->p += len;
  if (luapool__get_u8(d->r, &nups) || luapool__get_u8(d->r, &flags))
    malformed(d, "truncated function");
  dec_enter(d);
  if (!d->fcache || !(flags & FN_REUSABLE)) {
    load_function(d, code, len, sum, nups);
    lua_pushnil(L); /* in place of the cache table */
  } else {
    registry_table(L, &FCACHE_KEY, NULL);
    if (lua_rawgeti(L, -1, (lua_Integer)fid) != LUA_TFUNCTION) {
      lua_pop(L, 1);
      load_function(d, code, len, sum, nups);
      lua_rawgeti(L, -2, 0);
      lua_Integer n = lua_tointeger(L, -1);
      lua_pop(L, 1);
      if (n >= FCACHE_MAX) { /* start afresh */
        lua_newtable(L);
        lua_pushvalue(L, -1);
        lua_rawsetp(L, LUA_REGISTRYINDEX, &FCACHE_KEY);
        lua_replace(L, -3);
        n = 0;
      }
      lua_pushvalue(L, -1);
      lua_rawseti(L, -3, (lua_Integer)fid);
      lua_pushinteger(L, n + 1);
      lua_rawseti(L, -3, 0);
    }
    lua_insert(L, -2);
  }
  lua_pop(L, 1); /* the cache table */
  int f = lua_gettop(L);
  dec_register(d);
  for (unsigned i = 1; i <= nups; i++) {
    if (d->r->p < d->r->end && (unsigned char)*d->r->p == T_ENV) {
      d->r->p++;
      lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
    } else {
      dec_value(d);
    }
    if (lua_setupvalue(L, f, (int)i) == NULL) malformed(d, "bad upvalue count");
  }
  d->depth--;
}

static void dec_named(dec *d) {
  lua_State *L = d->L;
  const char *name;
  size_t len;
  if (luapool__get_string(d->r, &name, &len)) malformed(d, "truncated name");
  char buf[128];
  if (len == 0 || len >= sizeof buf || memchr(name, 0, len)) malformed(d, "bad name");
  memcpy(buf, name, len);
  buf[len] = 0;
  int top = lua_gettop(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
  char *part = buf, *dot = strchr(part, '.');
  if (dot) *dot = 0;
  if (lua_getfield(L, -1, part) == LUA_TNIL && dot == NULL) {
    lua_pop(L, 1);
    if (lua_getfield(L, -1, "_G") == LUA_TTABLE)
      lua_getfield(L, -1, part);
    else
      lua_pushnil(L);
  }
  while (dot) {
    part = dot + 1;
    dot = strchr(part, '.');
    if (dot) *dot = 0;
    if (lua_istable(L, -1))
      lua_getfield(L, -1, part);
    else
      lua_pushnil(L);
  }
  if (lua_isnil(L, -1))
    luaL_error(L, "cannot receive '%s': not found here", lua_pushlstring(L, name, len));
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
}

static void dec_value(dec *d) {
  lua_State *L = d->L;
  unsigned t;
  if (luapool__get_u8(d->r, &t)) malformed(d, "truncated");
  switch (t) {
    case T_NIL: lua_pushnil(L); break;
    case T_FALSE: lua_pushboolean(L, 0); break;
    case T_TRUE: lua_pushboolean(L, 1); break;
    case T_INT: {
      lua_Integer i;
      if (get_bytes(d->r, &i, 8)) malformed(d, "truncated integer");
      lua_pushinteger(L, i);
      break;
    }
    case T_FLT: {
      lua_Number n;
      if (get_bytes(d->r, &n, 8)) malformed(d, "truncated float");
      lua_pushnumber(L, n);
      break;
    }
    case T_SSTR:
    case T_STR:
    case T_LSTR: {
      size_t len;
      if (get_strlen(d->r, t, &len)) malformed(d, "truncated string");
      lua_pushlstring(L, d->r->p, len);
      d->r->p += len;
      break;
    }
    case T_TABLE: dec_table(d); break;
    case T_REF: {
      uint32_t id;
      if (luapool__get_u32(d->r, &id) || id >= d->nrefs) malformed(d, "bad reference");
      lua_rawgeti(L, d->refs, id);
      break;
    }
    case T_LFUNC: dec_function(d); break;
    case T_NAMED: dec_named(d); break;
    case T_KERNEL: {
      unsigned k;
      if (luapool__get_u8(d->r, &k)) malformed(d, "truncated kernel");
      for (unsigned i = 0; i <= k; i++)
        if (luapool__kernels[i].name == NULL) malformed(d, "unknown kernel");
      lua_pushcfunction(L, luapool__kernels[k].lua_fn);
      break;
    }
    case T_INT128: {
      lp_int128 v;
      if (get_bytes(d->r, &v, 16)) malformed(d, "truncated int128");
      luapool__int128_push(L, v);
      break;
    }
    default: malformed(d, "unknown tag");
  }
}

static void decode(lua_State *L, lp_reader *r, int n, int fcache) {
  luaL_checkstack(L, n + 8, "decoding a message");
  lua_pushnil(L); /* the refs slot, removed at the end */
  dec d = {L, r, lua_gettop(L), 0, 0, fcache};
  for (int i = 0; i < n; i++)
    dec_value(&d);
  lua_remove(L, d.refs);
}

void luapool__decode(lua_State *L, lp_reader *r, int n) { decode(L, r, n, 0); }

void luapool__decode_task(lua_State *L, lp_reader *r, int n) { decode(L, r, n, 1); }

/* }====================================================== */

/* {======================================================
** luapool.codec: encode(...) -> bytes, decode(bytes) -> ...
** ======================================================= */

int luapool__codec_encode(lua_State *L) {
  int n = lua_gettop(L);
  lp_buf *b = luapool__scratch(L); /* at n+1 */
  lp_encode_ctx ctx = {"argument", 1, {0}, NULL, 0};
  if (luapool__put_u32(b, (uint32_t)n)) return luaL_error(L, "not enough memory");
  if (luapool__encode(L, b, 1, n, &ctx) != 0) {
    luapool__scratch_release(L, n + 1);
    lua_pushstring(L, ctx.err);
    return lua_error(L);
  }
  lua_pushlstring(L, b->p, b->len);
  luapool__scratch_release(L, n + 1);
  return 1;
}

int luapool__codec_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lp_reader r = {s, s + len};
  uint32_t n;
  if (luapool__get_u32(&r, &n)) return luaL_error(L, "malformed message: truncated");
  if (n > len) return luaL_error(L, "malformed message: too many values");
  int top = lua_gettop(L);
  luapool__decode(L, &r, (int)n);
  if (r.p != r.end) return luaL_error(L, "malformed message: trailing bytes");
  return lua_gettop(L) - top;
}

/* }====================================================== */
