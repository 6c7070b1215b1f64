/*
** Byte buffers: a growable buffer to write into and a bounds-checked
** reader over untrusted bytes, with the fixed-size scalars of every
** message (the codec's tagged values are built on them, codec.h).
*/
#ifndef LUAPOOL_BUF_H
#define LUAPOOL_BUF_H

#include <stddef.h>
#include <stdint.h>

/* {====== growable byte buffer */
typedef struct lp_buf {
  char *p;
  size_t len, cap;
} lp_buf;

int luapool__buf_reserve(lp_buf *b, size_t extra); /* 0, or -1: no memory */
int luapool__buf_add(lp_buf *b, const void *p, size_t n);
void luapool__buf_free(lp_buf *b);
/* Hands the bytes to the caller (who frees them) and empties b. */
char *luapool__buf_take(lp_buf *b, size_t *len);
int luapool__put_u8(lp_buf *b, unsigned v);
int luapool__put_u32(lp_buf *b, uint32_t v); /* host byte order */
/* }====== */

/* {====== reader over untrusted bytes: every read is bounds-checked */
typedef struct lp_reader {
  const char *p, *end;
} lp_reader;

/* 0, or -1 when fewer bytes are left than the value takes. */
int luapool__get_u8(lp_reader *r, unsigned *v);
int luapool__get_u32(lp_reader *r, uint32_t *v);
/* }====== */

#endif
