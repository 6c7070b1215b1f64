/*
** luapool internal interfaces: buffer, codec, future, pool, worker.
**
** Ownership in one paragraph: a task message (the encoded function and its
** arguments) and its reply (the encoded results or error) are plain bytes
** owned by the future that carries them, so any backend - a thread with its
** own lua_State, a process behind a socket - moves them without knowing what
** they hold.  Only the owner's Lua state ever decodes a reply.
*/
#ifndef LUAPOOL_H
#define LUAPOOL_H

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <lua.h>

#include "buf.h"
#include "ctrlc.h"
#include "int128.h"
#include "kernels/kernel.h"
#include "stop.h"
#include "util.h"
#include "wstate.h"

#define LUAPOOL_POOL_MT   "luapool.pool"
#define LUAPOOL_FUTURE_MT "luapool.future"
#define LUAPOOL_ERROR_MT  "luapool.error"

/* {====== codec (codec.c) */
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
} lp_encode_ctx;

/* An empty scratch buffer that lives in a userdata, pushed on the stack:
** a Lua error raised while it holds bytes cannot leak them.  The caller
** owns it until luapool__scratch_release(L, idx of that userdata), which
** keeps it for the next caller and never raises; a caller nested
** meanwhile (a __gc that submits) gets a buffer of its own, and so does
** the next caller after an error that skipped the release (the skipped
** one is collected). */
lp_buf *luapool__scratch(lua_State *L);
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
/* The same for a task message in a worker: a function sent before (same
** id) is the closure loaded then, with this message's upvalues. */
void luapool__decode_task(lua_State *L, lp_reader *r, int n);
/* luapool.codec.encode/decode: for tests, fuzzing and benchmarks. */
int luapool__codec_encode(lua_State *L);
int luapool__codec_decode(lua_State *L);
/* luapool.codec.cache(): {key = "prototype" or "closure", prototypes and
** bytes = what this state's dump cache holds, limit and byte_limit = its
** bounds}, for tests. */
int luapool__codec_cache(lua_State *L);
/* }====== */

/* {====== the wire handshake (wire.c) */
/* Appends this build's handshake to b (0, or -1: no memory). */
int luapool__wire_hello(lp_buf *b);
/* 0 when the handshake p[0..len) is this build's; else -1.  Either way
** peer describes what it says ("luapool 0.1.0 (wire 1, Lua 5.4.4, ...)"). */
int luapool__wire_check(const char *p, size_t len, char *peer, size_t peersz);
/* This build, described the same way. */
void luapool__wire_describe(char *buf, size_t n);
/* }====== */

/* {====== futures (future.c) */
typedef enum {
  LP_PENDING,
  LP_RUNNING,
  LP_FINISHED, /* has a reply (values and/or task errors) */
  LP_FAILED,   /* failed outside the task: crashed, broken, transfer... */
  LP_CANCELLED
} lp_fstate;

/* Error kinds (the `kind` field of error objects). */
typedef enum {
  LP_EK_TASK,
  LP_EK_TIMEOUT,
  LP_EK_CANCELLED,
  LP_EK_CRASHED,
  LP_EK_BROKEN,
  LP_EK_TRANSFER,
  LP_EK_INTERRUPTED
} lp_ekind;

typedef struct lp_wnode lp_wnode;
struct lp_pool;

/* The script's package.path and package.cpath as a task saw them when it
** was submitted: shared (reference counted) by the futures submitted while
** they stayed the same; a worker applies them to its Lua state before it
** runs a task whose paths differ from the ones it has (gen tells). */
typedef struct lp_paths {
  atomic_int refs;
  uint64_t gen;
  const char *path, *cpath; /* into data */
  char data[];
} lp_paths;

lp_paths *luapool__paths_new(const char *path, size_t pl, const char *cpath, size_t cl,
                             uint64_t gen); /* NULL: no memory */
void luapool__paths_ref(lp_paths *ps);
void luapool__paths_unref(lp_paths *ps); /* (NULL: nothing) */

/* One per task; a million outstanding futures cost what this struct
** costs, so it is kept small (docs/performance.md has the numbers):
** no lock of its own (futures share a small table of striped locks in
** future.c), the worker's name by pointer, and one buffer of LP_INLINE
** bytes that holds a small message until the task has run, then a small
** reply.  sizeof is 152: a 160-byte malloc chunk on glibc.  What the
** owner reads for a result (state, pool, reply, the inline bytes) comes
** first, in one cache line: reading a million results in a row costs one
** cache miss per future here, not three. */
#define LP_INLINE 24

typedef struct lp_future {
  atomic_int refs;
  unsigned char state;  /* lp_fstate (lock: the future's stripe) */
  unsigned char ekind;  /* lp_ekind, LP_FAILED */
  int ncalls;           /* calls batched in msg (map chunks) */
  int nwaiters;         /* threads blocked in luapool__future_wait */
  struct lp_pool *pool; /* whose call counters its transitions move */
  /* The outcome: LP_FINISHED has the encoded reply (in inline_buf when
  ** small), LP_FAILED an error message (malloc; NULL on no memory). */
  union {
    char *reply;
    char *emsg;
  };
  size_t replylen;
  char inline_buf[LP_INLINE]; /* the message, then the reply */
  /* The task: message bytes (in inline_buf when small), dropped (msg
  ** NULL) once the task has run or will never run. */
  char *msg;
  size_t msglen;
  struct lp_future *next;   /* pool queue link (mutex: the pool's) */
  struct lp_future *cbnext; /* pool callback queue link (mutex: p->cbmu) */
  /* The worker that ran it: the name in its lp_worker, which lives as
  ** long as the pool, and the future's userdata keeps its pool alive.
  ** NULL when it never started. */
  const char *worker;
  lp_wnode *wnodes;       /* completion queues waiting for it (lock: stripe) */
  struct lp_pool *notify; /* has done callbacks: tell this pool (lock: stripe) */
  double timeout;         /* task deadline in seconds from its start; 0: none */
  /* What crash and deadline reports call it (luapool__future_label):
  ** "task #N" for the N-th submit, else "item #lo" / "items #lo-#hi". */
  uint64_t task_no;
  int64_t item_lo; /* (the last item is item_lo + ncalls - 1) */
  lp_paths *paths; /* the script's paths at submit (a reference) */
} lp_future;

/* A pending future holding the task message in b (b is emptied). */
lp_future *luapool__future_new(lp_buf *b, int ncalls);
/* The future's name in messages ("task #12", "items #51-#60"), in buf. */
const char *luapool__future_label(const lp_future *f, char *buf, size_t size);
void luapool__future_ref(lp_future *f);
void luapool__future_unref(lp_future *f);
/* PENDING -> RUNNING; 0 if it was cancelled meanwhile.  worker is the
** name in the lp_worker that runs it (kept by pointer: see worker). */
int luapool__future_start(lp_future *f, const char *worker);
/* Finishes f with a reply, once its message has been consumed (a small
** reply takes the message's place): takes `reply` (malloc'd) when copy is
** 0, else copies the bytes; a reply of at most LP_INLINE bytes is copied
** into the future itself (and a taken one freed). */
void luapool__future_finish(lp_future *f, char *reply, size_t len, int copy);
int luapool__future_fail(lp_future *f, lp_ekind k, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Calls whose reply is an error (the reply's header count). */
uint32_t luapool__future_nerr(lp_future *f);
/* Does the reply carry values sent by name (or functions)?  Only those can
** fail to decode in the owner (the header's LP_REPLY_NAMED bit). */
int luapool__future_flagged(lp_future *f);
#define LP_REPLY_NAMED 0x80000000u

/* Completion queue: futures come out in the order they finish (future.c;
** lfuture.c has its Lua face).  luapool.as_completed, wait and unordered
** imap are built on it. */
typedef struct lp_cq lp_cq;
struct lp_wnode {
  lp_future *f; /* holds a reference */
  lp_cq *q;
  int id;          /* the Lua-side slot of the future in its queue */
  int fired;       /* lock: f's stripe */
  lp_wnode *fnext; /* in f->wnodes (lock: f's stripe) */
  lp_wnode *qnext; /* in q's fired list (mutex: q->mu) */
  /* In q's list of nodes not yet popped (owner only): popping unlinks
  ** and frees a node, so the queue holds only what it has not handed out. */
  lp_wnode *anext, *aprev;
};

struct lp_cq {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  lp_wnode *head, *tail; /* fired, not yet popped (mutex: mu) */
  lp_wnode *all;         /* every node not yet popped (owner only) */
  int waiting;           /* registered, not yet popped (owner only) */
};
/* A queue with no node (NULL: no memory). */
lp_cq *luapool__cq_alloc(void);
/* Detaches every node not yet popped from its future, then frees the
** queue and its nodes (each node's reference goes). */
void luapool__cq_free(lp_cq *q);
/* Registers node n (n->f, n->q set; owner only): fired now when n->f is
** done, else when it settles. */
void luapool__cq_watch(lp_wnode *n);
/* Takes the next fired node into *out, waiting up to timeout seconds from
** start (timeout < 0: forever).  1 a node, 0 timed out (*out NULL), -1 a
** signal is pending for this thread (the caller raises it, then may wait
** again), -2 the thread task this wait runs in was stopped. */
int luapool__cq_wait(lp_cq *q, double timeout, double start, lp_wnode **out);

/* What the pool layer hears of a future's transitions (stripe locked; set
** once by the first pool, luapool__future_set_hooks): the future core
** knows nothing of pools. */
typedef struct lp_future_hooks {
  /* f, of pool p, went from -> to: move p's call counters. */
  void (*count)(struct lp_pool *p, lp_future *f, lp_fstate from, lp_fstate to);
  /* f, whose done callbacks p holds, settled. */
  void (*notify)(struct lp_pool *p, lp_future *f);
} lp_future_hooks;
void luapool__future_set_hooks(const lp_future_hooks *h);
/* Done callbacks: returns whether f is done; when it is not, p (non-NULL)
** will be told when it settles.  *notified: p was already to be told. */
int luapool__future_notify_on(lp_future *f, struct lp_pool *p, int *notified);
/* Both return 1 when this call made the transition (from PENDING, or for
** fail also RUNNING), 0 when the future had already left that state. */
int luapool__future_cancel(lp_future *f);
/* Waits until done; timeout < 0 waits forever.  1 done, 0 timed out, -1
** a signal is pending (see luapool__check_signal), -2 the thread task
** this wait runs in was stopped (its deadline passed, its pool stops). */
int luapool__future_wait(lp_future *f, double timeout);
lp_fstate luapool__future_state(lp_future *f);

/* Lua side (lfuture.c). */
void luapool__cq_open(lua_State *L);
int luapool__cq_new(lua_State *L); /* Lua: prims.cq() */
/* Pushes a userdata for f (which may be NULL, filled later by _set: the
** userdata is created before the C future so that its allocation, which
** may raise, happens while nothing needs freeing). */
void luapool__future_push(lua_State *L, lp_future *f, int pool_idx);
void luapool__future_set(lua_State *L, int idx, lp_future *f);
/* Pushes the pool userdata of the future userdata at idx. */
void luapool__future_push_pool(lua_State *L, int idx);
lp_future *luapool__check_future(lua_State *L, int idx);
int luapool__is_future(lua_State *L, int idx); /* a future's userdata? */
/* Pushes the values (at most maxvals, -1: all) of the next call of a done
** future's reply and returns their count; on an error outcome pushes the
** error object and returns -1.  r walks the reply call by call (set r->p
** to NULL before the first call); NULL means the first call. */
int luapool__future_outcome(lua_State *L, lp_future *f, lp_reader *r, int maxvals);
void luapool__future_open(lua_State *L);
/* }====== */

/* {====== errors (luapool.c) */
/* Pushes an error object {kind, message, traceback, worker, value}; value
** at value_idx (0: none). */
void luapool__push_error(lua_State *L, lp_ekind kind, const char *message, const char *traceback,
                         const char *worker, int value_idx);
const char *luapool__ekind_name(lp_ekind k);
/* }====== */

/* {====== worker side: running a task message (worker.c) */
/* Task message kinds (worker.c describes the format). */
enum { LP_MSG_SINGLE = 1, LP_MSG_BATCH = 2 };

/* Runs every call of msg, appending the reply to out.  Returns 0, or -1 when
** out of memory (the caller fails the future). */
int luapool__run_message(lp_wstate *ws, const char *msg, size_t len, lp_buf *out);
/* Reply status byte per call. */
enum { LP_REPLY_OK = 0, LP_REPLY_ERROR = 1, LP_REPLY_TRANSFER = 2, LP_REPLY_TIMEOUT = 3 };
/* }====== */

/* {====== pools (executor.c, threadpool.c, processpool.c) */
typedef struct lp_pool lp_pool;
typedef struct lp_worker lp_worker;

typedef struct lp_backend {
  const char *kind; /* "threadpool" / "processpool" */
  size_t worker_size;
  int watchdog; /* deadlines need the pool's watchdog thread (threads) */
  /* Called by the owner before the worker's thread exists (NULL: none). */
  void (*worker_init)(lp_worker *w);
  /* Called on the worker's own thread. */
  int (*worker_start)(lp_worker *w);
  void (*run)(lp_worker *w, lp_future *f);
  void (*worker_stop)(lp_worker *w);
  /* Stops a running task now; it only sends a signal or a kill, so it may
  ** be called with the pool's lock held (pool_interrupt, the watchdog) or
  ** without (pool_stop). */
  void (*interrupt)(lp_worker *w);
  /* A call costs a round trip worth batching: map chunks items by itself
  ** (the Lua layer reads it as pool.chunking). */
  int chunking;
} lp_backend;

struct lp_worker {
  lp_pool *pool;
  int index; /* 1-based */
  pthread_t thread;
  lp_interrupt intr;
  /* The running task's deadline, for the watchdog (mutex: pool's mu). */
  double deadline;
  uint64_t deadline_seq;
  int joined;      /* owner only */
  atomic_int busy; /* running a task */
  char name[64];
};

struct lp_pool {
  const lp_backend *be;
  pthread_mutex_t mu; /* guards everything below */
  pthread_cond_t cv;  /* workers wait here for tasks */
  lp_future *head, *tail;
  size_t npending;
  int max_workers, nworkers, idle;
  int nalive;          /* worker threads that have not exited yet */
  int closing;         /* no more submits; workers leave when idle */
  int drain;           /* shut down with wait = false: the work still runs, and
                       ** collecting the pool (or the program's end) waits */
  lp_worker **workers; /* [max_workers] */
  char name[48];
  lp_paths *paths; /* package.path/cpath as last submitted (owner only) */
  /* Calls (a map chunk counts its items) by where they are; atomics, as
  ** workers update them outside the lock. */
  atomic_size_t c_pending, c_running, c_done, c_failed, c_cancelled;
  /* Finished futures whose done callbacks the owner has yet to run. */
  pthread_mutex_t cbmu;
  lp_future *cbhead; /* mutex: cbmu; each holds a reference */
  atomic_int ncb;    /* non-zero when cbhead may be non-empty */
  /* Options (see README): deadlines, and for processes crash policy,
  ** recycling and memory cap. */
  double task_timeout;
  int on_crash_break, max_tasks_per_child, max_memory_mb;
  uint64_t nsubmitted; /* owner only: numbers tasks for crash reports */
  /* The deadline watchdog (thread pools), started with the first task
  ** that has a deadline. */
  pthread_t wd;
  int wd_started, wd_stop;
  pthread_cond_t wdcv;
  struct lp_pool *prev_live, *next_live; /* all live pools (Ctrl-C) */
  char *init_msg;                        /* initializer + initargs as a task message */
  size_t init_len;
  char *broken; /* set once an initializer failed: why */
};

/* Marks the pool broken (first reason wins) and fails every queued future
** with kind "broken".  Called by a backend, with no pool lock held. */
void luapool__pool_break(lp_pool *p, const char *why);
/* Runs the pool's initializer reply check: 0 when reply (of the init
** message) succeeded, else -1 with the error text in msg. */
int luapool__reply_failed(const char *reply, size_t len, char *msg, size_t sz);

/* Runs the done callbacks of pool p's finished futures (owner only). */
void luapool__pool_poll(lua_State *L, int pool_idx);
/* Cheap test first: is a callback owed at all? (p may be NULL) */
#define luapool__pool_owes(p) ((p) && atomic_load_explicit(&(p)->ncb, memory_order_acquire))
/* Remembers the future at fidx in the pool at pool_idx until its
** callbacks have run (so the userdata outlives the script's last use). */
void luapool__pool_watch(lua_State *L, int pool_idx, int fidx);
/* Callbacks of the future userdata at fidx (future.c). */
void luapool__future_run_callbacks(lua_State *L, int fidx);
void luapool__run_callback(lua_State *L, int cb, int fidx);

/* Owner-side pool API (executor.c). */
lp_pool *luapool__check_pool(lua_State *L, int idx);
lp_pool *luapool__to_pool(lua_State *L, int idx); /* NULL when closed */
int luapool__pool_new(lua_State *L, const lp_backend *be);
void luapool__pool_open(lua_State *L);
/* Pushes the table of primitives the Lua layer is built on. */
void luapool__push_prims(lua_State *L);
extern const lp_backend luapool__thread_backend;
extern const lp_backend luapool__process_backend;

/* Process worker entry point (processpool.c): serve tasks on fd. */
int luapool__process_worker_main(int fd, const char *name, int index);
/* Path of an executable that can run `--worker` (processpool.c):
** $LUAPOOL_WORKER_EXE, else the host binary, else the luapool binary beside
** luapool.so, else the installed one. */
const char *luapool__worker_exe(void);
extern char *luapool__host_exe; /* set by the host binary (main.c) */
/* Stops the work of every live pool (Ctrl-C). */
void luapool__interrupt_all(void);
/* }====== */

/* {====== module (luapool.c) */
int luaopen_luapool(lua_State *L);
/* Opens luapool into L as a global (with threadpool, processpool and a
** line-atomic print) and records which worker L is; kind NULL: the host. */
void luapool__open_worker_state(lua_State *L, const char *kind, const char *name, int index);
/* }====== */

#endif
