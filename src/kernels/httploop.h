/*
** An HTTP event loop: many libcurl transfers driven by one OS thread, with
** admission control (per host:port and total), keep-alive reuse, retries
** with backoff as timers, and results kept in C.  No Lua here: the blocking
** luapool.http.request / http.get / fetch_length run one request at a time
** on a private loop of their thread (kernels/http.c), and the iopool engine
** runs thousands on each of its loop threads.
**
** Threads: a loop belongs to the thread that created it.  Every function
** below is for that thread only, except luapool__hloop_wakeup (any thread)
** and luapool__hreq_new / luapool__hreq_free / the result accessors (any
** thread, on a request the loop does not own).
**
** Ownership: luapool__hreq_new returns a request the caller owns.
** luapool__hloop_add hands it to the loop, which owns it until its done
** callback returns; the loop never touches it after that.  The callback's
** owner then reads the results and frees it with luapool__hreq_free (in the
** callback or later, on any thread).
**
** The callback runs on the loop thread, exactly once per added request:
** inside luapool__hloop_run when the request ends (answered, failed, gave
** up retrying), inside luapool__hloop_abort for an aborted request, inside
** luapool__hloop_free for everything still owned.  A callback may add new
** requests and abort others on the same loop; it must not call
** luapool__hloop_run or luapool__hloop_free.
**
** Before any of these, libcurl must be loaded: luapool__http_global_init()
** == 0 (kernels/kernel.h).
*/
#ifndef LUAPOOL_HTTPLOOP_H
#define LUAPOOL_HTTPLOOP_H

#include <stddef.h>
#include <stdint.h>

typedef struct lp_hloop lp_hloop;
typedef struct lp_hreq lp_hreq;
typedef void (*lp_hdone)(lp_hreq *r, void *ud);

typedef struct lp_hloop_limits {
  int per_host;        /* transfers (so connections) at once per host:port; 0: no limit */
  int max_connections; /* transfers (so connections) at once in the loop; 0: no limit */
} lp_hloop_limits;

/* A request as given; luapool__hreq_new copies every string. */
typedef struct lp_hreq_opts {
  const char *url;
  const char *method;         /* an HTTP token; NULL: "GET" */
  const char *const *headers; /* nheaders "Name: value" lines (checked by the caller) */
  size_t nheaders;
  const char *body; /* sent as is (NULL: no body); body_len bytes */
  size_t body_len;
  double timeout;         /* seconds for the whole request (attempts and waits); 0: none */
  double connect_timeout; /* seconds per connection; 0: 30 */
  double deadline;        /* luapool__now() time the task must end by; 0: none */
  int retries;            /* extra attempts after a retryable failure */
  double retry_delay;     /* backoff base in seconds; < 0: LP_HRETRY_DELAY */
  int retry_all;          /* retry non-idempotent methods too */
  int max_redirs;         /* redirects followed; 0: none */
  int count_only;         /* count body bytes, keep neither body nor headers */
} lp_hreq_opts;

#define LP_HRETRY_DELAY 0.1  /* seconds: first backoff, doubling each retry */
#define LP_HRETRY_MAX   30.0 /* seconds: the backoff's cap (Retry-After is not capped) */
#define LP_HMAX_REDIRS  30   /* follow = true */

/* How a request ended. */
enum {
  LP_H_PENDING = 0, /* not ended yet */
  LP_H_OK,          /* an HTTP answer (any status): status, body, headers, url */
  LP_H_FAILED,      /* transport failure: luapool__hreq_error says why */
  LP_H_ABORTED,     /* luapool__hloop_abort / _free: error is its `why` */
  LP_H_DEADLINE     /* the task's deadline (opts.deadline) ended it */
};

typedef struct lp_htimings {
  double dns, connect, tls, ttfb; /* seconds, phases of the last attempt */
  double transfer;                /* libcurl's total of the last attempt */
  double total;                   /* from luapool__hloop_add to the end */
} lp_htimings;

/* A loop for the calling thread, or NULL with a message in err (libcurl
** not loaded, out of memory or descriptors). */
lp_hloop *luapool__hloop_new(const lp_hloop_limits *lim, char *err, size_t errsz);
/* Aborts every request it owns (callbacks run, why "loop closed"), then
** frees the loop and its connections. */
void luapool__hloop_free(lp_hloop *l);

/* A request, or NULL when out of memory (or an option is invalid: a method
** that is not an HTTP token); err says which. */
lp_hreq *luapool__hreq_new(const lp_hreq_opts *o, char *err, size_t errsz);
void luapool__hreq_free(lp_hreq *r); /* NULL: nothing */

/* Hands r to the loop, which starts it when its host and the loop are
** under their limits (FIFO per host).  Never fails: a request that cannot
** start (out of memory) ends with LP_H_FAILED, its callback running in the
** next luapool__hloop_run. */
void luapool__hloop_add(lp_hloop *l, lp_hreq *r, lp_hdone done, void *ud);
/* Ends a request the loop owns now, wherever it is (queued, in flight,
** waiting to retry): its callback runs before this returns, with
** LP_H_ABORTED and why (copied) as the error. */
void luapool__hloop_abort(lp_hloop *l, lp_hreq *r, const char *why);
/* Takes r out of the loop that owns it (any state) without running its
** callback: for an owner that goes away first (a coroutine collected with
** its request in flight).  Nothing when no loop owns r. */
void luapool__hreq_forget(lp_hreq *r);
/* Runs transfers, retry timers and callbacks, waiting at most max_wait
** seconds for something to happen (0: do what is ready, never wait) or
** until luapool__hloop_wakeup.  Returns how many requests the loop still
** owns. */
size_t luapool__hloop_run(lp_hloop *l, double max_wait);
/* Any thread: makes the loop's current or next wait return at once. */
void luapool__hloop_wakeup(lp_hloop *l);
/* Requests the loop owns / has handed to libcurl right now. */
size_t luapool__hloop_owned(const lp_hloop *l);
size_t luapool__hloop_in_flight(const lp_hloop *l);

/* Results: valid once the callback has run (state != LP_H_PENDING). */
int luapool__hreq_state(const lp_hreq *r);
long luapool__hreq_status(const lp_hreq *r); /* HTTP status (LP_H_OK) */
/* The body (NULL with *len 0 when empty or count_only). */
const char *luapool__hreq_body(const lp_hreq *r, size_t *len);
/* Takes the body out: the caller frees it; the request keeps none. */
char *luapool__hreq_take_body(lp_hreq *r, size_t *len);
uint64_t luapool__hreq_length(const lp_hreq *r); /* body bytes received */
/* The last response's header lines as received ("Name: value\r\n"...,
** status line included; kept also when count_only, for Retry-After). */
const char *luapool__hreq_headers(const lp_hreq *r, size_t *len);
const char *luapool__hreq_url(const lp_hreq *r);    /* final URL, after redirects */
const char *luapool__hreq_target(const lp_hreq *r); /* the URL as requested */
const char *luapool__hreq_method(const lp_hreq *r);
int luapool__hreq_attempts(const lp_hreq *r);
void luapool__hreq_timings(const lp_hreq *r, lp_htimings *t);
/* Why it failed: "Couldn't connect to server (Failed to connect to ...)",
** "not enough memory", "out of file descriptors ... RLIMIT_NOFILE ...", an
** abort's why; "" for LP_H_OK. */
const char *luapool__hreq_error(const lp_hreq *r);
/* For LP_H_FAILED: the libcurl error code (CURLcode) of the last attempt. */
int luapool__hreq_curlcode(const lp_hreq *r);

/* {====== Lua tasks on a loop thread: http.request / http.get yield
**
** The engine, on its loop thread, calls luapool__http_set_thread_loop(l)
** (NULL to stop).  From then on, on that thread, luapool.http.request and
** luapool.http.get called from a coroutine do not block: they check their
** options (raising as usual), make the request and yield exactly two light
** userdata:
**     &luapool__http_yield_marker, the lp_hreq *
** The engine recognises the marker (lua_touserdata(co, -2) == the address),
** pops both, and hands the request to its loop: luapool__hloop_add(l, r,
** its_callback, its_task).  When the callback has run, it resumes the
** coroutine with no values (lua_resume(co, from, 0, &n)); the call then
** returns what the blocking one would (the result table, or nil and
** "METHOD URL: reason"), or raises "METHOD URL: WHY" for a request the
** engine aborted with WHY (luapool__hloop_abort), "METHOD URL: Timeout was
** reached" at opts.deadline (the task's, from luapool__lua_interrupt).
** The coroutine owns r (a userdata on its stack frees it): the engine never
** frees it.  An engine that gives up a coroutine whose request is still in
** its loop (a cancelled task) takes the request out first, so that no
** callback comes for a task that is gone: luapool__hloop_abort (its
** callback runs now: do not resume) or luapool__hreq_forget (none runs).
** (Collecting the coroutine forgets it too, but only at the next GC.)
** Where the coroutine cannot yield (lua_isyieldable false: inside a
** metamethod, a C function's callback such as table.sort's comparator, or
** outside any coroutine), the call raises
**   "luapool.http.request: cannot yield here (...); ..." (or http.get).
** luapool.kernels.fetch_length yields the same way once its Lua face
** (registry.c) routes to luapool__http_fetch_length_yield on such a thread
** (kernels_internal.h); until then it blocks there, and the engine runs it
** natively (count_only requests) when it is the task itself.
** An engine may set a maker instead of (or besides) the loop: with no
** loop set, the first call that needs one (luapool__http_thread_loop)
** calls make(ud) for it (NULL: it blocks), so a thread whose tasks make no
** request never loads libcurl. */
extern const char luapool__http_yield_marker;
void luapool__http_set_thread_loop(lp_hloop *l);
void luapool__http_set_thread_loop_maker(lp_hloop *(*make)(void *ud), void *ud);
lp_hloop *luapool__http_thread_loop(void);
/* }====== */

/* Is s an HTTP token (a method name: RFC 9110 tchar, at least one)? */
int luapool__http_token(const char *s);

#endif
