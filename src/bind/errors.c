/*
** Error objects: what a failed future raises and exception() returns.
*/
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "bind/errors.h"

static const char *ekind_names[] = {"task",   "timeout",  "cancelled",  "crashed",
                                    "broken", "transfer", "interrupted"};

const char *luapool__ekind_name(lp_ekind k) { return ekind_names[k]; }

/* The last one the script got: a registry entry of its own. */
static const char SIGNAL_ERROR_KEY = 0;

void luapool__mark_signal_error(lua_State *L, int idx) {
  lua_pushvalue(L, idx);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &SIGNAL_ERROR_KEY);
}

int luapool__is_signal_error(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TTABLE) return 0;
  idx = lua_absindex(L, idx);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &SIGNAL_ERROR_KEY);
  int is = lua_rawequal(L, -1, idx);
  lua_pop(L, 1);
  return is;
}

void luapool__push_error(lua_State *L, lp_ekind kind, const char *message, const char *traceback,
                         const char *worker, int value_idx) {
  if (value_idx) value_idx = lua_absindex(L, value_idx);
  lua_createtable(L, 0, 5);
  lua_pushstring(L, luapool__ekind_name(kind));
  lua_setfield(L, -2, "kind");
  lua_pushstring(L, message);
  lua_setfield(L, -2, "message");
  if (traceback && *traceback) {
    lua_pushstring(L, traceback);
    lua_setfield(L, -2, "traceback");
  }
  if (worker && *worker) {
    lua_pushstring(L, worker);
    lua_setfield(L, -2, "worker");
  }
  if (value_idx) {
    lua_pushvalue(L, value_idx);
    lua_setfield(L, -2, "value");
  }
  luaL_setmetatable(L, LUAPOOL_ERROR_MT);
}

/* "task failed in worker io-2: job.lua:7: boom" and the worker's traceback
** ("task failed in worker io-2 (item #7): ..." when the error has an
** integer `item`, the index of a map/imap/starmap item); other kinds read
** "kind: message". */
static int error_tostring(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "kind");
  lua_getfield(L, 1, "message");
  lua_getfield(L, 1, "worker");
  lua_getfield(L, 1, "traceback");
  lua_getfield(L, 1, "item"); /* 6: set by map/imap/starmap on an item's error */
  const char *kind = luaL_optstring(L, 2, "error");
  const char *msg = luaL_optstring(L, 3, "?");
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  if (strcmp(kind, "task") == 0 && lua_isinteger(L, 6)) {
    lua_pushfstring(L, "task failed in worker %s (item #%I): %s", luaL_optstring(L, 4, "?"),
                    lua_tointeger(L, 6), msg);
  } else if (strcmp(kind, "task") == 0) {
    lua_pushfstring(L, "task failed in worker %s: %s", luaL_optstring(L, 4, "?"), msg);
  } else {
    lua_pushfstring(L, "%s: %s", kind, msg);
  }
  luaL_addvalue(&b);
  if (lua_isstring(L, 5)) {
    luaL_addstring(&b, "\nworker ");
    lua_pushvalue(L, 5);
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  return 1;
}

const char *luapool__got(lua_State *L, int idx) {
  if (lua_type(L, idx) == LUA_TNUMBER) return luaL_tolstring(L, idx, NULL);
  return luaL_typename(L, idx);
}

void luapool__error_open(lua_State *L) {
  if (luaL_newmetatable(L, LUAPOOL_ERROR_MT)) {
    lua_pushcfunction(L, error_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
}
