/*
** luapool.int128 as the codec carries it: its transferable-type descriptor
** (udtype.h), listed by udtype.c's table.  Apart from int128.c because it
** names the kernel scalar type (kernels/kernel.h), and kernel.h includes
** int128.h: in int128.c that include would be a cycle.
**
** On the wire: id 13 (its codec tag before the registry, so the format did
** not change), then the 16 bytes of the value in the sender's byte order
** (the handshake refuses a peer of the other order).
*/
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec/int128.h"
#include "codec/udtype.h"
#include "kernels/kernel.h"

extern const lp_udtype luapool__int128_udtype;

static void int128_encode(lua_State *L, int idx, void *out) {
  memcpy(out, lua_touserdata(L, idx), sizeof(lp_int128));
}

static void int128_decode(lua_State *L, const void *p) {
  lp_int128 v;
  memcpy(&v, p, sizeof v);
  luapool__int128_push(L, v);
}

const lp_udtype luapool__int128_udtype = {
    .name = LUAPOOL_INT128_MT,
    .id = 13,
    .size = sizeof(lp_int128),
    .encode = int128_encode,
    .decode = int128_decode,
    .scalar = LP_INT128,
};
