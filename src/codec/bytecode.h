/*
** What the codec relies on that Lua 5.4 does not promise through its API
** (bytecode.c): the layout of a Lua closure, the layout of dumped
** bytecode, Lua's limit on upvalues, the head of a table.  Every such check is in bytecode.c,
** each saying what it guards and what breaks when Lua changes; a port to
** another Lua starts there.
*/
#ifndef LUAPOOL_BYTECODE_H
#define LUAPOOL_BYTECODE_H

#include <stddef.h>

#include <lua.h>

/* Lua 5.4's limit on a function's upvalues (MAXUPVAL, lfunc.h): the codec
** sends an upvalue count and slot in one byte. */
#define LP_BC_MAXUPVALUES 255

/* The prototype of the Lua function at idx (the dump cache's key), or NULL
** when this Lua's closures are not laid out as Lua 5.4's (checked once per
** process; then the cache keys by closure) or idx is no Lua closure.
** Does not raise; uses up to 8 stack slots the first time. */
const void *luapool__bytecode_proto(lua_State *L, int idx);
/* Does luapool__bytecode_proto work here?  1 yes, 0 no, -1 not known yet
** (the check could not run: no memory; it is tried again). */
int luapool__bytecode_proto_works(lua_State *L);
/* Non-zero when code[0..len) starts with Lua's bytecode signature. */
int luapool__bytecode_signed(const char *code, size_t len);
/* 0 when the bytecode's main closure and its prototype agree on their
** upvalue count and it is nups (the count the message sends); -1 when not,
** or when the bytes are not laid out as Lua 5.4 dumps them. */
int luapool__bytecode_check(const char *code, size_t len, unsigned nups);
/* An entry of a table's array part, as Lua 5.4 lays it out (its TValue). */
typedef struct lp_tv54 {
  union {
    lua_Integer i;
    lua_Number n;
    void *p;
  } v;
  unsigned char tt;
} lp_tv54;
#define LP_TV_INT 0x03 /* LUA_VNUMINT: makevariant(LUA_TNUMBER, 0) */
#define LP_TV_FLT 0x13 /* LUA_VNUMFLT: makevariant(LUA_TNUMBER, 1) */
/* The array part of the table at idx, with *size a lower bound of its
** length (Lua's alimit), when this Lua lays tables out as 5.4 does
** (checked once per process); else NULL.  The array stays where it is
** until something allocates from Lua (a collection step may run a __gc
** finalizer that resizes the table): the caller fetches it again after
** anything that may allocate.  A number may be written in place of any
** entry (a number needs no collector barrier).  Does not raise; uses up to
** 4 stack slots the first time. */
lp_tv54 *luapool__table_array(lua_State *L, int idx, lua_Unsigned *size);
/* 1 when keys 1..n of the table at idx all lie in its array part, so that
** lua_next from key n passes none of the hash part; 0 when not, or not
** known (another layout: then walk from nil).  Does not raise; uses up to 4
** stack slots the first time. */
int luapool__table_array_holds(lua_State *L, int idx, lua_Unsigned n);

#endif
