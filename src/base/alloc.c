/*
** Big blocks (alloc.h), and the test build's failing C allocations.
*/
#include "base/alloc.h"

#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

/* {====== big blocks */

/* (A huge page's size where THP maps one with a page table entry of the
** middle level: 2 MiB on x86-64 and on arm64 with 4 KiB pages.  Regions
** are aligned to it so that each of its huge pages can be one.) */
#define HUGE_ALIGN ((size_t)2 << 20)

typedef struct lp_bigregion {
  struct lp_bigregion *next;
  lp_bigheap *heap;
  char *base;
  size_t npages;  /* LP_BIG_REGION in pages */
  size_t used;    /* pages in blocks */
  size_t hint;    /* no free page below this one */
  uint64_t map[]; /* a bit per page: set, in a block */
} lp_bigregion;

/* In front of every block (32 bytes: the block keeps any alignment). */
typedef union big_hdr {
  struct {
    lp_bigregion *region; /* NULL: a mapping of its own, or malloc's (pages 0) */
    size_t pages;         /* the block's, header included */
    void *link;           /* luapool__big_link */
  } h;
  max_align_t align[2];
} big_hdr;

static size_t page_size(void) {
  long v = sysconf(_SC_PAGESIZE);
  return v > 0 ? (size_t)v : 4096;
}

/* Pages for n bytes of block, or 0 when that overflows. */
static size_t pages_for(size_t n, size_t ps) {
  if (n > SIZE_MAX - sizeof(big_hdr) - ps) return 0;
  return (n + sizeof(big_hdr) + ps - 1) / ps;
}

static big_hdr *hdr_of(void *p) { return (big_hdr *)p - 1; }

/* size bytes mapped; at a huge page's boundary and given to huge pages
** when it holds one. */
static char *map_pages(size_t size, size_t ps) {
  if (size < HUGE_ALIGN) {
    void *a = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return a == MAP_FAILED ? NULL : a;
  }
  if (size > SIZE_MAX - HUGE_ALIGN) return NULL;
  size_t over = size + HUGE_ALIGN - ps;
  void *m = mmap(NULL, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return NULL;
  size_t head = (HUGE_ALIGN - (uintptr_t)m % HUGE_ALIGN) % HUGE_ALIGN, tail = over - head - size;
  char *a = (char *)m + head;
  if (head) munmap(m, head);
  if (tail) munmap(a + size, tail);
  madvise(a, size, MADV_HUGEPAGE); /* (advice: without THP, plain pages) */
  return a;
}

static void *block_at(char *at, lp_bigregion *r, size_t pages) {
  big_hdr *h = (big_hdr *)(void *)at;
  h->h.region = r;
  h->h.pages = pages;
  h->h.link = NULL;
  return h + 1;
}

static int bit(const lp_bigregion *r, size_t i) { return (int)(r->map[i / 64] >> (i % 64) & 1); }

/* The first page from i on (below `end`) whose bit is `want`, else end. */
static size_t next_bit(const lp_bigregion *r, size_t i, size_t end, int want) {
  while (i < end) {
    uint64_t w = want ? r->map[i / 64] : ~r->map[i / 64];
    w >>= i % 64;
    if (w) {
      size_t j = i + (size_t)__builtin_ctzll(w);
      return j < end ? j : end;
    }
    i = (i / 64 + 1) * 64;
  }
  return end;
}

static void set_bits(lp_bigregion *r, size_t i, size_t n, int on) {
  for (size_t end = i + n; i < end;) {
    size_t k = 64 - i % 64;
    if (k > end - i) k = end - i;
    uint64_t m = (k == 64 ? ~(uint64_t)0 : (((uint64_t)1 << k) - 1)) << (i % 64);
    if (on)
      r->map[i / 64] |= m;
    else
      r->map[i / 64] &= ~m;
    i += k;
  }
}

/* The first run of k free pages in r (first fit), or SIZE_MAX. */
static size_t find_run(const lp_bigregion *r, size_t k) {
  for (size_t i = r->hint; i + k <= r->npages;) {
    i = next_bit(r, i, r->npages, 0);
    if (i + k > r->npages) break;
    size_t j = next_bit(r, i, i + k, 1);
    if (j == i + k) return i;
    i = j;
  }
  return SIZE_MAX;
}

static lp_bigregion *region_new(lp_bigheap *h, size_t ps) {
  size_t npages = LP_BIG_REGION / ps, words = (npages + 63) / 64;
  lp_bigregion *r = calloc(1, sizeof *r + words * sizeof r->map[0]);
  if (r == NULL) return NULL;
  if ((r->base = map_pages(npages * ps, ps)) == NULL) {
    free(r);
    return NULL;
  }
  r->heap = h;
  r->npages = npages;
  lp_bigregion **pp = &h->regions; /* (last: the older ones are filled first) */
  while (*pp)
    pp = &(*pp)->next;
  *pp = r;
  return r;
}

static void region_unmap(lp_bigregion *r, size_t ps) {
  lp_bigheap *h = r->heap;
  lp_bigregion **pp = &h->regions;
  while (*pp != r)
    pp = &(*pp)->next;
  *pp = r->next;
  munmap(r->base, r->npages * ps);
  free(r);
}

static void *from_malloc(size_t n) {
  big_hdr *h = n <= SIZE_MAX - sizeof *h ? malloc(sizeof *h + n) : NULL;
  return h ? block_at((char *)h, NULL, 0) : NULL;
}

void *luapool__big_alloc(lp_bigheap *h, size_t n) {
  size_t ps = page_size(), k = pages_for(n, ps);
  if (k == 0) return NULL;
  if (k * ps > LP_BIG_REGION) { /* a mapping of its own */
    char *a = map_pages(k * ps, ps);
    return a ? block_at(a, NULL, k) : from_malloc(n);
  }
  lp_bigregion *r = h->regions;
  size_t at = SIZE_MAX;
  for (; r && (at = find_run(r, k)) == SIZE_MAX; r = r->next)
    ;
  if (r == NULL) {
    if ((r = region_new(h, ps)) == NULL) return from_malloc(n);
    at = 0;
  }
  set_bits(r, at, k, 1);
  r->used += k;
  if (at == r->hint) r->hint = at + k;
  return block_at(r->base + at * ps, r, k);
}

void **luapool__big_link(void *p) { return &hdr_of(p)->h.link; }

/* Gives back pages [at, at+k) of r's block (a shrink, a free). */
static void region_release(lp_bigregion *r, size_t at, size_t k, size_t ps) {
  set_bits(r, at, k, 0);
  r->used -= k;
  if (at < r->hint) r->hint = at;
  if (r->used) return;
  /* Empty: one such region is kept for what comes next, no more. */
  for (lp_bigregion *o = r->heap->regions; o; o = o->next)
    if (o != r && o->used == 0) {
      region_unmap(r, ps);
      return;
    }
}

void luapool__big_free(void *p) {
  if (p == NULL) return;
  big_hdr *h = hdr_of(p);
  size_t ps = page_size();
  lp_bigregion *r = h->h.region;
  if (r)
    region_release(r, (size_t)((char *)h - r->base) / ps, h->h.pages, ps);
  else if (h->h.pages)
    munmap(h, h->h.pages * ps); /* (fails only for a range that is no mapping) */
  else
    free(h);
}

void *luapool__big_realloc(lp_bigheap *heap, void *p, size_t n) {
  big_hdr *h = hdr_of(p);
  size_t ps = page_size(), k = pages_for(n, ps), old = h->h.pages;
  lp_bigregion *r = h->h.region;
  if (k == 0) return NULL;
  if (r == NULL && old == 0) { /* malloc's (a shrink of it does not fail either) */
    big_hdr *g = realloc(h, sizeof *h + n);
    /* (the block is g's, past its header: freed as such by luapool__big_free) */
    /* cppcheck-suppress memleak */
    return g ? g + 1 : NULL;
  }
  if (k == old) return p;
  if (r == NULL) { /* a mapping of its own: its pages move */
    void *a = mremap(h, old * ps, k * ps, k > old ? MREMAP_MAYMOVE : 0);
    if (a == MAP_FAILED) {
      if (k < old) return p; /* the kernel kept the pages: the block still holds n */
    } else {
      ((big_hdr *)a)->h.pages = k;
      return (big_hdr *)a + 1;
    }
  } else {
    size_t at = (size_t)((char *)h - r->base) / ps;
    if (k < old) {
      region_release(r, at + k, old - k, ps); /* (never the last page: used stays > 0) */
      h->h.pages = k;
      return p;
    }
    if (at + k <= r->npages &&
        next_bit(r, at + old, at + k, 1) == at + k) { /* the pages after it are free */
      set_bits(r, at + old, k - old, 1);
      r->used += k - old;
      if (r->hint == at + old) r->hint = at + k;
      h->h.pages = k;
      return p;
    }
  }
  void *q = luapool__big_alloc(heap, n);
  if (q == NULL) return NULL;
  memcpy(q, p, old * ps - sizeof *h);
  luapool__big_free(p);
  return q;
}

void luapool__big_close(lp_bigheap *h) {
  size_t ps = page_size();
  while (h->regions) {
    lp_bigregion *r = h->regions;
    for (size_t i = 0; r->used && i < r->npages;) {
      if (bit(r, i)) { /* a block someone still holds: a mapping of its own now */
        big_hdr *b = (big_hdr *)(void *)(r->base + i * ps);
        b->h.region = NULL;
        i += b->h.pages;
      } else {
        size_t j = next_bit(r, i, r->npages, 1);
        munmap(r->base + i * ps, (j - i) * ps);
        i = j;
      }
    }
    if (r->used == 0) munmap(r->base, r->npages * ps);
    h->regions = r->next;
    free(r);
  }
}

/* }====== */

#ifdef LUAPOOL_TEST_ALLOC
static _Thread_local long budget = -1; /* -1: no failure armed */
static _Thread_local int fail_once;
static _Thread_local long failed; /* since the last arming */

long luapool__test_fail_c_alloc(long n, int once) {
  long was = failed;
  budget = n < 0 ? -1 : n;
  fail_once = once;
  failed = 0;
  return was;
}

int luapool__test_alloc_fails(void) {
  if (budget < 0) return 0;
  if (budget > 0) {
    budget--;
    return 0;
  }
  if (fail_once) budget = -1; /* this one fails, the next succeed */
  failed++;
  return 1;
}
#endif
