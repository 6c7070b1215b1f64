/*
** Transferable userdata (udtype.c): the userdata types the codec carries.
** A value type that should travel between states (int128 today) describes
** itself once with an lp_udtype, in its own file, and udtype.c's table
** lists it.  The codec knows no type by name: it finds a userdata's type
** here by its metatable, writes the type's id and bytes, and on the other
** side finds the type by id and lets it push the value.  The handshake
** (wire.c) digests the table, so two builds that register different types
** refuse each other.  Header only but for the table: no dependency.
*/
#ifndef LUAPOOL_UDTYPE_H
#define LUAPOOL_UDTYPE_H

#include <stddef.h>

#include <lua.h>

typedef struct lp_udtype {
  /* The name its metatable has in the registry (luaL_newmetatable): the
  ** encoder knows a value of this type by it. */
  const char *name;
  /* Its tag on the wire, in place of a codec tag: stable (a receiver of
  ** another build reads it), never reused.  Any byte the codec does not
  ** use for a tag of its own (codec.c: 0-12, 14 and 15 are taken; 13 is
  ** luapool.int128's, its tag before this registry); new types take 32
  ** and up. */
  unsigned char id;
  /* The bytes that follow the id, always this many (no length travels:
  ** a type of variable size would need one, a wire version change). */
  size_t size;
  /* Writes the value at idx, a userdata with this type's metatable, as
  ** size bytes at out.  Must not raise. */
  void (*encode)(lua_State *L, int idx, void *out);
  /* Pushes the value whose size bytes are at p (unaligned).  May raise
  ** (no memory) but must accept any bytes: a message is checked for
  ** length only. */
  void (*decode)(lua_State *L, const void *p);
  /* Non-zero: the lp_vtype (kernels/kernel.h) a kernel sees the value
  ** as, its size bytes being the start of lp_value's union, so that a
  ** worker passes it to a kernel and writes a kernel's answer without a
  ** Lua state (luapool__get_scalar, luapool__put_value). */
  int scalar;
} lp_udtype;

/* Every transferable type, NULL-terminated (udtype.c). */
extern const lp_udtype *const luapool__udtypes[];

#endif
