/*
** Native kernels: C functions that run a task with no Lua state at all.
**
** A kernel sees its arguments as plain C scalars (lp_value) and answers with
** up to LP_KERNEL_MAXOUT scalars.  The same kernel serves two callers:
**   - Lua code calling luapool.kernels.NAME(...) directly (any Lua state), and
**   - a pool worker that received the kernel as a task function, which calls
**     it straight from the decoded message bytes without touching Lua.
*/
#ifndef LUAPOOL_KERNEL_H
#define LUAPOOL_KERNEL_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <lua.h>

#include "codec/int128.h"
#include "base/stop.h"
#include "base/util.h"     /* luapool__now, the clock of lp_kcall.deadline */
#include "worker/wstate.h" /* luapool__lua_interrupt */

typedef enum {
  LP_NIL,
  LP_BOOL,
  LP_INT,    /* lua_Integer */
  LP_NUM,    /* lua_Number (float) */
  LP_STR,    /* borrowed bytes: valid for the duration of the call */
  LP_INT128, /* luapool.int128: exact 128-bit signed integer */
  LP_OTHER   /* anything a kernel cannot take (tables, functions...) */
} lp_vtype;

typedef struct lp_value {
  lp_vtype type;
  const char *tname; /* Lua type name, for "number expected, got table" */
  union {
    int b;
    lua_Integer i;
    lua_Number n;
    lp_int128 big;
    struct {
      const char *p;
      size_t len;
    } s;
  } u;
} lp_value;

#define LP_KERNEL_MAXARGS 8
#define LP_KERNEL_MAXOUT  4
#define LP_KERNEL_ERRSZ   1024

typedef struct lp_kcall {
  const lp_value *args;
  int nargs;
  lp_value out[LP_KERNEL_MAXOUT]; /* results; LP_STR not allowed here */
  int nout;
  /* Non-NULL while running inside a pool worker: kernels poll it at a
  ** bounded interval (luapool__interrupted) and fail with "interrupted". */
  const lp_interrupt *interrupt;
  /* luapool__now() time by which the task must end; 0: none.  Kernels that
  ** wait (HTTP) stop waiting then. */
  double deadline;
  char err[LP_KERNEL_ERRSZ]; /* message when the kernel returns -1 */
} lp_kcall;

/* Returns 0 with results in out[0..nout), or -1 with a message in err. */
typedef int (*lp_kernel_fn)(lp_kcall *c);

typedef struct lp_kernel {
  const char *name;     /* "sum_squares": field of luapool.kernels */
  lua_CFunction lua_fn; /* the Lua-callable face of the kernel */
  lp_kernel_fn run;     /* the native body */
} lp_kernel;

/* NULL-terminated table of every kernel (kernels/registry.c). */
extern const lp_kernel luapool__kernels[];
/* Index into luapool__kernels of a Lua-callable face, or -1. */
int luapool__kernel_index(lua_CFunction f);

/* Lua face shared by all kernels: read the Lua arguments into lp_values, run
** k, push the results or raise the kernel's error. */
int luapool__kernel_call_lua(lua_State *L, const lp_kernel *k);

/* Helpers for kernel bodies: fill c->err, return -1. */
int luapool__kerr(lp_kcall *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* "bad argument #N to 'NAME' (number expected, got table)" */
int luapool__kargerr(lp_kcall *c, const char *kname, int arg, const char *expected);

/* {====== http (kernels/http.c) */
/* Loads libcurl and runs curl_global_init, once per process, on the first
** call from any thread (the others wait for it); 0, or -1 when libcurl
** cannot be loaded or initialised.  Nothing calls it at start-up: libcurl
** and OpenSSL are loaded only when a script first needs HTTP. */
int luapool__http_global_init(void);
/* NULL once libcurl is usable, else why not ("cannot load libcurl
** (libcurl.so.4: cannot open shared object file: ...)"); loads it. */
const char *luapool__http_init_error(void);
/* luapool.http.get(url [, opts]) */
int luapool__http_get(lua_State *L);
/* luapool.http.request{url =, method =, ...} (kernels/http.c) */
int luapool__http_request(lua_State *L);
/* libcurl's version ("7.88.1"), loading it; "?" when it cannot be loaded. */
const char *luapool__curl_version(void);
/* Frees the calling thread's easy handle (worker exit, module close). */
void luapool__http_thread_cleanup(void);
/* }====== */

/* fetch_length takes a URL and an optional timeout: the text for an
** argument past them (argument number %d), the same from the kernel, a
** Lua task's yielding call and an iopool's native task. */
#define LP_FETCH_EXTRA_WHY "no value expected: it takes a URL and an optional timeout"
#define LP_FETCH_EXTRA_ARG "bad argument #%d to 'fetch_length' (" LP_FETCH_EXTRA_WHY ")"

#endif
