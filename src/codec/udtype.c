/*
** The table of transferable userdata types (udtype.h).  Each descriptor
** is defined in its type's own file, which includes udtype.h; it is
** declared here rather than by including that file's header, so that the
** codec layer depends on no value type (the dependency goes from the type
** to this registry).  A static table: no registration call, so no init
** order and no lock.
**
** This file is compiled apart from the core (CMakeLists.txt: luapool_wire),
** so that a test build can register a type more (LUAPOOL_TEST_UDTYPE) and
** be refused by the handshake as a build of another type table.
*/
#include <stddef.h>

#include <lua.h>

#include "codec/udtype.h"

extern const lp_udtype luapool__int128_udtype; /* int128.c */

#ifdef LUAPOOL_TEST_UDTYPE
/* A type that exists only in the test build luapool-othertypes: a byte
** that decodes as a boolean.  No state ever has its metatable, so nothing
** of it is ever sent; it changes the table, hence the handshake digest. */
static void test_encode(lua_State *L, int idx, void *out) {
  *(unsigned char *)out = (unsigned char)lua_toboolean(L, idx);
}
static void test_decode(lua_State *L, const void *p) {
  lua_pushboolean(L, *(const unsigned char *)p != 0);
}
static const lp_udtype test_udtype = {
    .name = "luapool.test_udtype",
    .id = 32,
    .size = 1,
    .encode = test_encode,
    .decode = test_decode,
};
#endif

const lp_udtype *const luapool__udtypes[] = {
    &luapool__int128_udtype,
#ifdef LUAPOOL_TEST_UDTYPE
    &test_udtype,
#endif
    NULL,
};
