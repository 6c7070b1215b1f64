/*
** Private glue between the kernel sources (registry.c, squares.c, http.c).
** Nothing outside src/kernels/ should need this header: the public surface
** is kernel.h.
*/
#ifndef LUAPOOL_KERNELS_INTERNAL_H
#define LUAPOOL_KERNELS_INTERNAL_H

#include "kernels/kernel.h"

/* Native bodies, listed in luapool__kernels by registry.c (which also holds
** their Lua faces: those are one-liners over luapool__kernel_call_lua). */
int luapool__sum_squares_run(lp_kcall *c);
int luapool__fetch_length_run(lp_kcall *c);

/* "bad argument #N to 'NAME' (DETAIL)" for details that are not of the
** "X expected, got TYPE" shape (e.g. "non-negative integer expected, got -5"). */
int luapool__kargmsg(lp_kcall *c, const char *kname, int arg, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Writes a number the way Lua's tostring does (integers as "%lld", floats
** as "%.14g" plus ".0" when that looks like an integer); returns buf. */
const char *luapool__knumfmt(const lp_value *v, char *buf, size_t size);

#endif
