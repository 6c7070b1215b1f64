/*
** The value codec: Lua values <-> bytes.  One format for every backend.
**
** A message is a sequence of tagged values.  Tables and Lua functions get
** reference ids in the order they are first met, so shared references and
** cycles arrive as they left.  Lua functions travel as bytecode (with debug
** info, so tracebacks keep file:line) plus their upvalues; an upvalue that
** several functions of the message share (two closures over one local)
** travels once, and the receiver joins the others to it, so they still
** share it.  The `_ENV` upvalue becomes the receiver's globals.  A
** function is dumped once per prototype, so every closure of it (a fresh
** one per submit, as inline functions are) travels with one function id,
** by which a worker reuses what it loaded (see the dump cache).  One
** luapool__encode call is one reference space: a task's function and its
** arguments, one call of a batch, one reply.
** C functions travel by name; only the standard library's and luapool's are
** known, and library tables and functions travel by name too.
** Nesting is limited by memory only: both directions walk a work list, not
** the C stack.  The decoder trusts no byte: every length is checked
** against what is left, every tag, reference id and upvalue number is
** validated.  (Bytecode itself is checked only as far as Lua's own loader
** does, plus the upvalue counts it does not compare (bytecode.c): messages
** come only from this pool's own processes and threads, never from the
** network.)  What relies on Lua 5.4 internals is in bytecode.c.
** Transferable userdata (luapool.int128) are the types udtype.h's registry
** lists: their id in place of a tag, then their bytes.
*/
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <pthread.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "base/buf.h"
#include "codec/codec.h"
#include "codec/bytecode.h"
#include "codec/udtype.h"
#include "kernels/kernel.h"

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
            ** then per upvalue T_ENV, T_UPREF or a value (a new upvalue,
            ** numbered in the order met, from 0 per reference space) */
  T_NAMED,  /* name: a library table or function, see push_names */
  T_KERNEL, /* u8 index into luapool__kernels */
  T_FREE13, /* not a codec tag: a transferable userdata type's id (13 is
            ** luapool.int128's: its tag before the registry, udtype.h) */
  T_ENV,    /* (as an upvalue only) the receiver's globals */
  T_UPREF,  /* (as an upvalue only) u32 number of an upvalue met before in
            ** the message: this slot shares it */
  T_XSTR,   /* u64 length, then the address of the bytes: a string of a
            ** thread worker's state, pinned (lp_encode_ctx.pin); only a
            ** reply of this process decoded with luapool__decode_pinned
            ** takes it, every other decoder refuses it as unknown */
  T_LAST
};
/* Any other byte is a transferable type's id followed by its bytes, or
** unknown (malformed).  New types take ids from 32 up (udtype.h). */

/* {====== transferable userdata (udtype.h) */

static int own_tag(unsigned t) { return t < T_LAST && t != T_FREE13; }

static const lp_udtype *udtype_by_id(unsigned id) {
  if (own_tag(id)) return NULL;
  for (int i = 0; luapool__udtypes[i]; i++)
    if (luapool__udtypes[i]->id == id) return luapool__udtypes[i];
  return NULL;
}

/* The type a kernel scalar of this lp_vtype travels as, or NULL. */
static const lp_udtype *udtype_by_scalar(int vtype, size_t room) {
  for (int i = 0; luapool__udtypes[i]; i++)
    if (luapool__udtypes[i]->scalar == vtype && luapool__udtypes[i]->size <= room)
      return luapool__udtypes[i];
  return NULL;
}

/* The type of the userdata at idx (its metatable is the one registered
** under the type's name), or NULL: not transferable.  Uses 2 stack slots;
** may raise a memory error (as luaL_testudata may). */
static const lp_udtype *udtype_of(lua_State *L, int idx) {
  const lp_udtype *t = NULL;
  if (luapool__udtypes[0] == NULL || !lua_getmetatable(L, idx)) return NULL;
  for (int i = 0; (t = luapool__udtypes[i]) != NULL; i++) {
    luaL_getmetatable(L, t->name);
    int same = lua_rawequal(L, -1, -2);
    lua_pop(L, 1);
    if (same) break;
  }
  lua_pop(L, 1);
  return t;
}

/* }====== */

static int put_u64(lp_buf *b, uint64_t v) { return luapool__buf_add(b, &v, 8); }

/* A string's tag and length; reserves its bytes too when extra says. */
static int put_string_head(lp_buf *b, size_t len, size_t extra) {
  if (luapool__buf_reserve(b, extra + 9) != 0) return -1;
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
  return 0;
}

int luapool__put_string(lp_buf *b, const char *s, size_t len) {
  if (put_string_head(b, len, len) != 0) return -1;
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
    default: { /* a transferable userdata's scalar (int128), else nil */
      const lp_udtype *t = udtype_by_scalar((int)v->type, sizeof v->u);
      if (t == NULL) return luapool__put_u8(b, T_NIL);
      if (luapool__put_u8(b, t->id)) return -1;
      return luapool__buf_add(b, &v->u, t->size);
    }
  }
}

/* }====================================================== */

/* {======================================================
** Encoder
** ======================================================= */

/* The encoder walks the value with a work list instead of C recursion, so
** that depth is limited by memory only (a linked list of a million nodes
** is ordinary data).  Each table or Lua function being written is a frame:
** its position (array index, hash key, metatable, upvalue slot) says where
** the walk resumes after a child, and is also the step of the path that an
** error names.  Scalars, references and names are written inline, without
** a frame.
**
** Where things live: the first NFAST frames keep their object and their
** current hash key in fixed Lua stack slots, deeper ones in a spill table;
** the frames themselves are in the encoder (C stack) until they outgrow it,
** then in a userdata.  Everything is collectable, so an encode cut short by
** a Lua error (no memory) leaves nothing behind.  */

enum { F_TABLE, F_FUNC };
/* What the frame's child is (the path step), and where the walk resumes. */
enum {
  PH_ARRAY,   /* array item i */
  PH_HASH,    /* between pairs: lua_next from the saved key */
  PH_KEY,     /* the key itself ("a key") */
  PH_KEYDONE, /* (a key just written: its value next) */
  PH_VAL,     /* the value at the saved key */
  PH_META,    /* the metatable */
  PH_UPVAL    /* upvalue slot i */
};

typedef struct eframe {
  unsigned char kind, phase, pending; /* pending: a child frame is open */
  lua_Unsigned i;                     /* array index, or upvalue slot */
  lua_Unsigned n;                     /* array size, or upvalue count */
  size_t hpos;                        /* where the pair count goes */
  uint32_t nhash;
} eframe;

#define NFAST   8  /* frames whose object and key are in stack slots */
#define NFRAMES 32 /* frames held in the encoder itself */
#define NUVFAST 16 /* upvalue ids held in the encoder itself */
/* Fixed slots above the caller's values: seen (made with the first table
** or Lua function), then, with the first frame, spill, frame box and the
** NFAST pairs (object, key). */
#define E_SEEN   0
#define E_SPILL  1
#define E_FBOX   2
#define E_SLOTS  3
#define E_NFIXED (E_SLOTS + 2 * NFAST)

/* One encode in progress: on the C stack of luapool__encode, so that one
** started by a __gc in the middle of another is independent of it. */
#define NSEENFAST 4

typedef struct luapool_encoder {
  lp_buf *bp; /* where it writes */
  lua_State *L;
  lp_encode_ctx *ctx;
  int base;       /* stack index of the fixed slots (the seen table first),
                  ** 0 until the first table or Lua function */
  int slots;      /* the slots after it exist (made with the first frame) */
  int curkey;     /* stack index of the innermost frame's key while it is
                 ** on the stack (0: use the saved one) */
  uint32_t nseen; /* tables and functions met: their reference ids */
  /* The first NSEENFAST of them, searched in order: a message of a
  ** function and a few scalars (most tasks) then makes no seen table. */
  const void *seen[NSEENFAST];
  uint32_t nuv; /* upvalues met: their numbers, for joins */
  /* The ids of the first NUVFAST upvalues met, searched in order (most
  ** messages have a few); past that all are in the seen table. */
  void *uv[NUVFAST];
  int root;             /* number of the root value being encoded */
  int cst;              /* stack index of the codec state (its slot is nil until needed) */
  struct lp_cstate *cs; /* it, once known */
  size_t nfr, cap;
  eframe *fr;
  eframe fr0[NFRAMES];
} luapool_encoder;

/* The state's scratch buffer lives in a userdata: a Lua error raised while
** it holds bytes cannot leak them.  taken: some caller holds it now;
** installed: it is the one the codec state keeps (user value CS_SCRATCH). */
typedef struct scratch {
  lp_buf b;
  int taken, installed;
} scratch;

/* Registry keys: the addresses of these (pointer keys are found without
** hashing a string).  CSTATE_KEY is the codec state, the only one the
** encoder looks up (and not even that when its caller has the state at
** hand: a pool keeps it in a user value); FCACHE_KEY is a worker's
** function cache. */
static const char CSTATE_KEY, FCACHE_KEY;

/* The codec state: one userdata per Lua state (all its threads share it),
** whose user values hold what the encoder keeps between messages, each
** reached with one user-value read instead of a registry lookup by key
** (about 120 instructions each, seven of them on every submit before). */
enum {
  CS_SCRATCH = 1, /* the scratch buffer (a scratch userdata) */
  CS_NAMES,       /* value -> name: what travels by name (push_names) */
  CS_PCLOS,       /* the dump cache by prototype: closures (weak values) */
  CS_PDUMPS,      /* ... and their dumps */
  CS_DUMPS,       /* the dump cache by closure (weak keys), the fallback */
  CS_MEMO_FN,     /* the memo: a closure of the prototype sent last ... */
  CS_MEMO_DUMP,   /* ... and its dump */
  CS_NUV = CS_MEMO_DUMP
};

typedef struct lp_cstate {
  /* An object found not to travel by name: its next send skips the names
  ** lookup.  The names table is made once and never changes, and it holds
  ** its keys, so no object made later can be at the address of a named
  ** one: an address once found unnamed stays unnamed, whatever object
  ** lives there next. */
  const void *unnamed;
  /* The memo of the last prototype sent (NULL: none): CS_MEMO_FN is a
  ** closure of it that holds nothing but the prototype and at most the
  ** globals (only one kept like that), so while it is there no other
  ** prototype can have this address, and a closure of this prototype is
  ** sent with CS_MEMO_DUMP without looking in the dump cache.  nups and
  ** only_env are the prototype's (upvalue names are in the prototype). */
  const void *memo_proto;
  int memo_nups, memo_only_env;
} lp_cstate;

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

void luapool__codec_state(lua_State *L) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &CSTATE_KEY) == LUA_TUSERDATA) return;
  lua_pop(L, 1);
  lp_cstate *cs = lua_newuserdatauv(L, sizeof *cs, CS_NUV);
  memset(cs, 0, sizeof *cs);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &CSTATE_KEY);
}

/* A new scratch userdata (taken), pushed. */
static scratch *new_scratch(lua_State *L) {
  scratch *sc = lua_newuserdatauv(L, sizeof *sc, 0);
  memset(sc, 0, sizeof *sc);
  sc->taken = 1;
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, scratch_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  return sc;
}

/* The codec state keeps one buffer (CS_SCRATCH); taking it marks it
** taken, releasing it unmarks it.  A caller nested meanwhile (a __gc that
** submits in the middle of an encode) finds it taken and gets a buffer of
** its own.  A Lua error between take and release (no memory, a refused
** submit) loses nothing either: the kept buffer stays marked, the next
** caller makes a fresh one, and its release installs that one in its
** place; the lost one is collected with its bytes.  A release never
** allocates, never raises. */
lp_buf *luapool__scratch_in(lua_State *L, int cstate) {
  cstate = lua_absindex(L, cstate);
  if (lua_getiuservalue(L, cstate, CS_SCRATCH) == LUA_TUSERDATA) {
    scratch *sc = lua_touserdata(L, -1);
    if (!sc->taken) {
      sc->taken = 1;
      sc->b.len = 0;
      return &sc->b; /* its userdata is on top of the stack */
    }
  }
  int first = lua_isnil(L, -1);
  lua_pop(L, 1);
  scratch *sc = new_scratch(L);
  if (first) { /* the first take: install it now */
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, cstate, CS_SCRATCH);
    sc->installed = 1;
  }
  return &sc->b;
}

lp_buf *luapool__scratch(lua_State *L) {
  luapool__codec_state(L);
  lp_buf *b = luapool__scratch_in(L, -1);
  lua_remove(L, -2);
  return b;
}

void luapool__scratch_release(lua_State *L, int idx) {
  scratch *sc = lua_touserdata(L, idx);
  sc->b.len = 0;
  sc->taken = 0;
  if (sc->installed) return;
  /* a fresh one: installed when the kept one is lost (or still taken) */
  idx = lua_absindex(L, idx);
  if (!lua_checkstack(L, 3)) return; /* not kept: the GC frees it */
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, &CSTATE_KEY) == LUA_TUSERDATA) {
    scratch *old =
        lua_getiuservalue(L, -1, CS_SCRATCH) == LUA_TUSERDATA ? lua_touserdata(L, -1) : NULL;
    if (old == NULL || old->taken) {
      if (old) old->installed = 0;
      lua_pushvalue(L, idx);
      lua_setiuservalue(L, -3, CS_SCRATCH);
      sc->installed = 1;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Pushes a new table, weak as mode says (NULL: strong), and a copy of it. */
static void push_new_table(lua_State *L, const char *mode) {
  lua_newtable(L);
  if (mode) {
    lua_createtable(L, 0, 1);
    lua_pushstring(L, mode);
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
  }
  lua_pushvalue(L, -1);
}

/* Pushes user value k of the codec state at cst, a table created (weak
** when asked) the first time. */
static void cstate_table(lua_State *L, int cst, int k, const char *mode) {
  if (lua_getiuservalue(L, cst, k) == LUA_TTABLE) return;
  lua_pop(L, 1);
  push_new_table(L, mode);
  lua_setiuservalue(L, cst, k);
}

/* Pushes a registry table, creating it (weak-keyed when asked) if needed. */
static void registry_table(lua_State *L, const char *key, const char *mode) {
  if (lua_rawgetp(L, LUA_REGISTRYINDEX, key) == LUA_TTABLE) return;
  lua_pop(L, 1);
  push_new_table(L, mode);
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

/* The codec state of an encode: the caller's, or looked up (once per
** encode) the first time it is needed, into the slot kept for it. */
static lp_cstate *enc_cstate(luapool_encoder *e) {
  if (e->cs == NULL) {
    luapool__codec_state(e->L);
    e->cs = lua_touserdata(e->L, -1);
    lua_replace(e->L, e->cst);
  }
  return e->cs;
}

static void push_names(luapool_encoder *e) {
  static const char *const libs[] = {"luapool", "string",    "table", "math",    "io", "os",
                                     "utf8",    "coroutine", "debug", "package", "_G", NULL};
  lua_State *L = e->L;
  enc_cstate(e);
  if (lua_getiuservalue(L, e->cst, CS_NAMES) == LUA_TTABLE) return;
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
  lua_setiuservalue(L, e->cst, CS_NAMES);
}

/* Writes a reference by name when the value at idx has one: 1 written,
** 0 not a named value, -1 no memory. */
static int enc_named(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  const void *p = lua_topointer(L, idx);
  if (p == enc_cstate(e)->unnamed) return 0;
  push_names(e);
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) != LUA_TSTRING) {
    lua_pop(L, 2);
    e->cs->unnamed = p;
    return 0;
  }
  size_t len;
  const char *name = lua_tolstring(L, -1, &len);
  int r = luapool__put_u8(e->bp, T_NAMED) || luapool__put_string(e->bp, name, len);
  e->ctx->named = 1;
  lua_pop(L, 2);
  return r ? enc_nomem(e) : 1;
}

/* {====== frame storage */

/* Makes the fixed slots (the first table or function of the encode: no
** frame exists yet, so the top is the caller's). */
static void enc_base(luapool_encoder *e) {
  lua_State *L = e->L;
  if (e->base) return;
  luaL_checkstack(L, 16, "encoding a message");
  lua_newtable(L);
  e->base = lua_gettop(L); /* E_SEEN */
}

/* The other fixed slots, made with the first frame (a message of scalars
** and _ENV-only functions needs none).  Frames open from the root level
** or from a frame's step, so the first one opens at the root level, where
** nothing is above the seen table. */
static void enc_slots(luapool_encoder *e) {
  lua_State *L = e->L;
  if (e->slots) return;
  enc_base(e);
  luaL_checkstack(L, E_NFIXED + 16, "encoding a message");
  lua_settop(L, e->base + E_NFIXED - 1);
  e->slots = 1;
}

/* Object (k = 0) or key (k = 1) of frame j: stored from the top (popped),
** or pushed. */
static void slot_set(luapool_encoder *e, size_t j, int k) {
  lua_State *L = e->L;
  if (j < NFAST) {
    lua_replace(L, e->base + E_SLOTS + 2 * (int)j + k);
    return;
  }
  int spill = e->base + E_SPILL;
  if (lua_type(L, spill) != LUA_TTABLE) {
    lua_newtable(L);
    lua_replace(L, spill);
  }
  lua_Integer n = 2 * (lua_Integer)j + k;
  lua_rawseti(L, spill, n);
}

static void slot_get(luapool_encoder *e, size_t j, int k) {
  lua_State *L = e->L;
  if (j < NFAST)
    lua_pushvalue(L, e->base + E_SLOTS + 2 * (int)j + k);
  else
    lua_rawgeti(L, e->base + E_SPILL, 2 * (lua_Integer)j + k);
}

/* Opens a frame for the object at idx. */
/* A full frame list (cap frames of size elsize, all in use) moved into a
** userdata twice as big, which replaces the old box at box_idx (the first
** list lives in the encoder or decoder itself): returns the new list. */
static void *grow_frames(lua_State *L, void *fr, size_t *cap, size_t elsize, int box_idx) {
  if (*cap > SIZE_MAX / 2 / elsize) luaL_error(L, "not enough memory");
  void *nf = lua_newuserdatauv(L, 2 * *cap * elsize, 0);
  memcpy(nf, fr, *cap * elsize);
  lua_replace(L, box_idx);
  *cap *= 2;
  return nf;
}

static eframe *enc_push(luapool_encoder *e, int idx, int kind, lua_Unsigned n) {
  lua_State *L = e->L;
  enc_slots(e);
  if (e->nfr == e->cap) e->fr = grow_frames(L, e->fr, &e->cap, sizeof(eframe), e->base + E_FBOX);
  lua_pushvalue(L, idx);
  slot_set(e, e->nfr, 0);
  eframe *f = &e->fr[e->nfr++];
  f->kind = (unsigned char)kind;
  f->phase = kind == F_TABLE ? PH_ARRAY : PH_UPVAL;
  f->pending = 0;
  f->i = 1;
  f->n = n;
  f->hpos = 0;
  f->nhash = 0;
  return f;
}

/* }====== */

/* {====== error messages */

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

static void app(char *buf, size_t cap, size_t *pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void app(char *buf, size_t cap, size_t *pos, const char *fmt, ...) {
  if (*pos >= cap - 1) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf + *pos, cap - *pos, fmt, ap);
  va_end(ap);
  if (n > 0) *pos = (size_t)n >= cap - *pos ? cap - 1 : *pos + (size_t)n;
}

/* Appends the path step of frame j: what its current child is. */
static void seg_text(luapool_encoder *e, size_t j, char *buf, size_t cap, size_t *pos) {
  lua_State *L = e->L;
  const eframe *f = &e->fr[j];
  if (f->kind == F_FUNC) {
    lua_Debug ar;
    slot_get(e, j, 0);
    const char *name = lua_getupvalue(L, -1, (int)f->i);
    if (name) lua_pop(L, 1);
    lua_getinfo(L, ">S", &ar); /* pops the function (the slot keeps it) */
    app(buf, cap, pos, "upvalue '%s' of function <%s:%d>", name ? name : "?", ar.short_src,
        ar.linedefined);
    return;
  }
  switch (f->phase) {
    case PH_ARRAY: app(buf, cap, pos, "index %lld", (long long)f->i); return;
    case PH_KEY: app(buf, cap, pos, "a key"); return;
    case PH_META: app(buf, cap, pos, "metatable"); return;
    default: break;
  }
  /* a value at a key */
  if (j + 1 == e->nfr && e->curkey)
    lua_pushvalue(L, e->curkey);
  else
    slot_get(e, j, 1);
  if (lua_type(L, -1) == LUA_TSTRING)
    app(buf, cap, pos, "field '%s'", lua_tostring(L, -1));
  else if (lua_isinteger(L, -1))
    app(buf, cap, pos, "index %lld", (long long)lua_tointeger(L, -1));
  else
    app(buf, cap, pos, "value at a %s key", luaL_typename(L, -1));
  lua_pop(L, 1);
}

#define SUFFIX(e) ((e)->ctx->suffix ? (e)->ctx->suffix : "")

/* Path steps named in full; a deeper path shows its innermost PATH_INNER
** steps and outermost PATH_OUTER, and counts the ones between. */
#define PATH_INNER 8
#define PATH_OUTER 4

/* "cannot send ROOT #N: ", or "cannot send FIRST: " for the first value
** when the context names it (an initializer before its arguments). */
static void root_name(luapool_encoder *e, char *buf, size_t cap, size_t *pos) {
  const lp_encode_ctx *c = e->ctx;
  if (c->first && e->root == c->root_base)
    app(buf, cap, pos, "cannot send %s%s: ", c->first, SUFFIX(e));
  else
    app(buf, cap, pos, "cannot send %s #%d%s: ", c->root, e->root - (c->first != NULL), SUFFIX(e));
}

/* Writes "cannot send ROOT #N: PATH is WHAT" into ctx->err, where PATH is
** the steps of frames [0, depth), innermost first. */
static int enc_error_at(luapool_encoder *e, size_t depth, const char *what) {
  char *buf = e->ctx->err;
  size_t cap = sizeof e->ctx->err, pos = 0;
  root_name(e, buf, cap, &pos);
  if (depth == 0 || !lua_checkstack(e->L, 4)) {
    app(buf, cap, &pos, "%s", what);
    return -1;
  }
  size_t skip_to = depth > PATH_INNER + PATH_OUTER ? PATH_OUTER : 0;
  for (size_t j = depth; j-- > 0;) {
    if (skip_to && j == depth - 1 - PATH_INNER) {
      app(buf, cap, &pos, "... (%zu more) ... of ", j + 1 - skip_to);
      j = skip_to;
      continue;
    }
    seg_text(e, j, buf, cap, &pos);
    app(buf, cap, &pos, "%s", j > 0 ? " of " : "");
  }
  app(buf, cap, &pos, " is %s", what);
  return -1;
}

static int enc_error(luapool_encoder *e, const char *what) { return enc_error_at(e, e->nfr, what); }

static int enc_nomem(luapool_encoder *e) {
  size_t pos = 0;
  root_name(e, e->ctx->err, sizeof e->ctx->err, &pos);
  app(e->ctx->err, sizeof e->ctx->err, &pos, "not enough memory");
  return -1;
}

/* }====== */

/* Returns 1 (and writes a reference) when the object at idx was seen; else
** records it with the next id and returns 0. */
static int enc_seen(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  /* Keyed by address: every value met stays reachable from the message's
  ** roots while it is encoded (no Lua code runs), and Lua never moves an
  ** object, so an address names one table or function throughout. */
  const void *p = lua_topointer(L, idx);
  uint32_t id = 0;
  int found = 0;
  if (e->nseen <= NSEENFAST) {
    while (id < e->nseen && e->seen[id] != p)
      id++;
    found = id < e->nseen;
    if (!found && e->nseen < NSEENFAST) {
      e->seen[e->nseen++] = p;
      return 0;
    }
    if (!found) {  /* the array is full: from now on all in the seen table */
      enc_base(e); /* (with no frame yet this is the root level) */
      for (uint32_t k = 0; k < NSEENFAST; k++) {
        lua_pushlightuserdata(L, (void *)e->seen[k]);
        lua_pushinteger(L, k);
        lua_rawset(L, e->base + E_SEEN);
      }
    }
  }
  if (!found) {
    int seen = e->base + E_SEEN;
    lua_pushlightuserdata(L, (void *)p);
    found = lua_rawget(L, seen) == LUA_TNUMBER;
    id = (uint32_t)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (!found) {
      lua_pushlightuserdata(L, (void *)p);
      lua_pushinteger(L, e->nseen++);
      lua_rawset(L, seen);
      return 0;
    }
  }
  if (luapool__put_u8(e->bp, T_REF) || luapool__put_u32(e->bp, id)) return enc_nomem(e);
  return 1;
}

/* Writes the head of a table and opens its frame: 1; or a reference or a
** name: 0; -1 error. */
static int enc_table_head(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  int r = enc_named(e, idx);
  if (r != 0) return r < 0 ? -1 : 0;
  r = enc_seen(e, idx);
  if (r != 0) return r < 0 ? -1 : 0;
  lua_Unsigned narr = lua_rawlen(L, idx);
  if (narr > UINT32_MAX) narr = UINT32_MAX;
  if (luapool__put_u8(e->bp, T_TABLE) || luapool__put_u32(e->bp, (uint32_t)narr) ||
      luapool__put_u32(e->bp, 0))
    return enc_nomem(e);
  size_t hpos = e->bp->len - 4;
  enc_push(e, idx, F_TABLE, narr)->hpos = hpos;
  return 1;
}

/* Dumps into a luaL_Buffer (begun on the first write, above the function,
** as string.dump does), so a Lua error while dumping leaks nothing. */
typedef struct dump_state {
  luaL_Buffer b;
  int init;
  uint64_t fid;
} dump_state;

static int dump_writer(lua_State *L, const void *p, size_t sz, void *ud) {
  dump_state *ds = ud;
  if (!ds->init) {
    uint64_t head[2] = {ds->fid, 0}; /* fid, then the checksum, set after */
    ds->init = 1;
    luaL_buffinit(L, &ds->b);
    luaL_addlstring(&ds->b, (const char *)head, 16);
  }
  luaL_addlstring(&ds->b, p, sz);
  return 0;
}

/* {====== the dump cache
** A function is dumped the first time it is sent, and its dump (with its
** fid) is reused for every later message: that is what lets a worker find
** the function it loaded before.  The cache is keyed by the closure's
** prototype, so that `pool:submit(function(x) ... end, i)` in a loop, a
** new closure of one prototype per task, is dumped once and travels with
** one fid, like a function made once outside the loop.
**
** A prototype is not visible through Lua's API; luapool__bytecode_proto
** reads it from Lua 5.4's LClosure (bytecode.c, checked once per
** process).  Where that check fails (another layout), the cache is keyed
** by the closure itself, as weak keys: correct, but every new closure is
** dumped again.
**
** Two tables, keyed by the prototype's address (a light userdata), user
** values of the codec state (and before them, the memo of the last
** prototype sent: lp_cstate):
**   CS_PCLOS  weak values: one closure of that prototype, seen in a send
**   CS_PDUMPS the dump; [0] the number of entries, [-1] their bytes
** A dump is used only while its closure is alive: the closure keeps the
** prototype alive, so no other prototype can have that address.  Holding it
** weakly keeps nothing of the script's alive (a closure's upvalues may be
** big).  When the closure was collected, the next send of that address
** dumps again; identical bytes keep the old fid (the same bytes are the
** same function, whichever prototype they came from), so an inline closure
** collected between two sends still finds the worker's loaded function.
** Bounded: both tables start afresh past PCACHE_MAX entries or
** PCACHE_BYTES of dumps (the dumps of collected prototypes stay until
** then), so a script that makes a million prototypes does not grow them
** without limit. */

#define PCACHE_MAX   1024
#define PCACHE_BYTES ((size_t)16 << 20) /* and at most this many bytes of dumps */

/* Dumps the Lua function at idx: pushes "fid .. checksum .. bytecode",
** with a new fid, or with the fid of same (a cached dump, at that index,
** or 0: none) when the bytecode is the same. */
static int dump_function(luapool_encoder *e, int idx, int same) {
  lua_State *L = e->L;
  dump_state ds;
  ds.init = 0;
  ds.fid = 0;
  lua_pushvalue(L, idx);
  if (lua_dump(L, dump_writer, &ds, 0) != 0 || !ds.init) {
    if (ds.init) luaL_pushresult(&ds.b);
    lua_settop(L, lua_gettop(L) - (ds.init ? 2 : 1));
    return enc_nomem(e);
  }
  char *d = luaL_buffaddr(&ds.b);
  size_t len = luaL_bufflen(&ds.b);
  size_t olen;
  const char *old = same ? lua_tolstring(L, same, &olen) : NULL;
  if (old && olen == len && memcmp(old + 16, d + 16, len - 16) == 0) {
    luaL_pushresult(&ds.b); /* function, dump */
    lua_pop(L, 2);
    lua_pushvalue(L, same);
    return 0;
  }
  pthread_once(&fid_once, fid_init);
  uint64_t fid = atomic_fetch_add(&next_fid, 1);
  uint64_t sum = checksum(d + 16, len - 16);
  memcpy(d, &fid, 8);
  memcpy(d + 8, &sum, 8);
  luaL_pushresult(&ds.b); /* function, dump */
  lua_remove(L, -2);
  return 0;
}

/* The fallback: keyed by the closure (weak keys). */
static int push_dump_by_closure(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  cstate_table(L, e->cst, CS_DUMPS, "k");
  lua_pushvalue(L, idx);
  if (lua_rawget(L, -2) == LUA_TSTRING) {
    lua_remove(L, -2);
    return 0;
  }
  lua_pop(L, 1);
  if (dump_function(e, idx, 0)) {
    lua_pop(L, 1);
    return -1;
  }
  lua_pushvalue(L, idx);
  lua_pushvalue(L, -2);
  lua_rawset(L, -4); /* table, dump */
  lua_remove(L, -2);
  return 0;
}

/* Pushes the two cache tables (closures, dumps), starting them afresh
** when asked. */
static void pcache_tables(lua_State *L, int cst, int fresh) {
  if (fresh) {
    lua_pushnil(L);
    lua_setiuservalue(L, cst, CS_PCLOS);
    lua_pushnil(L);
    lua_setiuservalue(L, cst, CS_PDUMPS);
  }
  cstate_table(L, cst, CS_PCLOS, "v");
  cstate_table(L, cst, CS_PDUMPS, NULL);
}

/* Pushes the cached "fid .. checksum .. bytecode" string of the Lua
** function at idx, dumping it the first time its prototype is sent. */
static int push_dump(luapool_encoder *e, int idx) {
  lua_State *L = e->L;
  const void *p = luapool__bytecode_proto(L, idx);
  if (p == NULL) return push_dump_by_closure(e, idx);
  int top = lua_gettop(L);
  pcache_tables(L, e->cst, 0); /* top+1 closures, top+2 dumps */
  int same = 0;
  if (lua_rawgetp(L, top + 1, p) == LUA_TFUNCTION && luapool__bytecode_proto(L, -1) == p) {
    /* that closure is alive, so p is still its prototype: the same one */
    if (lua_rawgetp(L, top + 2, p) == LUA_TSTRING) {
      lua_replace(L, top + 1);
      lua_settop(L, top + 1);
      return 0;
    }
  } else if (lua_rawgetp(L, top + 2, p) == LUA_TSTRING) {
    same = top + 4; /* an earlier prototype's: bytes compared */
  }
  if (dump_function(e, idx, same)) {
    lua_settop(L, top);
    return -1;
  }
  /* top+5: the dump, unless it is the one at same (then nothing to count) */
  if (!same || !lua_rawequal(L, top + 5, same)) {
    lua_rawgeti(L, top + 2, 0);
    lua_rawgeti(L, top + 2, -1);
    lua_Integer n = lua_tointeger(L, -2);
    size_t bytes = (size_t)lua_tointeger(L, -1), len = lua_rawlen(L, top + 5);
    lua_pop(L, 2);
    if (same) /* replacing that entry (a collected prototype's) */
      bytes -= lua_rawlen(L, same);
    else
      n++;
    if (n > PCACHE_MAX || len > PCACHE_BYTES || bytes > PCACHE_BYTES - len) { /* start afresh */
      pcache_tables(L, e->cst, 1);
      lua_replace(L, top + 2);
      lua_replace(L, top + 1);
      n = 1;
      bytes = 0;
    }
    lua_pushinteger(L, n);
    lua_rawseti(L, top + 2, 0);
    lua_pushinteger(L, (lua_Integer)bytes + (lua_Integer)len);
    lua_rawseti(L, top + 2, -1);
  }
  lua_pushvalue(L, idx);
  lua_rawsetp(L, top + 1, p);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, top + 2, p);
  lua_replace(L, top + 1);
  lua_settop(L, top + 1);
  return 0;
}

/* luapool.codec.cache(): what the dump cache of this state holds. */
int luapool__codec_cache(lua_State *L) {
  int works = luapool__bytecode_proto_works(L);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, works > 0 ? "prototype" : "closure");
  lua_setfield(L, -2, "key");
  lua_pushinteger(L, PCACHE_MAX);
  lua_setfield(L, -2, "limit");
  lua_pushinteger(L, (lua_Integer)PCACHE_BYTES);
  lua_setfield(L, -2, "byte_limit");
  lua_Integer n = 0, bytes = 0;
  luapool__codec_state(L);
  if (lua_getiuservalue(L, -1, CS_PDUMPS) == LUA_TTABLE) {
    lua_rawgeti(L, -1, 0);
    lua_rawgeti(L, -2, -1);
    n = lua_tointeger(L, -2);
    bytes = lua_tointeger(L, -1);
    lua_pop(L, 2);
  }
  lua_pop(L, 2);
  lua_pushinteger(L, n);
  lua_setfield(L, -2, "prototypes");
  lua_pushinteger(L, bytes);
  lua_setfield(L, -2, "bytes");
  return 1;
}

/* }====== */

/* Function flags: every upvalue is _ENV, so a receiver may hand out the
** closure it loaded for an earlier message (nothing in it can differ). */
#define FN_REUSABLE 1

/* Writes a function: a kernel, a name, a reference, or bytecode and then
** (its frame opened: 1) its upvalues. */
static int enc_function_head(luapool_encoder *e, int idx) {
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
  /* push_dump's two cache tables, their lookups, the dump and its buffer */
  if (!lua_checkstack(L, 12)) return enc_nomem(e);
  lp_cstate *cs = enc_cstate(e);
  const void *proto = luapool__bytecode_proto(L, idx);
  int memo = proto != NULL && proto == cs->memo_proto;
  if (memo)
    lua_getiuservalue(L, e->cst, CS_MEMO_DUMP);
  else if (push_dump(e, idx))
    return -1;
  size_t dlen;
  const char *d = lua_tolstring(L, -1, &dlen);
  if (dlen - 16 > UINT32_MAX) {
    lua_pop(L, 1);
    return enc_error(e, "a function too large to send");
  }
  e->ctx->named = 1; /* a function's upvalues may hold names */
  /* tag, fid and checksum, length, bytecode, nups and flags: one reserve */
  lp_buf *b = e->bp;
  if (luapool__buf_reserve(b, dlen + 7)) {
    lua_pop(L, 1);
    return enc_nomem(e);
  }
  uint32_t clen = (uint32_t)(dlen - 16);
  b->p[b->len] = T_LFUNC;
  memcpy(b->p + b->len + 1, d, 16);
  memcpy(b->p + b->len + 17, &clen, 4);
  memcpy(b->p + b->len + 21, d + 16, clen);
  b->len += 21 + (size_t)clen;
  int nups = 0, only_env = 1;
  if (memo) {
    nups = cs->memo_nups;
    only_env = cs->memo_only_env;
  } else {
    const char *uname;
    int bare = 1; /* no upvalue but the globals: may be the memo */
    while ((uname = lua_getupvalue(L, idx, nups + 1)) != NULL) {
      if (strcmp(uname, "_ENV") != 0) only_env = 0;
      if (bare) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
        bare = lua_rawequal(L, -1, -2);
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
      nups++;
    }
    if (proto != NULL && bare) { /* the dump is on top */
      lua_pushvalue(L, idx);
      lua_setiuservalue(L, e->cst, CS_MEMO_FN);
      lua_pushvalue(L, -1);
      lua_setiuservalue(L, e->cst, CS_MEMO_DUMP);
      cs->memo_proto = proto;
      cs->memo_nups = nups;
      cs->memo_only_env = only_env;
    }
  }
  lua_pop(L, 1); /* the dump */
  /* (one byte: Lua allows LP_BC_MAXUPVALUES, bytecode.h; room reserved) */
  b->p[b->len++] = (char)(unsigned char)nups;
  b->p[b->len++] = only_env ? FN_REUSABLE : 0;
  if (only_env) { /* the common case (no frame): every upvalue is _ENV */
    for (int i = 0; i < nups; i++)
      if (luapool__put_u8(e->bp, T_ENV)) return enc_nomem(e);
    return 0;
  }
  enc_push(e, idx, F_FUNC, (lua_Unsigned)nups);
  return 1;
}

/* Writes the value at idx: 0 done, 1 a frame was opened for it (its
** contents follow), -1 error. */
static int enc_any(luapool_encoder *e, int idx) {
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
      lp_encode_ctx *c = e->ctx;
      if (len >= LP_PIN_MIN && c->pin && c->pin(c->pin_ud, L, idx, s, len) == 0) {
        /* (pinned: a failure past this point leaves the pin to the
        ** reply, which releases it whether it is sent or dropped) */
        if (luapool__buf_reserve(b, 17)) return enc_nomem(e);
        uint64_t l = len;
        b->p[b->len++] = T_XSTR;
        memcpy(b->p + b->len, &l, 8);
        memcpy(b->p + b->len + 8, &s, sizeof s);
        b->len += 8 + sizeof s;
        return 0;
      }
      if (len >= LP_PIN_MIN && c->split) {
        if (put_string_head(b, len, 0)) return enc_nomem(e);
        if (c->split(c->split_ud, L, idx, b->len) == 0) return 0;
        return luapool__buf_add(b, s, len) ? enc_nomem(e) : 0;
      }
      return luapool__put_string(b, s, len) ? enc_nomem(e) : 0;
    }
    case LUA_TTABLE: return enc_table_head(e, idx);
    case LUA_TFUNCTION: return enc_function_head(e, idx);
    case LUA_TUSERDATA: {
      const lp_udtype *t = udtype_of(L, idx);
      if (t == NULL) return enc_error(e, describe(L, idx));
      /* (a type given a codec tag or another type's id: a build mistake) */
      if (udtype_by_id(t->id) != t) return enc_error(e, "a userdata whose type has a taken id");
      if (luapool__buf_reserve(b, 1 + t->size)) return enc_nomem(e);
      b->p[b->len++] = (char)t->id;
      t->encode(L, idx, b->p + b->len);
      b->len += t->size;
      return 0;
    }
    default: return enc_error(e, describe(L, idx));
  }
}

/* Encodes the key (at W + 1) or the value (W + 2) of the pair frame j is
** at.  When that part opens a frame of its own (r > 0), the key is kept in
** frame j's slot so lua_next resumes from it once the part is done. */
static int enc_pair_part(luapool_encoder *e, size_t j, int W, int idx) {
  int r = enc_any(e, idx);
  if (r > 0) {
    lua_pushvalue(e->L, W + 1);
    slot_set(e, j, 1);
    e->fr[j].pending = 1;
  }
  return r;
}

/* One step of the table frame j (its table at W): writes children until
** one opens a frame (1) or the table is done (0); -1 error. */
static int step_table(luapool_encoder *e, size_t j, int W) {
  lua_State *L = e->L;
  eframe *f = &e->fr[j];
  int r;
  if (f->pending) { /* a child frame was closed: move past that child */
    f->pending = 0;
    switch (f->phase) {
      case PH_ARRAY: f->i++; break;
      case PH_KEY: f->phase = PH_KEYDONE; break;
      case PH_VAL: f->phase = PH_HASH; break;
      default: return 0; /* PH_META: the table is done */
    }
  }
  switch (f->phase) {
    case PH_ARRAY: {
      lp_buf *b = e->bp;
      lua_Unsigned asize = 0;
      const lp_tv54 *arr = luapool__table_array(L, W, &asize); /* (bytecode.h) */
      for (; f->i <= f->n; f->i++) {
        if (arr && f->i <= asize &&
            (arr[f->i - 1].tt == LP_TV_INT || arr[f->i - 1].tt == LP_TV_FLT)) {
          /* a number, read in place (the two have 8 bytes) */
          if (b->cap - b->len < 9 && luapool__buf_reserve(b, 9)) return enc_nomem(e);
          b->p[b->len++] = arr[f->i - 1].tt == LP_TV_INT ? T_INT : T_FLT;
          memcpy(b->p + b->len, &arr[f->i - 1].v, 8);
          b->len += 8;
          continue;
        }
        if (lua_rawgeti(L, W, (lua_Integer)f->i) == LUA_TNUMBER) { /* the common case, inline */
          if (b->cap - b->len < 9 && luapool__buf_reserve(b, 9)) return enc_nomem(e);
          if (lua_isinteger(L, -1)) {
            lua_Integer v = lua_tointeger(L, -1);
            b->p[b->len++] = T_INT;
            memcpy(b->p + b->len, &v, 8);
          } else {
            lua_Number v = lua_tonumber(L, -1);
            b->p[b->len++] = T_FLT;
            memcpy(b->p + b->len, &v, 8);
          }
          b->len += 8;
        } else if ((r = enc_any(e, W + 1)) != 0) {
          if (r > 0) e->fr[j].pending = 1;
          return r;
        } else { /* it may have allocated: a finalizer may have resized the table */
          arr = luapool__table_array(L, W, &asize);
        }
        lua_settop(L, W);
      }
      f->phase = PH_HASH;
      /* the first key: past the array entries just written when they all
      ** lie in the array part (bytecode.h), else from the start */
      if (f->n > 0 && luapool__table_array_holds(L, W, f->n))
        lua_pushinteger(L, (lua_Integer)f->n);
      else
        lua_pushnil(L);
      break;
    }
    case PH_KEYDONE: /* the key was a table or function: now its value */
      slot_get(e, j, 1);
      lua_pushvalue(L, W + 1);
      lua_rawget(L, W);
      f->phase = PH_VAL;
      e->curkey = W + 1;
      if ((r = enc_any(e, W + 2)) != 0) {
        if (r > 0) e->fr[j].pending = 1;
        return r;
      }
      e->fr[j].phase = PH_HASH;
      lua_settop(L, W + 1);
      break;
    default: /* PH_HASH */ slot_get(e, j, 1); break;
  }
  /* the hash part, from the key at W + 1 */
  f = &e->fr[j];
  while (lua_next(L, W)) {
    int kt = lua_type(L, W + 1);
    if (kt == LUA_TNUMBER && lua_isinteger(L, W + 1)) {
      lua_Integer ki = lua_tointeger(L, W + 1);
      if (ki >= 1 && (lua_Unsigned)ki <= f->n) { /* in the array part */
        lua_settop(L, W + 1);
        continue;
      }
    }
    if (f->nhash == UINT32_MAX) return enc_error_at(e, j, "a table with too many keys");
    f->nhash++;
    e->curkey = W + 1;
    f->phase = PH_KEY;
    if ((r = enc_pair_part(e, j, W, W + 1)) != 0) return r;
    f->phase = PH_VAL;
    if ((r = enc_pair_part(e, j, W, W + 2)) != 0) return r;
    f->phase = PH_HASH;
    lua_settop(L, W + 1);
  }
  e->curkey = 0;
  memcpy(e->bp->p + f->hpos, &f->nhash, 4);
  f->phase = PH_META;
  if (lua_getmetatable(L, W)) {
    if ((r = enc_any(e, W + 1)) != 0) {
      if (r > 0) e->fr[j].pending = 1;
      return r;
    }
    return 0;
  }
  return luapool__put_u8(e->bp, T_NIL) ? enc_nomem(e) : 0;
}

/* The number of the upvalue with this id, or -1 when not met yet. */
static int64_t uv_find(luapool_encoder *e, void *id) {
  if (e->nuv <= NUVFAST) {
    for (uint32_t k = 0; k < e->nuv; k++)
      if (e->uv[k] == id) return k;
    return -1;
  }
  lua_State *L = e->L;
  lua_pushlightuserdata(L, id);
  int64_t k = lua_rawget(L, e->base + E_SEEN) == LUA_TNUMBER ? lua_tointeger(L, -1) : -1;
  lua_pop(L, 1);
  return k;
}

/* Numbers the upvalue with this id (a light userdata key of the seen
** table once there are more than NUVFAST). */
static void uv_add(luapool_encoder *e, void *id) {
  lua_State *L = e->L;
  int seen = e->base + E_SEEN;
  if (e->nuv < NUVFAST) {
    e->uv[e->nuv++] = id;
    return;
  }
  if (e->nuv == NUVFAST) /* from now on all in the table */
    for (uint32_t k = 0; k < NUVFAST; k++) {
      lua_pushlightuserdata(L, e->uv[k]);
      lua_pushinteger(L, k);
      lua_rawset(L, seen);
    }
  lua_pushlightuserdata(L, id);
  lua_pushinteger(L, e->nuv++);
  lua_rawset(L, seen);
}

/* One step of the function frame j (its function at W): its upvalues.
** Each is _ENV (T_ENV: the receiver's globals), one met before in this
** message (T_UPREF and its number: the receiver joins the two), or a new
** one, numbered in the order met, with its value. */
static int step_func(luapool_encoder *e, size_t j, int W) {
  lua_State *L = e->L;
  eframe *f = &e->fr[j];
  if (f->pending) {
    f->pending = 0;
    f->i++;
  }
  for (; f->i <= f->n; f->i++) {
    int i = (int)f->i;
    const char *name = lua_getupvalue(L, W, i); /* W + 1 */
    if (name == NULL) return enc_error_at(e, j, "a function whose upvalues changed");
    /* _ENV always becomes the receiver's globals, whatever table it is
    ** here (the script's globals, or a sandbox such as busted's). */
    if (strcmp(name, "_ENV") == 0) {
      lua_settop(L, W);
      if (luapool__put_u8(e->bp, T_ENV)) return enc_nomem(e);
      continue;
    }
    void *id = lua_upvalueid(L, W, i);
    int64_t k = uv_find(e, id);
    if (k >= 0) {
      lua_settop(L, W);
      if (luapool__put_u8(e->bp, T_UPREF) || luapool__put_u32(e->bp, (uint32_t)k))
        return enc_nomem(e);
      continue;
    }
    if (e->nuv == UINT32_MAX) return enc_error_at(e, j, "a message with too many upvalues");
    uv_add(e, id);
    int r = enc_any(e, W + 1);
    if (r != 0) {
      if (r > 0) e->fr[j].pending = 1;
      return r;
    }
    lua_settop(L, W);
  }
  return 0;
}

/* Runs the work list until every open frame is closed. */
static int enc_run(luapool_encoder *e) {
  lua_State *L = e->L;
  int W = e->base + E_NFIXED;
  while (e->nfr > 0) {
    size_t j = e->nfr - 1;
    lua_settop(L, W - 1);
    slot_get(e, j, 0); /* at W */
    e->curkey = 0;
    int r = e->fr[j].kind == F_TABLE ? step_table(e, j, W) : step_func(e, j, W);
    if (r < 0) return -1;
    if (r == 0) e->nfr--; /* its parent (pending) moves past it */
  }
  return 0;
}

int luapool__encode(lua_State *L, lp_buf *b, int first, int n, lp_encode_ctx *ctx) {
  luapool_encoder enc, *e = &enc;
  first = lua_absindex(L, first);
  int top = lua_gettop(L);
  e->L = L;
  e->bp = b;
  e->ctx = ctx;
  e->base = 0;
  e->slots = 0;
  e->curkey = 0;
  e->nseen = 0;
  e->nuv = 0;
  e->nfr = 0;
  e->cap = NFRAMES;
  e->fr = e->fr0;
  if (ctx->cstate) {
    e->cst = lua_absindex(L, ctx->cstate);
    e->cs = lua_touserdata(L, e->cst);
  } else { /* a slot for it, filled when needed (scalars never need it) */
    luaL_checkstack(L, 1, "encoding a message");
    lua_pushnil(L);
    e->cst = top + 1;
    e->cs = NULL;
  }
  int r = 0;
  for (int i = 0; i < n && r >= 0; i++) {
    e->root = ctx->root_base + i;
    r = enc_any(e, first + i);
    if (r > 0) r = enc_run(e);
  }
  lua_settop(L, top);
  return r < 0 ? -1 : 0;
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
    default: {
      const lp_udtype *ut = udtype_by_id(t);
      if (ut && ut->scalar && ut->size <= sizeof v->u) { /* (int128) */
        v->type = (lp_vtype)ut->scalar;
        v->tname = "userdata";
        return get_bytes(r, &v->u, ut->size) ? -1 : 1;
      }
      *r = save;
      return own_tag(t) || ut ? 0 : -1;
    }
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

/* The decoder mirrors the encoder: a work list of frames (tables being
** filled, functions getting their upvalues), no C recursion per level
** (but for the first DEC_RDEPTH levels of tables: dec_table_now).
** Every table and function is in the refs (dec_register) by id, so a frame holds
** only its object's id.  A hash key waiting while its value (a table or a
** function) is decoded waits in the pend table, by frame.  Upvalues are
** numbered in the order met, as the encoder numbers them; uv keeps, per
** number, the closure (its id) and slot that own it, for T_UPREF joins
** (in the decoder itself, then in a userdata when they outgrow it). */
typedef struct dframe {
  unsigned char kind, phase, pending, reusable;
  uint32_t ref;   /* the object's id in refs */
  uint32_t i, n;  /* table: next array index, array size; function: slot, count */
  uint32_t nhash; /* pairs still to read */
} dframe;

typedef struct dec {
  lua_State *L;
  lp_reader *r;
  int base;       /* stack slots: refs, pend, uv box, frame box (nil until needed) */
  uint32_t nrefs; /* tables and functions so far */
  uint32_t nuv;   /* upvalues so far */
  int fcache;     /* reuse functions loaded by earlier messages (workers) */
  int pinned;     /* T_XSTR is taken (a pinned thread reply) */
  int rdepth;     /* tables being decoded by dec_table_now (C recursion) */
  size_t budget;  /* table slots that may still be preallocated */
  size_t nfr, cap;
  dframe *fr;
  size_t uvcap;
  uint64_t *uv; /* [nuv]: owner's id << 8 | slot */
  dframe fr0[NFRAMES];
  uint64_t uv0[NUVFAST];
} dec;

#define D_REFS   0
#define D_PEND   1
#define D_UVBOX  2
#define D_FBOX   3
#define D_NFIXED 4

__attribute__((noreturn)) static void malformed(dec *d, const char *what) {
  luaL_error(d->L, "malformed message: %s", what);
  abort(); /* not reached: luaL_error does not return */
}

/* The table in fixed slot k, created if needed. */
static int dec_slot_table(dec *d, int k) {
  lua_State *L = d->L;
  int idx = d->base + k;
  if (lua_type(L, idx) != LUA_TTABLE) {
    lua_newtable(L);
    lua_replace(L, idx);
  }
  return idx;
}

/* Gives the object on top the next id.  The first one waits in the refs
** slot itself, so a message of one function (most tasks) or one table
** makes no refs table; the second moves it into one (at id 0). */
static void dec_register(dec *d) {
  lua_State *L = d->L;
  int refs = d->base + D_REFS;
  if (d->nrefs == 0) {
    lua_pushvalue(L, -1);
    lua_replace(L, refs);
    d->nrefs = 1;
    return;
  }
  if (d->nrefs == 1) {
    lua_createtable(L, 4, 0);
    lua_pushvalue(L, refs);
    lua_rawseti(L, -2, 0);
    lua_replace(L, refs);
  }
  lua_pushvalue(L, -1);
  lua_rawseti(L, refs, (lua_Integer)d->nrefs++);
}

/* Pushes the object of id (< nrefs). */
static void dec_push_ref(dec *d, lua_Integer id) {
  if (d->nrefs == 1)
    lua_pushvalue(d->L, d->base + D_REFS);
  else
    lua_rawgeti(d->L, d->base + D_REFS, id);
}

static dframe *dec_push(dec *d, int kind) {
  lua_State *L = d->L;
  if (d->nfr == d->cap) d->fr = grow_frames(L, d->fr, &d->cap, sizeof(dframe), d->base + D_FBOX);
  dframe *f = &d->fr[d->nfr++];
  memset(f, 0, sizeof *f);
  f->kind = (unsigned char)kind;
  f->phase = kind == F_TABLE ? PH_ARRAY : PH_UPVAL;
  f->ref = d->nrefs - 1; /* the object just registered */
  f->i = 1;
  return f;
}

/* Reads a table's head, creates and registers it (on top). */
static void dec_table_make(dec *d, uint32_t *pnarr, uint32_t *pnhash) {
  lua_State *L = d->L;
  uint32_t narr, nhash;
  if (luapool__get_u32(d->r, &narr) || luapool__get_u32(d->r, &nhash))
    malformed(d, "truncated table");
  size_t left = (size_t)(d->r->end - d->r->p);
  /* every value takes at least one byte */
  if (narr > left || nhash > left / 2) malformed(d, "table size exceeds message");
  /* Preallocate only what the message can fill: every item of every table
  ** is a byte of its own, so in a well-formed message the sizes add up to
  ** less than its length, and lying sizes down a deep chain of tables
  ** cannot make the whole allocate more than that. */
  size_t want = (size_t)narr + nhash;
  uint32_t pa = 0, ph = 0;
  if (want <= d->budget) {
    d->budget -= want;
    pa = narr;
    ph = nhash;
  }
  lua_createtable(L, (int)(pa > INT32_MAX ? 0 : pa), (int)(ph > INT32_MAX ? 0 : ph));
  dec_register(d);
  *pnarr = narr;
  *pnhash = nhash;
}

/* ... and opens its frame. */
static void dec_table_head(dec *d) {
  uint32_t narr, nhash;
  dec_table_make(d, &narr, &nhash);
  dframe *f = dec_push(d, F_TABLE);
  f->n = narr;
  f->nhash = nhash;
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
** codec.decode always gets a fresh closure).  A fresh closure of a
** prototype sent before has the same fid (the sender's dump cache), so an
** inline function is loaded once too.  Bounded: cleared when it grows past
** FCACHE_MAX, so a script that sends many different functions cannot make
** a worker grow without limit. */
#define FCACHE_MAX 512

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
  luaL_checkstack(L, (int)len + 4, "decoding a message"); /* one per part of the name */
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

static void load_function(dec *d, const char *code, uint32_t len, uint64_t sum, unsigned nups) {
  lua_State *L = d->L;
  load_state ls = {code, len};
  if (!luapool__bytecode_signed(code, len)) malformed(d, "function is not Lua bytecode");
  if (checksum(code, len) != sum) malformed(d, "function bytecode checksum mismatch");
  /* (Lua's loader would not catch a closure whose upvalue count lies) */
  if (luapool__bytecode_check(code, len, nups) != 0) malformed(d, "bad function bytecode");
  if (lua_load(L, load_reader, &ls, "=(bytecode)", "b") != LUA_OK)
    luaL_error(L, "malformed message: %s", lua_tostring(L, -1));
}

/* Reads a function's head: pushes the closure (loaded, or the cached one
** for a reusable function in a task), registers it, and opens its frame
** when it has upvalues (returns 1), else 0. */
static int dec_function_head(dec *d) {
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
  if (flags & ~(unsigned)FN_REUSABLE) malformed(d, "bad function flags");
  luaL_checkstack(L, 4, "decoding a message");
  if (!d->fcache || !(flags & FN_REUSABLE)) {
    load_function(d, code, len, sum, nups);
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
    lua_remove(L, -2); /* the cache table */
  }
  dec_register(d);
  if (nups == 0) return 0;
  dframe *f = dec_push(d, F_FUNC);
  f->n = nups;
  f->reusable = (flags & FN_REUSABLE) != 0;
  return 1;
}

/* Tables nested less than this deep in C decode at once, by recursion (the
** common shapes, fastest); deeper ones go through the work list. */
#define DEC_RDEPTH 32

static void dec_table_now(dec *d);

static int dec_scalar(lua_State *L, lp_reader *r);

/* A number, the common case of an array, written in place into an entry
** of a table's array part (bytecode.h): 1, or 0 for any other value
** (nothing read). */
static inline int dec_number_into(dec *d, lp_tv54 *tv) {
  lp_reader *r = d->r;
  if (r->end - r->p < 9 || (r->p[0] != T_INT && r->p[0] != T_FLT)) return 0;
  tv->tt = r->p[0] == T_INT ? LP_TV_INT : LP_TV_FLT;
  memcpy(&tv->v, r->p + 1, 8);
  r->p += 9;
  return 1;
}

/* Reads one value: pushes it and returns 0, or pushes a table or function
** whose contents follow, with its frame opened, and returns 1. */
static int dec_any(dec *d) {
  lua_State *L = d->L;
  unsigned t;
  if (luapool__get_u8(d->r, &t)) malformed(d, "truncated");
  switch (t) {
    case T_NIL: lua_pushnil(L); return 0;
    case T_FALSE: lua_pushboolean(L, 0); return 0;
    case T_TRUE: lua_pushboolean(L, 1); return 0;
    case T_INT: {
      lua_Integer i;
      if (get_bytes(d->r, &i, 8)) malformed(d, "truncated integer");
      lua_pushinteger(L, i);
      return 0;
    }
    case T_FLT: {
      lua_Number n;
      if (get_bytes(d->r, &n, 8)) malformed(d, "truncated float");
      lua_pushnumber(L, n);
      return 0;
    }
    case T_SSTR:
    case T_STR:
    case T_LSTR: {
      size_t len;
      if (get_strlen(d->r, t, &len)) malformed(d, "truncated string");
      lua_pushlstring(L, d->r->p, len);
      d->r->p += len;
      return 0;
    }
    case T_TABLE:
      if (d->rdepth < DEC_RDEPTH) {
        dec_table_now(d);
        return 0;
      }
      dec_table_head(d);
      return 1;
    case T_XSTR: {
      uint64_t len;
      const char *s;
      if (!d->pinned) { /* (anywhere else it is as unknown as any other byte) */
        char what[32];
        snprintf(what, sizeof what, "unknown tag %u", t);
        malformed(d, what);
      }
      if ((size_t)(d->r->end - d->r->p) < 8 + sizeof s) malformed(d, "truncated string");
      memcpy(&len, d->r->p, 8);
      memcpy(&s, d->r->p + 8, sizeof s);
      d->r->p += 8 + sizeof s;
      lua_pushlstring(L, s, (size_t)len); /* (the one copy: from the worker's string) */
      return 0;
    }
    case T_REF: {
      uint32_t id;
      if (luapool__get_u32(d->r, &id) || id >= d->nrefs) malformed(d, "bad reference");
      dec_push_ref(d, id);
      return 0;
    }
    case T_LFUNC: return dec_function_head(d);
    case T_NAMED: dec_named(d); return 0;
    case T_KERNEL: {
      unsigned k;
      if (luapool__get_u8(d->r, &k)) malformed(d, "truncated kernel");
      for (unsigned i = 0; i <= k; i++)
        if (luapool__kernels[i].name == NULL) malformed(d, "unknown kernel");
      lua_pushcfunction(L, luapool__kernels[k].lua_fn);
      return 0;
    }
    case T_UPREF: malformed(d, "upvalue reference outside a function");
    default: {
      const lp_udtype *ut = udtype_by_id(t);
      char what[96];
      if (ut == NULL) {
        snprintf(what, sizeof what, "unknown tag %u", t);
        malformed(d, what);
      }
      if ((size_t)(d->r->end - d->r->p) < ut->size) {
        snprintf(what, sizeof what, "truncated %s", ut->name);
        malformed(d, what);
      }
      const char *p = d->r->p;
      d->r->p += ut->size;
      ut->decode(L, p);
      return 0;
    }
  }
}

static void check_key(dec *d, int idx) {
  lua_State *L = d->L;
  if (lua_isnil(L, idx)) malformed(d, "nil table key");
  if (lua_type(L, idx) == LUA_TNUMBER && isnan(lua_tonumber(L, idx))) malformed(d, "NaN table key");
}

/* A pair's value opened a frame of its own: its key (W + 1) waits in the
** pend table under frame j until the value is complete (PH_VAL). */
static int wait_for_value(dec *d, size_t j, int W) {
  lua_pushvalue(d->L, W + 1);
  lua_rawseti(d->L, dec_slot_table(d, D_PEND), (lua_Integer)j);
  d->fr[j].phase = PH_VAL;
  d->fr[j].pending = 1;
  return 1;
}

/* One step of the table frame j (its table at W, a child just decoded
** at W + 1 when pending): fills it until a child opens a frame (1) or the
** table is done (0). */
static int dstep_table(dec *d, size_t j, int W) {
  lua_State *L = d->L;
  dframe *f = &d->fr[j];
  if (f->pending) { /* the child at W + 1 is complete */
    f->pending = 0;
    switch (f->phase) {
      case PH_ARRAY: lua_rawseti(L, W, (lua_Integer)f->i++); break;
      case PH_KEY: /* a table or function key: now its value */
        f->phase = PH_HASH;
        if (dec_any(d)) return wait_for_value(d, j, W); /* key W + 1, value W + 2 */
        lua_rawset(L, W);
        f->nhash--;
        break;
      case PH_VAL: /* key in pend */
        lua_rawgeti(L, d->base + D_PEND, (lua_Integer)j);
        lua_insert(L, W + 1);
        lua_rawset(L, W);
        f->phase = PH_HASH;
        f->nhash--;
        break;
      default: /* PH_META */
        if (!lua_istable(L, W + 1)) malformed(d, "metatable is not a table");
        lua_setmetatable(L, W);
        return 0;
    }
  }
  lua_Unsigned asize = 0;
  lp_tv54 *arr = luapool__table_array(L, W, &asize);
  for (; f->i <= f->n; f->i++) {
    if (arr && f->i <= asize && dec_number_into(d, &arr[f->i - 1])) continue;
    if (!dec_scalar(L, d->r) && dec_any(d)) {
      d->fr[j].pending = 1;
      return 1;
    }
    lua_rawseti(L, W, (lua_Integer)f->i);
    /* a key past the array goes to the hash part, whose growth may move
    ** the array */
    if (f->i > asize) arr = luapool__table_array(L, W, &asize);
  }
  for (; f->nhash > 0; f->nhash--) {
    if (dec_any(d)) { /* the key, W + 1 */
      d->fr[j].phase = PH_KEY;
      d->fr[j].pending = 1;
      return 1;
    }
    check_key(d, W + 1);
    if (dec_any(d)) return wait_for_value(d, j, W); /* the value, W + 2 */
    lua_rawset(L, W);
  }
  f->phase = PH_META;
  if (dec_any(d)) {
    d->fr[j].pending = 1;
    return 1;
  }
  if (lua_istable(L, W + 1))
    lua_setmetatable(L, W);
  else if (!lua_isnil(L, W + 1))
    malformed(d, "metatable is not a table");
  return 0;
}

/* One step of the function frame j (its closure at W): its upvalues, as
** step_func wrote them.  A join may name an upvalue whose value is still
** being decoded (a function met inside it shares it): the join makes both
** slots one upvalue, and the value set at the end reaches both. */
static int dstep_func(dec *d, size_t j, int W) {
  lua_State *L = d->L;
  dframe *f = &d->fr[j];
  if (f->pending) {
    f->pending = 0;
    lua_setupvalue(L, W, (int)f->i++); /* (slot checked before its value) */
  }
  for (; f->i <= f->n; f->i++) {
    int i = (int)f->i;
    if (d->r->p < d->r->end && (unsigned char)*d->r->p == T_ENV) {
      d->r->p++;
      lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
      if (lua_setupvalue(L, W, i) == NULL) malformed(d, "bad upvalue count");
      continue;
    }
    /* A reusable function may be a closure kept by the worker's cache and
    ** handed out again: nothing but _ENV may ever change in it. */
    if (f->reusable) malformed(d, "upvalue of a reusable function");
    /* (lua_upvaluejoin does not check its slots: getupvalue does) */
    if (lua_getupvalue(L, W, i) == NULL) malformed(d, "bad upvalue count");
    lua_settop(L, W);
    if (d->r->p < d->r->end && (unsigned char)*d->r->p == T_UPREF) {
      uint32_t k;
      d->r->p++;
      if (luapool__get_u32(d->r, &k)) malformed(d, "truncated upvalue reference");
      if (k >= d->nuv) malformed(d, "bad upvalue reference");
      uint64_t owner = d->uv[k];
      dec_push_ref(d, (lua_Integer)(owner >> 8)); /* W + 1 */
      /* (the owner's closure and slot were checked when it was met) */
      lua_upvaluejoin(L, W, i, W + 1, (int)(owner & 0xff));
      lua_settop(L, W);
      continue;
    }
    if (d->nuv == UINT32_MAX) malformed(d, "too many upvalues");
    if (d->nuv == d->uvcap) { /* move them into a bigger userdata */
      if (d->uvcap > SIZE_MAX / 2 / sizeof(uint64_t)) luaL_error(L, "not enough memory");
      uint64_t *nu = lua_newuserdatauv(L, 2 * d->uvcap * sizeof(uint64_t), 0);
      memcpy(nu, d->uv, d->nuv * sizeof(uint64_t));
      lua_replace(L, d->base + D_UVBOX);
      d->uv = nu;
      d->uvcap *= 2;
    }
    d->uv[d->nuv++] = ((uint64_t)d->fr[j].ref << 8) | (unsigned)i;
    if (dec_any(d)) {
      d->fr[j].pending = 1;
      return 1;
    }
    lua_setupvalue(L, W, i);
  }
  return 0;
}

static void dec_run(dec *d, size_t floor);

/* Reads one value completely (work list included): pushes it. */
static void dec_whole(dec *d) {
  if (dec_any(d)) dec_run(d, d->nfr - 1);
}

/* Decodes a table at once: its items by recursion, bounded by DEC_RDEPTH
** (a child past that depth finishes on the work list). */
static void dec_table_now(dec *d) {
  lua_State *L = d->L;
  uint32_t narr, nhash;
  dec_table_make(d, &narr, &nhash);
  luaL_checkstack(L, 8, "decoding a message");
  int t = lua_gettop(L);
  d->rdepth++;
  lua_Unsigned asize = 0;
  lp_tv54 *arr = luapool__table_array(L, t, &asize);
  for (uint32_t i = 1; i <= narr; i++) {
    if (arr && i <= asize && dec_number_into(d, &arr[i - 1])) continue;
    if (!dec_scalar(L, d->r)) dec_whole(d);
    lua_rawseti(L, t, (lua_Integer)i);
    /* a key past the array goes to the hash part, whose growth may move
    ** the array */
    if (i > asize) arr = luapool__table_array(L, t, &asize);
  }
  for (uint32_t i = 0; i < nhash; i++) {
    dec_whole(d);
    check_key(d, t + 1);
    dec_whole(d);
    lua_rawset(L, t);
  }
  dec_whole(d);
  if (lua_istable(L, t + 1))
    lua_setmetatable(L, t);
  else if (lua_isnil(L, t + 1))
    lua_pop(L, 1);
  else
    malformed(d, "metatable is not a table");
  d->rdepth--;
}

/* Runs the work list: on entry the object of the innermost frame is on
** top; on return the completed value is there instead. */
static void dec_run(dec *d, size_t floor) {
  lua_State *L = d->L;
  int W = lua_gettop(L); /* the same for every step: room for one, once */
  luaL_checkstack(L, 8, "decoding a message");
  while (d->nfr > floor) {
    size_t j = d->nfr - 1;
    dframe *f = &d->fr[j];
    if (f->pending) { /* the child at W: the object goes below it */
      dec_push_ref(d, f->ref);
      lua_insert(L, W);
    }
    int r = f->kind == F_TABLE ? dstep_table(d, j, W) : dstep_func(d, j, W);
    if (r) {
      lua_replace(L, W); /* the child, whose frame was just opened */
    } else {
      d->nfr--;
    }
    lua_settop(L, W); /* the child, or the completed object */
  }
}

/* The values that need no decoder (scalars, most results): pushed at once,
** 1; 0 anything else, or truncated (the reader unchanged: the decoder
** reports it). */
static int dec_scalar(lua_State *L, lp_reader *r) {
  if (r->p >= r->end) return 0;
  size_t left = (size_t)(r->end - r->p) - 1;
  const char *p = r->p + 1;
  switch ((unsigned char)*r->p) {
    case T_NIL: lua_pushnil(L); break;
    case T_FALSE: lua_pushboolean(L, 0); break;
    case T_TRUE: lua_pushboolean(L, 1); break;
    case T_INT: {
      lua_Integer i;
      if (left < 8) return 0;
      memcpy(&i, p, 8);
      lua_pushinteger(L, i);
      p += 8;
      break;
    }
    case T_FLT: {
      lua_Number x;
      if (left < 8) return 0;
      memcpy(&x, p, 8);
      lua_pushnumber(L, x);
      p += 8;
      break;
    }
    case T_SSTR: {
      if (left < 1 || left - 1 < (unsigned char)*p) return 0;
      size_t len = (unsigned char)*p;
      lua_pushlstring(L, p + 1, len);
      p += 1 + len;
      break;
    }
    default: return 0;
  }
  r->p = p;
  return 1;
}

static void decode(lua_State *L, lp_reader *r, int n, int fcache, int pinned) {
  luaL_checkstack(L, n + D_NFIXED + 8, "decoding a message");
  int i = 0;
  while (i < n && dec_scalar(L, r)) /* no fixed slots for these */
    i++;
  if (i == n) return;
  dec d;
  d.L = L;
  d.r = r;
  d.base = lua_gettop(L) + 1;
  d.nrefs = 0;
  d.nuv = 0;
  d.fcache = fcache;
  d.pinned = pinned;
  d.rdepth = 0;
  d.budget = (size_t)(r->end - r->p);
  d.nfr = 0;
  d.cap = NFRAMES;
  d.fr = d.fr0;
  d.uvcap = NUVFAST;
  d.uv = d.uv0;
  lua_settop(L, d.base + D_NFIXED - 1);
  for (; i < n; i++)
    if (dec_any(&d)) dec_run(&d, 0);
  /* the values go where the fixed slots were */
  lua_rotate(L, d.base, -D_NFIXED);
  lua_pop(L, D_NFIXED);
}

void luapool__decode(lua_State *L, lp_reader *r, int n) { decode(L, r, n, 0, 0); }

void luapool__decode_pinned(lua_State *L, lp_reader *r, int n) { decode(L, r, n, 0, 1); }

void luapool__decode_task(lua_State *L, lp_reader *r, int n) { decode(L, r, n, 1, 0); }

/* }====================================================== */

/* {======================================================
** luapool.codec: encode(...) -> bytes, decode(bytes) -> ...
** ======================================================= */

/* codec.encode's big strings, left out of the scratch buffer: a 1 MiB
** string copied into it and then into the result went at 6-7 GB/s, half
** of what one copy gives.  Past SPLIT_MAX of them the rest are copied
** (the join needs two stack slots for each). */
#define SPLIT_MAX 128

typedef struct split_list {
  int anchor; /* stack index of the slot for the table that keeps them */
  int n;
  size_t at[SPLIT_MAX];  /* where in the buffer each one's bytes belong */
  size_t len[SPLIT_MAX]; /* and how many */
  size_t total;          /* their sum */
} split_list;

static int split_string(void *ud, lua_State *L, int idx, size_t at) {
  split_list *sl = ud;
  /* (the join's slots reserved now, where the stack is higher than it
  ** will be then: a checkstack that fails here copies the string instead
  ** of raising at the join) */
  if (sl->n == SPLIT_MAX || !lua_checkstack(L, 2 * (sl->n + 1) + 1)) return -1;
  idx = lua_absindex(L, idx);
  if (sl->n == 0) { /* (a memory error here leaves nothing to undo) */
    lua_createtable(L, 8, 0);
    lua_replace(L, sl->anchor);
  }
  /* kept alive here: a __gc run by the encoder's allocations may drop
  ** the string from the value being encoded */
  lua_pushvalue(L, idx);
  lua_rawseti(L, sl->anchor, sl->n + 1);
  sl->at[sl->n] = at;
  sl->len[sl->n] = lua_rawlen(L, idx);
  sl->total += sl->len[sl->n++];
  return 0;
}

/* The old layout in the buffer (each string's bytes at its place) when
** the other bytes outweigh the strings: the join would copy those twice
** (into a piece, then into the result), more than the strings save.
** Returns 0, or -1 without memory (the buffer then unchanged). */
static int split_inline(lua_State *L, lp_buf *b, const split_list *sl) {
  if (luapool__buf_reserve(b, sl->total)) return -1;
  size_t shift = sl->total, end = b->len;
  for (int i = sl->n - 1; i >= 0; i--) { /* the pieces, back to front */
    memmove(b->p + sl->at[i] + shift, b->p + sl->at[i], end - sl->at[i]);
    end = sl->at[i];
    shift -= sl->len[i];
    lua_rawgeti(L, sl->anchor, i + 1);
    memcpy(b->p + sl->at[i] + shift, lua_tostring(L, -1), sl->len[i]);
    lua_pop(L, 1);
  }
  b->len += sl->total;
  return 0;
}

int luapool__codec_encode(lua_State *L) {
  int n = lua_gettop(L);
  lp_buf *b = luapool__scratch(L); /* at n+1 */
  lua_pushnil(L);                  /* n+2: split_list.anchor */
  split_list sl = {.anchor = n + 2};
  lp_encode_ctx ctx = {.root = "argument", .root_base = 1, .split = split_string, .split_ud = &sl};
  if (luapool__put_u32(b, (uint32_t)n)) return luaL_error(L, "not enough memory");
  if (luapool__encode(L, b, 1, n, &ctx) != 0) {
    luapool__scratch_release(L, n + 1);
    lua_pushstring(L, ctx.err);
    return lua_error(L);
  }
  int join = sl.n > 0 && sl.total >= b->len; /* (b->len: the other bytes) */
  if (sl.n > 0 && !join && split_inline(L, b, &sl)) {
    luapool__scratch_release(L, n + 1);
    return luaL_error(L, "not enough memory");
  }
  if (!join) {
    lua_pushlstring(L, b->p, b->len);
    luapool__scratch_release(L, n + 1);
    return 1;
  }
  /* the buffer's pieces between the big strings, and the strings, joined
  ** by lua_concat, which copies each into the new string once */
  luaL_checkstack(L, 2 * sl.n + 1, "too many strings to join");
  size_t from = 0;
  for (int i = 0; i < sl.n; i++) {
    lua_pushlstring(L, b->p + from, sl.at[i] - from);
    lua_rawgeti(L, n + 2, i + 1);
    from = sl.at[i];
  }
  lua_pushlstring(L, b->p + from, b->len - from);
  luapool__scratch_release(L, n + 1);
  lua_concat(L, 2 * sl.n + 1);
  return 1;
}

/* codec.decode's body: as a result is decoded (task = 0), or as a worker
** decodes a task message (1: through its function cache). */
static int decode_string(lua_State *L, int task) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lp_reader r = {s, s + len};
  uint32_t n;
  if (luapool__get_u32(&r, &n)) return luaL_error(L, "malformed message: truncated");
  if (n > len) return luaL_error(L, "malformed message: too many values");
  int top = lua_gettop(L);
  if (task)
    luapool__decode_task(L, &r, (int)n);
  else
    luapool__decode(L, &r, (int)n);
  if (r.p != r.end) return luaL_error(L, "malformed message: trailing bytes");
  return lua_gettop(L) - top;
}

int luapool__codec_decode(lua_State *L) { return decode_string(L, 0); }

int luapool__codec_decode_as_task(lua_State *L) { return decode_string(L, 1); }

/* }====================================================== */
