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

typedef __int128 lp_int128;

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

/* How a worker tells its running task to stop.  `closing` stops whatever
** runs (the pool is going away, Ctrl-C); `kill_seq` stops only the task
** whose sequence number it names (a deadline), so a stop that arrives late
** can never hit the task after it. */
typedef struct lp_interrupt {
  atomic_int closing;
  atomic_uint_fast64_t seq;      /* the running task's number */
  atomic_uint_fast64_t kill_seq; /* stop the task with this number */
  atomic_int reason;             /* why kill_seq was set: LP_STOP_* */
} lp_interrupt;

enum { LP_STOP_DEADLINE = 1, LP_STOP_SIGNAL = 2 };

static inline int luapool__interrupted(const lp_interrupt *i) {
  return i != NULL && (atomic_load_explicit(&i->closing, memory_order_relaxed) ||
                       atomic_load_explicit(&i->kill_seq, memory_order_relaxed) ==
                           atomic_load_explicit(&i->seq, memory_order_relaxed));
}

/* A kernel whose wait was cut by the task's deadline marks its task as
** stopped by it, so the worker reports the timeout whatever the clocks
** say.  (The block is the worker's, never really const.) */
static inline void luapool__stop_self(const lp_interrupt *i) {
  lp_interrupt *w = (lp_interrupt *)i;
  if (w == NULL) return;
  atomic_store(&w->reason, LP_STOP_DEADLINE);
  atomic_store(&w->kill_seq, atomic_load(&w->seq));
}

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

/* {====== int128: exact integers (kernels/squares.c) */
#define LUAPOOL_INT128_MT "luapool.int128"
void luapool__int128_push(lua_State *L, lp_int128 v);
/* Non-zero and *v set when the value at idx is a luapool.int128. */
int luapool__int128_test(lua_State *L, int idx, lp_int128 *v);
/* Decimal text of v into buf (at least 41 bytes); returns its length. */
size_t luapool__int128_format(lp_int128 v, char *buf);
/* Registers the metatable and pushes the constructor function. */
void luapool__int128_open(lua_State *L);
/* }====== */

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
/* The interrupt block and task deadline of the worker whose Lua state L
** is (NULL and 0 in a main state), so kernels called from Lua inside a
** task stop like native ones (luapool.c). */
const lp_interrupt *luapool__lua_interrupt(lua_State *L, double *deadline);
/* luapool.now(): the clock deadlines are measured on (luapool.c). */
double luapool__now(void);
/* libcurl's version ("7.88.1"), loading it; "?" when it cannot be loaded. */
const char *luapool__curl_version(void);
/* Frees the calling thread's easy handle (worker exit, module close). */
void luapool__http_thread_cleanup(void);
/* }====== */

#endif
