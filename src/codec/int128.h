/*
** luapool.int128: exact 128-bit signed integers, a value type that kernels
** answer with, the codec carries (a transferable type, int128_codec.c) and
** Lua does arithmetic on.
*/
#ifndef LUAPOOL_INT128_H
#define LUAPOOL_INT128_H

#include <stddef.h>

#include <lua.h>

typedef __int128 lp_int128;

#define LUAPOOL_INT128_MT "luapool.int128"
void luapool__int128_push(lua_State *L, lp_int128 v);
/* Non-zero and *v set when the value at idx is a luapool.int128. */
int luapool__int128_test(lua_State *L, int idx, lp_int128 *v);
/* Decimal text of v into buf (at least 41 bytes); returns its length. */
size_t luapool__int128_format(lp_int128 v, char *buf);
/* Registers the metatable and pushes the constructor function. */
void luapool__int128_open(lua_State *L);

#endif
