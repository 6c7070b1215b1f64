/*
** Byte buffers and the bounded reader (buf.h).
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"
#include "base/buf.h"

int luapool__buf_reserve(lp_buf *b, size_t extra) {
  if (b->cap - b->len >= extra) return 0;
  if (extra > SIZE_MAX / 2 - b->len) return -1;
  size_t ncap = b->cap ? b->cap : 256;
  while (ncap - b->len < extra)
    ncap *= 2;
  char *np = lp_realloc(b->p, ncap);
  if (np == NULL) return -1;
  b->p = np;
  b->cap = ncap;
  return 0;
}

int luapool__buf_add(lp_buf *b, const void *p, size_t n) {
  if (luapool__buf_reserve(b, n) != 0) return -1;
  if (n) memcpy(b->p + b->len, p, n);
  b->len += n;
  return 0;
}

void luapool__buf_free(lp_buf *b) {
  lp_free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
}

char *luapool__buf_take(lp_buf *b, size_t *len) {
  char *p = b->p;
  *len = b->len;
  b->p = NULL;
  b->len = b->cap = 0;
  return p;
}

int luapool__put_u8(lp_buf *b, unsigned v) {
  unsigned char c = (unsigned char)v;
  return luapool__buf_add(b, &c, 1);
}

int luapool__put_u32(lp_buf *b, uint32_t v) { return luapool__buf_add(b, &v, 4); }

int luapool__get_u8(lp_reader *r, unsigned *v) {
  if (r->p >= r->end) return -1;
  *v = (unsigned char)*r->p++;
  return 0;
}

int luapool__get_u32(lp_reader *r, uint32_t *v) {
  if ((size_t)(r->end - r->p) < 4) return -1;
  memcpy(v, r->p, 4);
  r->p += 4;
  return 0;
}
