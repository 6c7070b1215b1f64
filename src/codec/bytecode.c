/*
** The codec's reliance on Lua 5.4 internals, in one place.  Each part says
** what it guards and what breaks when Lua changes.
**
**  1. The closure layout (luapool__bytecode_proto): the dump cache keys a
**     function by its prototype, read from Lua 5.4's LClosure, so that a
**     fresh closure of a function already sent is not dumped again.
**     Checked once per process against closures of known prototypes; on
**     another layout the check fails and the cache keys by closure:
**     still correct, but every new closure is dumped again (slower, and a
**     worker loads it again).  Nothing breaks silently.
**  2. The bytecode layout (luapool__bytecode_check): Lua's loader takes
**     the main closure's upvalue count from one byte and its prototype's
**     from another and never compares them; a mismatch makes
**     lua_setupvalue read past the prototype.  The walk knows 5.4's dump
**     format (header, varints, constant tags).  On another format the
**     check refuses every function ("malformed message: bad function
**     bytecode"), so functions stop travelling until it is ported: a loud
**     failure, never a crash.
**  3. The upvalue limit (LP_BC_MAXUPVALUES, bytecode.h): messages carry an
**     upvalue count and slot in a byte.  A Lua allowing more than 255
**     would need a wider field (a wire version change).
**  4. The table layout (luapool__table_array): a table's array part is
**     read in place by the encoder and its numbers written in place by the
**     decoder (through the API, a table of 10,000 numbers cost 150
**     instructions an entry to encode and 100 to decode; in place, a
**     few).  The encoder writes a table's keys 1..n, then walks the rest
**     with lua_next; started from nil, that walk passes the n array
**     entries again, started from key n it skips them, which is right only
**     when n lies in the array part (from a key in the hash part, lua_next
**     would skip the hash nodes before it: luapool__table_array_holds).
**     Lua 5.4's Table gives both: alimit, a lower bound of the array's
**     size, and the array of TValues.  Checked once per process against
**     tables of known contents, numbers written in place read back
**     through the API; on another layout everything goes through the API:
**     still correct, only slower.
**  Not internals, but assumptions of the API the codec keeps: lua_dump's
**  bytes load only into the same Lua release with the same sizes (the
**  handshake, wire.c, compares LUA_RELEASE and the number sizes, so a
**  worker of another release is refused before any bytecode reaches it);
**  lua_upvalueid is unique per live upvalue and stable while the closures
**  are anchored (true of every 5.4 release: it is the UpVal's address),
**  which is how shared upvalues are found; lua_upvaluejoin checks no slot
**  (the decoder checks them with lua_getupvalue first).
*/
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec/bytecode.h"

#if LUA_VERSION_NUM == 504
/* Pushes the n results of probe, made in a protected call (it allocates):
** 0, or -1 (nothing pushed) when it could not run: no memory. */
static int run_probe(lua_State *L, lua_CFunction probe, int n) {
  int top = lua_gettop(L);
  if (!lua_checkstack(L, n + 4)) return -1;
  lua_pushcfunction(L, probe);
  if (lua_pcall(L, 0, n, 0) != LUA_OK) {
    lua_settop(L, top);
    return -1;
  }
  return 0;
}
#endif

/* {====== 1. the closure layout */

#if LUA_VERSION_NUM == 504
/* Lua 5.4's struct LClosure (lobject.h, every 5.4.x release): the head of
** every collectable object, then the closure's own fields. */
typedef struct lp_lclosure54 {
  void *next;
  unsigned char tt, marked, nupvalues;
  void *gclist;
  const void *p;
} lp_lclosure54;
#define LP_VLCL 6 /* LUA_VLCL: makevariant(LUA_TFUNCTION, 0) */
#endif

/* Does proto_of work here?  -1 not known yet, 0 no, 1 yes: a property of
** the Lua linked in, the same for every state and thread. */
static atomic_int proto_works = -1;

/* The prototype, read without the check. */
static const void *proto_of(lua_State *L, int idx) {
#if LUA_VERSION_NUM == 504
  const lp_lclosure54 *cl = lua_topointer(L, idx);
  if (cl == NULL || cl->tt != LP_VLCL) return NULL;
  return cl->p;
#else
  (void)L;
  (void)idx;
  return NULL;
#endif
}

#if LUA_VERSION_NUM == 504
static int proto_probe(lua_State *L) {
  luaL_loadstring(L, "return function() local a, b = 1, 2 "
                     "return function() return a, b end, function() return a end end");
  lua_call(L, 0, 1);
  lua_pushvalue(L, -1);
  lua_call(L, 0, 2); /* f1 g1 */
  lua_rotate(L, -3, -1);
  lua_call(L, 0, 2); /* f1 g1 f2 g2 */
  return 4;
}
#endif

/* Checks proto_of against closures of known prototypes: two of one
** prototype (two upvalues each) and one of another (one upvalue).  Returns
** 1 when it reads them right, 0 when not, -1 when the check itself could
** not run (no memory: try again at the next send). */
static int proto_check(lua_State *L) {
#if LUA_VERSION_NUM == 504
  int top = lua_gettop(L);
  if (run_probe(L, proto_probe, 4) != 0) return -1;
  const lp_lclosure54 *f1 = lua_topointer(L, top + 1), *g1 = lua_topointer(L, top + 2),
                      *f2 = lua_topointer(L, top + 3);
  int ok = f1 && g1 && f2 && f1 != f2 && f1->tt == LP_VLCL && g1->tt == LP_VLCL &&
           f2->tt == LP_VLCL && f1->nupvalues == 2 && f2->nupvalues == 2 && g1->nupvalues == 1 &&
           f1->p != NULL && f1->p == f2->p && g1->p != NULL && g1->p != f1->p &&
           proto_of(L, top + 1) == f1->p;
  lua_settop(L, top);
  return ok;
#else
  (void)L;
  return 0;
#endif
}

int luapool__bytecode_proto_works(lua_State *L) {
  int works = atomic_load(&proto_works);
  if (works < 0) {
    works = proto_check(L);
    if (works >= 0) atomic_store(&proto_works, works);
  }
  return works;
}

const void *luapool__bytecode_proto(lua_State *L, int idx) {
  return luapool__bytecode_proto_works(L) > 0 ? proto_of(L, idx) : NULL;
}

/* }====== */

/* {====== 2. the bytecode layout
** Only the bytes up to the prototype's upvalue count are walked (header,
** source, code, constants). */

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

int luapool__bytecode_signed(const char *code, size_t len) {
  return len >= 4 && memcmp(code, LUA_SIGNATURE, 4) == 0;
}

#define BC_HEADER 31 /* signature, version, format, data, 3 sizes, int, float */

int luapool__bytecode_check(const char *code, size_t len, unsigned nups) {
  bc b = {(const unsigned char *)code, (const unsigned char *)code + len};
  size_t n, k;
  unsigned cl_nups, tt;
  /* Lua's loader checks the header; the walk below relies on 5.4's layout
  ** (version byte 0x54) and on 4-byte instructions and 8-byte integers
  ** and floats. */
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
    switch (tt) { /* lobject.h's variant tags */
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

/* {====== 4. the table layout */

#if LUA_VERSION_NUM == 504
/* The head of Lua 5.4's struct Table (lobject.h, every 5.4.x release). */
typedef struct lp_table54 {
  void *next;
  unsigned char tt, marked, flags, lsizenode;
  unsigned int alimit; /* the array's size, or a border below it: a lower bound */
  lp_tv54 *array;
} lp_table54;
#define LP_VTABLE 5 /* LUA_VTABLE: makevariant(LUA_TTABLE, 0) */

static int table_probe(lua_State *L) {
  lua_createtable(L, 3, 0);
  lua_pushinteger(L, 7);
  lua_rawseti(L, -2, 1);
  lua_pushnumber(L, 2.5);
  lua_rawseti(L, -2, 2);
  lua_pushliteral(L, "x");
  lua_rawseti(L, -2, 3);
  lua_createtable(L, 37, 2);
  lua_createtable(L, 0, 4);
  return 3;
}
#endif

/* 1 when alimit and the array read right for tables made with known
** contents, and numbers written in place read back through the API; 0
** when not; -1 when the check could not run (no memory: tried again). */
static int table_check(lua_State *L) {
#if LUA_VERSION_NUM == 504
  int top = lua_gettop(L);
  if (run_probe(L, table_probe, 3) != 0) return -1;
  const lp_table54 *a = lua_topointer(L, top + 1), *b = lua_topointer(L, top + 2),
                   *c = lua_topointer(L, top + 3);
  int ok = a && b && c && a->tt == LP_VTABLE && b->tt == LP_VTABLE && c->tt == LP_VTABLE &&
           a->alimit == 3 && b->alimit == 37 && c->alimit == 0 && a->array != NULL &&
           a->array[0].tt == LP_TV_INT && a->array[0].v.i == 7 && a->array[1].tt == LP_TV_FLT &&
           a->array[1].v.n == 2.5 && a->array[2].tt != LP_TV_INT && a->array[2].tt != LP_TV_FLT;
  if (ok) { /* and written in place, read through the API */
    a->array[0].v.i = 11;
    a->array[1].v.n = 0.25;
    ok = lua_rawgeti(L, top + 1, 1) == LUA_TNUMBER && lua_isinteger(L, -1) &&
         lua_tointeger(L, -1) == 11 && lua_rawgeti(L, top + 1, 2) == LUA_TNUMBER &&
         !lua_isinteger(L, -1) && lua_tonumber(L, -1) == 0.25;
  }
  lua_settop(L, top);
  return ok;
#else
  (void)L;
  return 0;
#endif
}

static atomic_int table_works = -1;

lp_tv54 *luapool__table_array(lua_State *L, int idx, lua_Unsigned *size) {
  int works = atomic_load_explicit(&table_works, memory_order_relaxed);
  if (works < 0) {
    works = table_check(L);
    if (works < 0) return NULL;
    atomic_store(&table_works, works);
  }
#if LUA_VERSION_NUM == 504
  if (works) {
    const lp_table54 *t = lua_topointer(L, idx);
    if (t == NULL || t->tt != LP_VTABLE) return NULL;
    *size = t->alimit;
    return t->array;
  }
#else
  (void)idx;
  (void)size;
#endif
  return NULL;
}

int luapool__table_array_holds(lua_State *L, int idx, lua_Unsigned n) {
  lua_Unsigned size;
  return luapool__table_array(L, idx, &size) != NULL && n <= size;
}

/* }====== */
