/*
** Build-time tool: compiles a Lua file into a binary chunk, so that the
** Lua layer compiled into luapool is loaded as bytecode at every start
** instead of being parsed again (parsing executor.lua was about a third
** of `luapool -e ''`).  It links the same Lua as the build, so the chunk's
** format is the one the module and the host load.  Debug information is
** kept: error messages and tracebacks keep their lines, under the chunk
** name given here (the one luaL_loadbuffer would have given the source).
**
** usage: luadump IN.lua OUT.luac CHUNKNAME
*/
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

static int writer(lua_State *L, const void *p, size_t n, void *out) {
  (void)L;
  return fwrite(p, 1, n, out) != n;
}

int main(int argc, char **argv) {
  lua_State *L;
  FILE *in, *out;
  char *buf = NULL;
  size_t len = 0, cap = 0, n;
  if (argc != 4) {
    fprintf(stderr, "usage: %s IN.lua OUT.luac CHUNKNAME\n", argv[0]);
    return 2;
  }
  if ((in = fopen(argv[1], "rb")) == NULL) {
    perror(argv[1]);
    return 1;
  }
  do {
    if (len == cap) {
      char *nb = realloc(buf, cap = cap ? cap * 2 : 65536);
      if (nb == NULL) {
        fputs("luadump: out of memory\n", stderr);
        return 1;
      }
      buf = nb;
    }
    n = fread(buf + len, 1, cap - len, in);
    len += n;
  } while (n > 0);
  fclose(in);
  if ((L = luaL_newstate()) == NULL) {
    fputs("luadump: cannot create a Lua state\n", stderr);
    return 1;
  }
  if (luaL_loadbufferx(L, buf, len, argv[3], "t") != LUA_OK) {
    fprintf(stderr, "luadump: %s\n", lua_tostring(L, -1));
    return 1;
  }
  if ((out = fopen(argv[2], "wb")) == NULL) {
    perror(argv[2]);
    return 1;
  }
  if (lua_dump(L, writer, out, 0) != 0 || fclose(out) != 0) {
    fprintf(stderr, "luadump: cannot write %s\n", argv[2]);
    remove(argv[2]);
    return 1;
  }
  lua_close(L);
  free(buf);
  return 0;
}
