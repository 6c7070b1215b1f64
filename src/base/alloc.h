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

/* {====== big blocks
** A heap for blocks of LP_BIG_MIN bytes or more, made of regions mapped
** for it and given to transparent huge pages (MADV_HUGEPAGE): a page
** fault there brings in 2 MiB at once, not 4 KiB, and unmapping is as
** cheap.  Blocks start on a page, with a header in front, and take whole
** pages: a bitmap of each region says which are in use (first fit, so the
** memory just freed is the memory used next), and of all the regions
** whose last block went one is kept, the others unmapped.  A block bigger
** than a region has a mapping of its own instead (as malloc gives one to a
** block past its mmap threshold: main.c); when no mapping can be had
** (the kernel's map count, an address-space limit), a block comes from
** malloc.  The header says which, so any block is freed by
** luapool__big_free.  A heap belongs to one thread (a worker's Lua state,
** worker.c); once closed, the blocks it still had (pinned strings a
** reply holds) are mappings of their own, freed from any thread. */
#define LP_BIG_MIN    ((size_t)256 << 10)
#define LP_BIG_REGION ((size_t)32 << 20) /* a region's size */
typedef struct lp_bigheap {
  struct lp_bigregion *regions; /* the oldest first */
} lp_bigheap;
/* A block of at least n bytes (aligned for any object), or NULL. */
void *luapool__big_alloc(lp_bigheap *h, size_t n);
/* Resizes p (h's, or of its own) to at least n bytes, keeping its first
** min(old, n): in place when the pages after it are free, else moved (a
** mapping of its own moves by its pages, never its bytes).  NULL when
** that fails (p is left as it was); a shrink never fails. */
void *luapool__big_realloc(lp_bigheap *h, void *p, size_t n);
/* Frees p (NULL: nothing): h's own only on h's thread; after h closed, or
** a block of its own, from any thread. */
void luapool__big_free(void *p);
/* A word of p's header its owner may use (worker.c links blocks by it). */
void **luapool__big_link(void *p);
/* The heap's owner is done: a region with no block left is unmapped, the
** free pages of the others too, and each block left becomes a mapping of
** its own.  h is empty after it (and may be used again). */
void luapool__big_close(lp_bigheap *h);
/* }====== */

#endif
