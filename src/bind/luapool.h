/*
** The module (luapool.c): luaopen_luapool and the worker states it opens.
*/
#ifndef LUAPOOL_H
#define LUAPOOL_H

#include <lua.h>

int luaopen_luapool(lua_State *L);
/* Opens luapool into L as a global (with a global per engine and a
** line-atomic print) and records which worker L is; kind NULL: the host. */
void luapool__open_worker_state(lua_State *L, const char *kind, const char *name, int index);

#endif
