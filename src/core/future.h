/*
** Futures, the C side (future.c): a thread-safe state machine with its
** reply bytes, and completion queues.  No Lua and no pool: what a pool
** hears of a transition goes through hooks it sets (lp_future_hooks).
**
** Ownership in one paragraph: a task message (the encoded function and its
** arguments) and its reply (the encoded results or error) are plain bytes
** owned by the future that carries them, so any engine - a thread with its
** own lua_State, a process behind a socket - moves them without knowing what
** they hold.  Only the owner's Lua state ever decodes a reply.  (One
** exception to "plain bytes": a thread worker's reply may refer to big
** strings of the worker's state instead of carrying them; see "pinned
** strings" below.)
*/
#ifndef LUAPOOL_FUTURE_H
#define LUAPOOL_FUTURE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "base/buf.h"
#include "codec/message.h"

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
  unsigned char state; /* lp_fstate (lock: the future's stripe) */
  /* LP_FAILED: its lp_ekind; LP_FINISHED: LP_RF_* bits (the reply's) */
  unsigned char ekind;
  /* The owner's own bits (its Lua face's: bind/lfuture.c), in what was
  ** padding; the future core never reads or writes them. */
  unsigned char owner_bits;
  /* An engine sent the task to a worker ahead of its start (PENDING, out
  ** of the queue): its slot there, 1-based (0: none; lock: stripe).  A
  ** cancel asks the engine (hooks.cancel_held) whether it can still win. */
  unsigned char held;
  int ncalls;           /* calls batched in msg (map chunks) */
  int nwaiters;         /* threads blocked in luapool__future_wait */
  struct lp_pool *pool; /* whose call counters its transitions move */
  /* The outcome: LP_FINISHED has the encoded reply (in inline_buf when
  ** small), LP_FAILED an error message (malloc; NULL on no memory). */
  union {
    char *reply;
    char *emsg;
  };
  union {
    size_t replylen; /* LP_FINISHED */
    /* LP_FAILED as a whole by one of its calls (a process worker killed
    ** at that call's deadline): the call, from 1; 0 none.  Set with the
    ** state (luapool__future_fail_call), read once it is seen settled.
    ** (In replylen's place: a failure has no reply, and the struct keeps
    ** its size class.) */
    size_t fail_call;
  };
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
/* Marks f held by an engine in slot `held` (1-based; 0 clears it): 1 when
** f is PENDING, 0 when it is not (cancelled meanwhile: nothing set, except
** that a clear always clears). */
int luapool__future_hold(lp_future *f, unsigned char held);
/* PENDING -> RUNNING (clears held); 0 if it was cancelled meanwhile.  worker is the
** name in the lp_worker that runs it (kept by pointer: see worker). */
int luapool__future_start(lp_future *f, const char *worker);
/* Finishes f with a reply, once its message has been consumed (a small
** reply takes the message's place): takes `reply` (malloc'd) when copy is
** 0, else copies the bytes; a reply of at most LP_INLINE bytes is copied
** into the future itself (and a taken one freed). */
void luapool__future_finish(lp_future *f, char *reply, size_t len, int copy);

/* {====== pinned strings: thread replies that refer to a string
** A thread worker's reply refers to a big string of its Lua state (its
** bytes stay where they are) instead of carrying a copy: the owner's
** decoder copies it once, straight from the worker's string.  The
** worker (worker.c) anchors the string in its state while an lp_pinned
** says a reply holds it.  refs counts the replies holding it plus one
** while the worker's state is open: the worker sweeps (unanchors and
** frees) the ones only it holds before each task; when its state closes
** while replies still hold some, the state keeps those strings' memory
** (block) and drops its reference: the last reply to go frees them.  So
** the owner may read a result after the pool closed, and nothing it does
** touches the worker's Lua state.  Only the thread engine makes such a
** reply, and only the owner's process reads it (the pointer means
** nothing elsewhere): the future's LP_RF_PINNED bit, set by
** luapool__future_finish_pinned, never by the reply's bytes, is what
** lets the decoder take the pointers (lfuture.c). */
/* The owner's reads of one pool's pinned replies, which its pacing
** workers watch (below): in the pool, so that reading one pool's results
** does not hold back the workers of another. */
typedef struct lp_pace_reads {
  atomic_uint_fast64_t n;
  _Atomic double last; /* the last one's time (luapool__now); 0 before the first */
} lp_pace_reads;

typedef struct lp_pinned {
  atomic_int refs;
  atomic_int unread; /* replies holding it that the owner has not read */
  const char *s;     /* the string's bytes (len of them) */
  size_t len;
  void *block;            /* the string's memory, once its state closed */
  int big;                /* block is a big block (base/alloc.h), else malloc's */
  struct lp_pinned *next; /* in the worker's list (its thread only) */
  lp_pace_reads *reads;   /* its pool's: a read of a reply holding it counts there */
} lp_pinned;
/* One pin in a reply's list, as its bytes hold it (unaligned: memcpy). */
typedef struct lp_pinref {
  lp_pinned *p;
} lp_pinref;
/* Drops a reference; the last one frees p (and its block). */
void luapool__pinned_unref(lp_pinned *p);
#define LP_RF_PINNED 1u
/* The owner has read the reply (luapool__future_mark_read). */
#define LP_RF_READ 2u
/* luapool__future_finish for a reply whose last bytes list its pins
** (each an lp_pinref, then their count as a u64): f takes their
** references, and drops them when it is freed (or at once when it
** does not keep the reply). */
void luapool__future_finish_pinned(lp_future *f, char *reply, size_t len, int copy);
/* Drops the references of the pins listed at the end of reply[0..len)
** (and their unread marks when `unread`: a reply never read). */
void luapool__pins_release(const char *reply, size_t len, int unread);
/* Does f's reply refer to pinned strings (so may its decoder read them)? */
int luapool__future_pinned(const lp_future *f);
/* The owner has read f's reply (the first time counts): its pinned
** strings no longer count as unread for their worker's pacing (below).
** A no-op for any other future.  Owner only. */
void luapool__future_mark_read(lp_future *f);

/* Pacing: a thread worker whose big results the owner has not read yet
** waits before its next task while the owner is reading others, rather
** than run so far ahead that each copy comes from memory no cache holds
** (docs/performance.md, "big strings"; threadpool.c decides when).
** A mark is what the worker saw; the wait ends at a read after it (of
** a pinned reply of the worker's pool, counted in r), at the owner's next
** blocking wait on a future (it reads nothing then, whichever pool it
** waits on), or at the deadline: 1 a read, 0 otherwise. */
typedef struct lp_pace_mark {
  uint_fast64_t reads, blocks;
} lp_pace_mark;
void luapool__pace_mark(const lp_pace_reads *r, lp_pace_mark *m);
/* The time of the owner's last read counted in r (luapool__now), 0
** before the first. */
double luapool__pace_last(const lp_pace_reads *r);
int luapool__pace_wait(const lp_pace_reads *r, const lp_pace_mark *m, double deadline);
/* A pool stops: the pacers go on at once (nothing will be read). */
void luapool__pace_kick(void);
/* }====== */
int luapool__future_fail(lp_future *f, lp_ekind k, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same, naming call `call` (from 1) of a chunk as the one that failed
** it: map's err.item (bind/lpool.c's chunk_into). */
int luapool__future_fail_call(lp_future *f, int call, lp_ekind k, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Calls whose reply is an error (the reply's header count). */
uint32_t luapool__future_nerr(lp_future *f);
/* Does the reply carry values sent by name (or functions)?  Only those can
** fail to decode in the owner (the header's LP_REPLY_NAMED bit). */
int luapool__future_flagged(lp_future *f);

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
  /* f:cancel() found f running: p's engine may stop it (no lock held);
  ** 1 when f is cancelled now (luapool__future_cancel_running). */
  int (*cancel_running)(struct lp_pool *p, lp_future *f);
  /* f:cancel() found f PENDING and held (stripe locked, so only atomics):
  ** 1 when its worker will never start it (f is cancelled), 0 started. */
  int (*cancel_held)(struct lp_pool *p, lp_future *f);
} lp_future_hooks;
void luapool__future_set_hooks(const lp_future_hooks *h);
/* Done callbacks: returns whether f is done; when it is not, p (non-NULL)
** will be told when it settles.  *notified: p was already to be told. */
int luapool__future_notify_on(lp_future *f, struct lp_pool *p, int *notified);
/* Both return 1 when this call made the transition (from PENDING, or for
** fail also RUNNING), 0 when the future had already left that state.
** cancel on a running future asks its pool's engine (an event loop can
** abort a transfer; a thread cannot stop a task midway), no lock held. */
int luapool__future_cancel(lp_future *f);
/* For an engine: a running f it is stopping ends cancelled (1), unless it
** had settled already (0).  Its message stays until the future is freed:
** the engine's thread may still be reading it. */
int luapool__future_cancel_running(lp_future *f);
/* Waits until done; timeout < 0 waits forever.  1 done, 0 timed out, -1
** a signal is pending (see luapool__check_signal), -2 the thread task
** this wait runs in was stopped (its deadline passed, its pool stops). */
int luapool__future_wait(lp_future *f, double timeout);
lp_fstate luapool__future_state(lp_future *f);

#endif
