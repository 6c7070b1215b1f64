/*
** The wire handshake (wire.c): what an owner and a worker process say
** first, so that two builds that would misread each other refuse.
*/
#ifndef LUAPOOL_WIRE_H
#define LUAPOOL_WIRE_H

#include <stddef.h>

#include "base/buf.h"

/* Appends this build's handshake to b (0, or -1: no memory). */
int luapool__wire_hello(lp_buf *b);
/* 0 when the handshake p[0..len) is this build's; else -1.  Either way
** peer describes what it says ("luapool 0.1.0 (wire 1, Lua 5.4.4, ...)"). */
int luapool__wire_check(const char *p, size_t len, char *peer, size_t peersz);
/* This build, described the same way. */
void luapool__wire_describe(char *buf, size_t n);

#endif
