/*
** The wire handshake: what a worker process and its parent say first, so
** that a worker binary of another build (an older luapool installed
** elsewhere, a build named by LUAPOOL_WORKER_EXE, later an MPI rank on
** another machine) is refused at pool start with a message naming both,
** never fed messages it would misread.
**
** Handshake (the payload of the parent's first frame, and of a worker's
** refusal's description):
**   8 bytes  magic "LUAPOOL\0"
**   u32      wire version (the codec's and the frames' format; kept in
**            this file alone, so a test build can differ in it only)
**   u8 x 4   byte order (1: little-endian), sizeof(lua_Integer),
**            sizeof(lua_Number), sizeof(size_t)
**   string   luapool version, string  Lua release
**   u64      digest of what travels by number: the kernel table (names in
**            order: a kernel is sent by its index) and the transferable
**            userdata types (udtype.h: id, name and size of each, in
**            order), so two builds that register different types refuse
**            each other (described as "kernels", the older field's name)
** Each number is written in the sender's byte order; the byte-order field
** comes before any number wider than a byte that matters.
*/
#include <stdio.h>
#include <string.h>

#include <lua.h>

#include "base/buf.h"
#include "codec/codec.h"
#include "codec/udtype.h"
#include "kernels/kernel.h"
#include "base/util.h"
#include "codec/wire.h"

#ifndef LUAPOOL_WIRE_VERSION
#define LUAPOOL_WIRE_VERSION 1
#endif

static const char MAGIC[8] = "LUAPOOL";

static unsigned byte_order(void) {
  const uint16_t one = 1;
  unsigned char b;
  memcpy(&b, &one, 1);
  return b == 1 ? 1u : 2u;
}

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    h ^= ((const unsigned char *)p)[i];
    h *= 1099511628211ull;
  }
  return h;
}

/* The kernel names, each with its NUL, as before the types were added
** (so a build with no transferable type has the old digest); then per
** type a 0xff (no name starts so), its id, size and name with its NUL. */
static uint64_t kernel_digest(void) {
  uint64_t h = 14695981039346656037ull; /* FNV-1a */
  for (int i = 0; luapool__kernels[i].name; i++)
    h = fnv1a(h, luapool__kernels[i].name, strlen(luapool__kernels[i].name) + 1);
  for (int i = 0; luapool__udtypes[i]; i++) {
    const lp_udtype *t = luapool__udtypes[i];
    uint32_t size = (uint32_t)t->size;
    unsigned char head[2] = {0xff, t->id};
    h = fnv1a(h, head, sizeof head);
    h = fnv1a(h, &size, sizeof size);
    h = fnv1a(h, t->name, strlen(t->name) + 1);
  }
  return h;
}

typedef struct hello {
  uint32_t wire;
  unsigned order, isize, nsize, zsize;
  char version[32], lua[32];
  uint64_t kernels;
} hello;

static void this_build(hello *h) {
  memset(h, 0, sizeof *h);
  h->wire = LUAPOOL_WIRE_VERSION;
  h->order = byte_order();
  h->isize = sizeof(lua_Integer);
  h->nsize = sizeof(lua_Number);
  h->zsize = sizeof(size_t);
  snprintf(h->version, sizeof h->version, "%s", LUAPOOL_VERSION);
  snprintf(h->lua, sizeof h->lua, "%s", LUA_RELEASE);
  h->kernels = kernel_digest();
}

static void describe(const hello *h, char *buf, size_t n) {
  char sizes[64];
  if (h->isize == h->nsize)
    snprintf(sizes, sizeof sizes, "%u-byte integers and floats", h->isize);
  else
    snprintf(sizes, sizeof sizes, "%u-byte integers, %u-byte floats", h->isize, h->nsize);
  snprintf(buf, n, "luapool %s (wire %u, %s, %s-endian, %s, kernels %016llx)", h->version,
           (unsigned)h->wire, h->lua, h->order == 1 ? "little" : "big", sizes,
           (unsigned long long)h->kernels);
}

void luapool__wire_describe(char *buf, size_t n) {
  hello h;
  this_build(&h);
  describe(&h, buf, n);
}

int luapool__wire_hello(lp_buf *b) {
  hello h;
  this_build(&h);
  return luapool__buf_add(b, MAGIC, sizeof MAGIC) || luapool__put_u32(b, h.wire) ||
                 luapool__put_u8(b, h.order) || luapool__put_u8(b, h.isize) ||
                 luapool__put_u8(b, h.nsize) || luapool__put_u8(b, h.zsize) ||
                 luapool__put_string(b, h.version, strlen(h.version)) ||
                 luapool__put_string(b, h.lua, strlen(h.lua)) ||
                 luapool__buf_add(b, &h.kernels, sizeof h.kernels)
             ? -1
             : 0;
}

int luapool__wire_check(const char *p, size_t len, char *peer, size_t peersz) {
  hello mine, theirs;
  this_build(&mine);
  memset(&theirs, 0, sizeof theirs);
  lp_reader r = {p, p + len};
  const char *v, *l;
  size_t vl, ll;
  if (len < sizeof MAGIC || memcmp(p, MAGIC, sizeof MAGIC) != 0) {
    snprintf(peer, peersz, "not a luapool handshake");
    return -1;
  }
  r.p += sizeof MAGIC;
  if (luapool__get_u32(&r, &theirs.wire) || luapool__get_u8(&r, &theirs.order) ||
      luapool__get_u8(&r, &theirs.isize) || luapool__get_u8(&r, &theirs.nsize) ||
      luapool__get_u8(&r, &theirs.zsize) || luapool__get_string(&r, &v, &vl) ||
      luapool__get_string(&r, &l, &ll) || (size_t)(r.end - r.p) < sizeof theirs.kernels) {
    snprintf(peer, peersz, "a malformed luapool handshake");
    return -1;
  }
  memcpy(&theirs.kernels, r.p, sizeof theirs.kernels);
  snprintf(theirs.version, sizeof theirs.version, "%.*s", (int)vl, v);
  snprintf(theirs.lua, sizeof theirs.lua, "%.*s", (int)ll, l);
  describe(&theirs, peer, peersz);
  int same = mine.wire == theirs.wire && mine.order == theirs.order && mine.isize == theirs.isize &&
             mine.nsize == theirs.nsize && mine.zsize == theirs.zsize &&
             strcmp(mine.version, theirs.version) == 0 && strcmp(mine.lua, theirs.lua) == 0 &&
             mine.kernels == theirs.kernels;
  return same ? 0 : -1;
}
