/*
** The value codec (codec.c): Lua values <-> bytes, one format for every
** engine; the codec's strings and kernel scalars over buf.h.
*/
#ifndef LUAPOOL_CODEC_H
#define LUAPOOL_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "base/buf.h"
#include "kernels/kernel.h"

/* Nesting has no limit but memory: neither direction recurses in C. */

/* Encodes values [first, first+n) of L's stack, appending to b.  Returns 0,
** or -1 with a message in err that names the culprit's path, starting with
** the root name (e.g. "argument #2"), numbered from root_base.  A memory
** error may still be raised by Lua itself: b must be a buffer that cannot
** leak then (a scratch buffer, or one owned by C code that frees it). */
typedef struct lp_encode_ctx {
  const char *root; /* "argument", "result", "error value" */
  int root_base;    /* number of the first encoded value */
  char err[512];
  const char *suffix; /* after the number ("of item #3"); NULL: none */
  int named;          /* out: set when a value went by name or as a function */
  const char *first;  /* non-NULL: the first value's name ("initializer"), the
                      ** others numbered from root_base */
  int cstate;         /* stack index of the codec state (luapool__codec_state),
                      ** 0: the encoder looks it up when it needs it */
  /* Non-NULL (a thread worker's reply): a string of at least LP_PIN_MIN
  ** bytes, at idx, is offered to pin first; when it returns 0 the
  ** message carries the string's address, not its bytes (worker.c keeps
  ** the string alive for the reply: core/future.h, "pinned strings"),
  ** else (-1) its bytes as usual.  It may raise a memory error. */
  int (*pin)(void *ud, lua_State *L, int idx, const char *s, size_t len);
  void *pin_ud;
  /* Non-NULL (codec.encode, whose result is one Lua string): a string of
  ** at least LP_PIN_MIN bytes that is not pinned, at idx, is offered to
  ** split first; when it returns 0 the encoder writes its tag and length
  ** only, and the caller joins the string's bytes in at b->len as of the
  ** call (it anchored the string), so that they are copied once, into
  ** the result, not twice.  -1: its bytes go into b as usual. */
  int (*split)(void *ud, lua_State *L, int idx, size_t at);
  void *split_ud;
} lp_encode_ctx;
/* Below this a string is copied: at 32 KiB pinning and copying cost
** about the same, at 64 KiB pinning takes 12% less CPU per task
** (docs/performance.md, session 20). */
#define LP_PIN_MIN ((size_t)64 << 10)

/* Pushes the codec state of L's Lua state: one userdata, made the first
** time, that holds what the encoder keeps between messages (its scratch
** buffer, the names table, the dump cache).  A caller that encodes often
** keeps it at hand (a pool: in a user value) and passes its index in
** lp_encode_ctx.cstate and to luapool__scratch_in, so that no registry
** lookup is made per message. */
void luapool__codec_state(lua_State *L);

/* An empty scratch buffer that lives in a userdata, pushed on the stack:
** a Lua error raised while it holds bytes cannot leak them.  The caller
** owns it until luapool__scratch_release(L, idx of that userdata), which
** keeps it for the next caller and never raises; a caller nested
** meanwhile (a __gc that submits) gets a buffer of its own, and so does
** the next caller after an error that skipped the release (the skipped
** one is collected). */
lp_buf *luapool__scratch(lua_State *L);
/* The same, from the codec state at index cstate. */
lp_buf *luapool__scratch_in(lua_State *L, int cstate);
void luapool__scratch_release(lua_State *L, int idx);
int luapool__encode(lua_State *L, lp_buf *b, int first, int n, lp_encode_ctx *ctx);
/* Appends raw scalars (for message headers, replies built in C). */
int luapool__put_string(lp_buf *b, const char *s, size_t len);
int luapool__put_value(lp_buf *b, const lp_value *v); /* a kernel scalar */

int luapool__get_string(lp_reader *r, const char **s, size_t *len);
/* A scalar value as a kernel sees it; 1 ok, 0 the value is not a scalar
** (reader unchanged), -1 malformed. */
int luapool__get_scalar(lp_reader *r, lp_value *v);
/* Is the next value a kernel?  Returns its index and consumes it, or -1. */
int luapool__peek_kernel(lp_reader *r);
/* Decodes n values onto L's stack (raises on malformed input). */
void luapool__decode(lua_State *L, lp_reader *r, int n);
/* The same for a reply of this process's thread worker that refers to
** pinned strings (luapool__future_pinned): only then are addresses in
** the bytes taken. */
void luapool__decode_pinned(lua_State *L, lp_reader *r, int n);
/* The same for a task message in a worker: a function sent before (same
** id) is the closure loaded then, with this message's upvalues. */
void luapool__decode_task(lua_State *L, lp_reader *r, int n);
/* luapool.codec.encode/decode: for tests, fuzzing and benchmarks. */
int luapool__codec_encode(lua_State *L);
int luapool__codec_decode(lua_State *L);
/* The same bytes decoded as a worker decodes a task message (through its
** function cache): for the fuzz target. */
int luapool__codec_decode_as_task(lua_State *L);
/* luapool.codec.cache(): {key = "prototype" or "closure", prototypes and
** bytes = what this state's dump cache holds, limit and byte_limit = its
** bounds}, for tests. */
int luapool__codec_cache(lua_State *L);

#endif
