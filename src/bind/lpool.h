/*
** The pool's Lua face (lpool.c): the pool userdata, its methods, new()
** and its options, and the primitives of the Lua layer.
*/
#ifndef LUAPOOL_LPOOL_H
#define LUAPOOL_LPOOL_H

#include <lua.h>

#include "core/engine.h"
#include "core/pool.h"

#define LUAPOOL_POOL_MT "luapool.pool"

/* Runs the done callbacks of p's finished futures (owner only). */
void luapool__pool_poll(lua_State *L, int pool_idx);
/* Remembers the future at fidx in the pool at pool_idx until its
** callbacks have run (so the userdata outlives the script's last use). */
void luapool__pool_watch(lua_State *L, int pool_idx, int fidx);
lp_pool *luapool__check_pool(lua_State *L, int idx);
lp_pool *luapool__to_pool(lua_State *L, int idx); /* NULL when closed */
/* new(options): a pool of engine e at the top of the stack. */
int luapool__pool_new(lua_State *L, const lp_engine *e);
void luapool__pool_open(lua_State *L);
/* Pushes the table of primitives the Lua layer is built on. */
void luapool__push_prims(lua_State *L);

#endif
