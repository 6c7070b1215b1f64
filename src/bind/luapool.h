/*
** The module (luapool.c): luaopen_luapool and the worker states it opens.
** It also forwards, for now, to what two includers outside the module
** took from the old one-header luapool.h: ctrlc.h for kernels/http.c
** (luapool__check_signal) and codec.h for spec/fuzz/codec_fuzz.c (the
** decoder); each can include those itself instead.
*/
#ifndef LUAPOOL_H
#define LUAPOOL_H

#include <lua.h>

#include "codec/codec.h" /* for spec/fuzz/codec_fuzz.c, see above */
#include "base/ctrlc.h"  /* for kernels/http.c, see above */

int luaopen_luapool(lua_State *L);
/* Opens luapool into L as a global (with threadpool, processpool and a
** line-atomic print) and records which worker L is; kind NULL: the host. */
void luapool__open_worker_state(lua_State *L, const char *kind, const char *name, int index);

#endif
