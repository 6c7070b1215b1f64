/*
** Error objects (errors.c): {kind, message, traceback, worker, value}
** with a __tostring, the value a failed future raises.
*/
#ifndef LUAPOOL_ERRORS_H
#define LUAPOOL_ERRORS_H

#include <lua.h>

#include "core/future.h" /* lp_ekind */

#define LUAPOOL_ERROR_MT "luapool.error"

/* Pushes an error object {kind, message, traceback, worker, value}; value
** at value_idx (0: none). */
void luapool__push_error(lua_State *L, lp_ekind kind, const char *message, const char *traceback,
                         const char *worker, int value_idx);
const char *luapool__ekind_name(lp_ekind k);
/* The error object at idx is the one a signal raised in the script (Ctrl-C,
** SIGTERM: luapool.c's deliver_signal), not a task's error of kind
** "interrupted" that a callback re-raised. */
void luapool__mark_signal_error(lua_State *L, int idx);
int luapool__is_signal_error(lua_State *L, int idx);
/* What a refused value was, for "X expected, got Y" in argument and option
** errors, as the Lua layer's got() says it: a number as Lua prints it
** (tostring: -1, 2.5, nan), anything else by its type (a string "1" is not
** a number here).  May push a string (a number's text). */
const char *luapool__got(lua_State *L, int idx);
/* Registers the error objects' metatable. */
void luapool__error_open(lua_State *L);

#endif
