/*
** The C allocations of the core and the bindings go through these (the
** Lua allocator is the other half: a test host fails that one).  In a
** normal build they are malloc and friends; in a LUAPOOL_TEST_ALLOC build
** (the oom gate) the calling thread's allocations can be made to fail on
** demand, so every out-of-memory path in C is driven as Lua's are
** (spec/oom/oom.lua, spec/core_test.c).  What they return is freed with
** lp_free (free), wherever it was allocated.
*/
#ifndef LUAPOOL_ALLOC_H
#define LUAPOOL_ALLOC_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#ifdef LUAPOOL_TEST_ALLOC
/* n >= 0: the calling thread's C allocations succeed n more times, then
** the next one fails, and when not once every one after it too, until
** luapool__test_fail_c_alloc(-1, 0).  Per thread, so a scenario's
** failures do not depend on what other threads allocate.  Returns how
** many allocations the previous arming failed. */
long luapool__test_fail_c_alloc(long n, int once);
/* Should this allocation fail?  Counts it. */
int luapool__test_alloc_fails(void);
#define LP_ALLOC_FAILS() luapool__test_alloc_fails()
#else
#define LP_ALLOC_FAILS() 0
#endif

static inline void *lp_malloc(size_t n) { return LP_ALLOC_FAILS() ? NULL : malloc(n); }
static inline void *lp_calloc(size_t n, size_t size) {
  return LP_ALLOC_FAILS() ? NULL : calloc(n, size);
}
/* (a failed growth leaves p as it was, as realloc does) */
static inline void *lp_realloc(void *p, size_t n) {
  return LP_ALLOC_FAILS() ? NULL : realloc(p, n);
}
static inline char *lp_strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = lp_malloc(n);
  return d ? memcpy(d, s, n) : NULL;
}
static inline void lp_free(void *p) { free(p); }

#endif
