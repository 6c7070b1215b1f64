/*
** libFuzzer target: the value decoder on arbitrary bytes, as codec.decode
** and as a worker decoding a task.  It must return values or raise
** "malformed message: ..." - never crash, hang or leak.
** Build: cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DLUAPOOL_FUZZ=ON
** Run:   build-fuzz/spec/fuzz/codec_fuzz -max_total_time=60 build-fuzz/spec/fuzz/corpus
*/
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "bind/luapool.h"
#include "codec/codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Lua's bytecode loader allocates what a size field says before it reads
** that much: refuse single blocks over 64 MB, so a lying field becomes
** Lua's "not enough memory" error (as on a machine without that memory)
** instead of libFuzzer's out-of-memory stop. */
static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud;
  (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (nsize > ((size_t)64 << 20)) return NULL;
  return realloc(ptr, nsize);
}

static void check(lua_State *L, int st) {
  if (st != LUA_OK) {
    /* Every failure must be the decoder's own, named error. */
    const char *m = lua_tostring(L, -1);
    if (m == NULL ||
        (strstr(m, "malformed message") == NULL && strstr(m, "cannot receive ") == NULL &&
         strstr(m, "not enough memory") == NULL))
      __builtin_trap();
  }
  lua_settop(L, 0);
}

static lua_State *state(void) {
  static lua_State *L;
  if (L == NULL) {
    L = lua_newstate(limited_alloc, NULL);
    luaL_openlibs(L);
    luaL_requiref(L, "luapool", luaopen_luapool, 1);
    lua_getfield(L, -1, "codec");
    lua_getfield(L, -1, "decode");
    lua_setfield(L, LUA_REGISTRYINDEX, "fuzz.decode");
    lua_settop(L, 0);
  }
  return L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_State *L = state();
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz.decode");
  lua_pushlstring(L, (const char *)data, size);
  check(L, lua_pcall(L, 1, LUA_MULTRET, 0));
  lua_pushcfunction(L, luapool__codec_decode_as_task);
  lua_pushlstring(L, (const char *)data, size);
  check(L, lua_pcall(L, 1, LUA_MULTRET, 0));
  return 0;
}
