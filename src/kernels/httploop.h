/*
** An HTTP event loop: many transfers driven by one OS thread, with
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
**
** Two transports, chosen per request at luapool__hloop_add, invisible to
** the caller (the same results, headers, URLs, attempts, timings, retries
** and messages, "<curl_easy_strerror text> (<libcurl's detail>)"):
** - native HTTP/1.1 (hnative.c), for a request that has all of:
**   the URL "http://" (lower case) + a numeric IPv4 dotted quad (no
**   leading zeros) or an IPv6 literal in the form inet_ntop writes ("[::1]")
**   + an optional port other than 80 + a target starting with "/", made of
**   printable ASCII, no "#", no "/." in the path (the URLs libcurl sends and
**   reports unchanged); a body under 1 MiB (from there libcurl sends
**   Expect: 100-continue); user headers each "Name: value" with a value,
**   none of Transfer-Encoding, Expect, Connection, Proxy-Connection, TE,
**   Content-Length, Accept-Encoding; redirects followed (max_redirs > 0)
**   only for a GET or HEAD without a body (a redirect to another host:port
**   goes on in libcurl, within the same attempt); no http_proxy, all_proxy
**   or ALL_PROXY in the environment (read when the loop is made) and no
**   LUAPOOL_HTTP=curl.  Host names (localhost included: libcurl tries ::1
**   and 127.0.0.1) need a resolver: libcurl.
**   It sends what libcurl sends (Host, User-Agent, Accept, the user's
**   lines, Content-Length and Content-Type for a body), less
**   Accept-Encoding: it never decodes, so it asks for no encoding (a server
**   that compresses unasked gives the body as sent).
** - libcurl (the multi interface) for everything else: https, names,
**   proxies, other redirects.
*/
#ifndef LUAPOOL_HTTPLOOP_H
#define LUAPOOL_HTTPLOOP_H

#include <stddef.h>
#include <stdint.h>

typedef struct lp_hloop lp_hloop;
typedef struct lp_hreq lp_hreq;
typedef void (*lp_hdone)(lp_hreq *r, void *ud);

typedef struct lp_hshare lp_hshare;

typedef struct lp_hloop_limits {
  int per_host;        /* transfers (so connections) at once per host:port; 0: no limit */
  int max_connections; /* transfers (so connections) at once in the loop; 0: no limit */
  /* NULL: the limits are this loop's alone.  Else the loop counts its
  ** transfers in the share too, whose limits (not the two above) bound the
  ** transfers of all the loops made with it together. */
  lp_hshare *share;
} lp_hloop_limits;

/* Limits shared by loops of several threads (an iopool's): at most
** per_host transfers per host:port and max_connections in all (0: no
** limit), counted across the loops.  A loop that finds no slot queues the
** request (FIFO per host, as for its own limits) and is woken
** (luapool__hloop_wakeup) when any loop frees one.  Any thread; NULL when
** out of memory.  Free it after every loop made with it. */
lp_hshare *luapool__hshare_new(int per_host, int max_connections);
void luapool__hshare_free(lp_hshare *s); /* NULL: nothing */

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
/* Requests the loop owns / has in flight (libcurl's or native) right now. */
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

/* {====== private: the loop's types, for httploop.c and hnative.c only
** (each defines LUAPOOL_HTTPLOOP_PRIVATE before including this).  Here,
** not in a header of their own, because a private header including this
** one would make an include cycle. */
#ifdef LUAPOOL_HTTPLOOP_PRIVATE
#include <stdatomic.h>
#include <sys/socket.h>

#include "kernels/kernels_internal.h"

#define USER_AGENT                 "luapool/0.1"
#define DEFAULT_CONNECT_TIMEOUT_MS 30000L
#define LOW_SPEED_TIME_S           60L
#define IDLE_EASY_MAX              256 /* easy handles kept for reuse */
#define EPOLL_BATCH                256
#define MAX_SHARDS                 64   /* multi handles per loop */
#define SHARD_CAP                  256  /* transfers a shard takes before the next is used */
#define LAST_AUTH_MAX              256  /* hloop_add's remembered URL prefix */
#define LP_MSG_BATCH               1024 /* libcurl messages read before acting on them */

enum { R_NEW, R_QUEUED, R_RUNNING, R_WAITING, R_FINISHED, R_DONE };

/* One libcurl multi handle of a loop, with its own connection cache. */
typedef struct hshard {
  struct lp_hloop *l;
  CURLM *multi;
  double timer_at; /* libcurl's timer (luapool__now time); < 0: none */
  int n;           /* transfers in it */
  int idx;
} hshard;

/* The options a plain request (a GET with no body, no headers of its own)
** leaves set on its easy handle that depend on the request: a handle kept
** with them set serves the next plain request of the same shape with only
** the per-request options set again (setup_plain), not a curl_easy_reset
** and 25 options (7,700 instructions a request). */
typedef struct hshape {
  int plain;
  int max_redirs;
  long connect_ms;
} hshape;

typedef struct hhost {
  struct hhost *next;  /* hash chain */
  struct hhost *rnext; /* ready list */
  int in_ready;
  int active;              /* requests of this host in libcurl */
  int idle[MAX_SHARDS];    /* connections of this host that may sit idle, per shard's cache */
  struct lp_hreq *qh, *qt; /* FIFO of waiting requests */
  struct hconn *nidle;     /* native: idle keep-alive connections, most recent first */
  struct hshost *sh;       /* its count in the loop's share (NULL: no share) */
  struct hhost *bnext;     /* the loop's blocked list: no slot in the share */
  int in_blocked;
  char key[]; /* "host:port", lower case; "" when unparsable */
} hhost;

struct lp_hreq {
  /* the request */
  char *url, *method;
  struct curl_slist *hdrs;
  char *body;
  size_t body_len;
  int has_body, idempotent, head;
  double timeout, connect_timeout, deadline, retry_delay;
  int retries, retry_all, max_redirs, count_only;
  /* in the loop */
  lp_hloop *loop;
  lp_hdone done;
  void *ud;
  int state;
  hhost *host;
  struct lp_hreq *qnext, *qprev; /* host queue or finished list */
  struct lp_hreq *anext, *aprev; /* every request the loop owns */
  size_t heap_i;
  double wake;
  CURL *easy;
  hshard *shard;        /* while R_RUNNING */
  int slot;             /* holds a slot of the loop's share (admit) */
  double added, end_by; /* end_by: luapool__now() time of its budget; 0: none */
  int end_by_task;      /* end_by is the task's deadline */
  int capped;           /* this attempt's timeout is what is left of end_by */
  char errbuf[CURL_ERROR_SIZE];
  int oom, fd_errno;
  /* results */
  int result;
  CURLcode code;
  long status;
  char *rbody;
  size_t blen, bcap;
  uint64_t count;
  char *hdr;
  size_t hlen, hcap;
  char *eff;
  int attempts;
  lp_htimings t;
  char err[CURL_ERROR_SIZE + 256];
  /* the native transport (hnative.c) */
  int nat;            /* this request goes native (decided at luapool__hloop_add) */
  int in_heap;        /* a timer in the loop's heap (a retry wait or a native attempt's) */
  struct hconn *conn; /* the native connection of the attempt running */
  struct sockaddr_storage addr;
  socklen_t alen;
  unsigned short port;
  const char *path; /* the request target, in url */
  const char *auth; /* the authority (Host's value), in url */
  size_t auth_len;
  double t_start, t_conn, t_first, t_limit; /* t_limit: the attempt's end (0: none) */
  char *hop_url; /* a redirect's target, followed natively or by libcurl (handoff) */
  int hops;      /* redirects followed in this attempt */
  int handoff;   /* this attempt goes on in libcurl at hop_url (a redirect native cannot take) */
};

/* A native connection (hnative.c). */
typedef struct hconn {
  struct hconn *next, *prev; /* its host's idle list */
  hhost *host;
  lp_hreq *r; /* the request on it; NULL when idle */
  int fd, state, reused, keep, any, ps, status, http10, nodelay;
  double last_io;  /* the last byte sent or received: an idle one's age */
  double ls_mark;  /* the low-speed window's start (libcurl's: < 1 byte/s for 60 s) */
  uint64_t ls_got; /* bytes received since ls_mark */
  size_t hbytes;   /* header bytes of this answer: its 1xx blocks, its block, its trailers */
  char *out;       /* the unsent rest of the request head (NULL: none) */
  size_t out_len, out_off, body_off;
  uint64_t left;     /* Content-Length or chunk bytes left */
  int64_t size;      /* Content-Length (-1: unknown), for the timeout message */
  size_t line_start; /* in r->hdr: the header line being received */
  int digits, trailer_len;
} hconn;

struct lp_hloop {
  hshard shards[MAX_SHARDS];
  int nshards;
  int ep, ev;
  atomic_int woken;
  int per_host, max_conn, closing;
  size_t in_flight, owned;
  /* the share of the limits (NULL: none).  blocked: hosts with requests
  ** queued that found no slot in it, retried when unblock is set (by the
  ** loop that freed one: any thread).  swnext, swaiting: its place in the
  ** share's list of loops to wake, under the share's mutex. */
  struct lp_hshare *share;
  hhost *blocked;
  atomic_int unblock;
  struct lp_hloop *swnext;
  int swaiting;
  hhost **buckets;
  size_t nbuckets, nhosts;
  hhost *ready_h, *ready_t;
  lp_hreq **heap;
  size_t nheap, heapcap;
  lp_hreq *all;
  lp_hreq *fin_h, *fin_t;
  CURL *idle[IDLE_EASY_MAX];
  hshape idle_shape[IDLE_EASY_MAX]; /* what each still has set (plain 0: reset) */
  int nidle;
  unsigned char *fdreg; /* epoll's state of each descriptor (on_socket) */
  size_t nfd;
  lp_hreq *msg_req[LP_MSG_BATCH]; /* read_messages' batch */
  CURLcode msg_code[LP_MSG_BATCH];
  uint64_t rng;
  /* the last request's "scheme://authority" and its host (hloop_add) */
  char last_auth[LAST_AUTH_MAX];
  size_t last_len;
  hhost *last_host;
  /* the native transport (hnative.c) */
  int nat_off;   /* LUAPOOL_HTTP=curl or a proxy variable: libcurl for all */
  hconn **conns; /* by descriptor */
  size_t nconns;
  size_t nidle_conn; /* idle native connections */
  char *wbuf;        /* a request head being written */
  size_t wcap;
  char rbuf[16384]; /* what a read brings, parsed at once */
};

/* The epoll tag of a native connection's descriptor (data.u64 >> 32). */
#define NATIVE_TAG 0xffffffffu

/* httploop.c, for hnative.c */
int luapool__hl_append(char **buf, size_t *len, size_t *cap, const char *p, size_t n, size_t first);
int luapool__hl_heap_push(lp_hloop *l, lp_hreq *r);
void luapool__hl_heap_remove(lp_hloop *l, lp_hreq *r);
/* The attempt on r ended with code (CURLE_OK: r->status and the rest are
** set; else r->errbuf says why): its slot is freed, then the result or a
** retry, as for a libcurl transfer. */
void luapool__hl_attempt_end(lp_hloop *l, lp_hreq *r, CURLcode code);
/* The native attempt on r goes on in libcurl, at r->hop_url with the
** redirects left: r's connection released, its slot kept. */
void luapool__hl_handoff(lp_hloop *l, lp_hreq *r);
/* Closes a connection's socket fd; once the loop is closing, with a reset
** (see httploop.c). */
int luapool__hl_close_fd(const lp_hloop *l, int fd);

/* hnative.c, for httploop.c */
void luapool__hn_init(lp_hloop *l);
/* Whether r can go native (sets its target fields); at luapool__hloop_add. */
int luapool__hn_eligible(lp_hloop *l, lp_hreq *r);
/* Starts an attempt (counted, running) with timeout_ms (0: none). */
void luapool__hn_start(lp_hloop *l, lp_hreq *r, long timeout_ms);
void luapool__hn_event(lp_hloop *l, int fd, uint32_t events);
void luapool__hn_timer(lp_hloop *l, lp_hreq *r);
/* The attempt leaves its connection: kept idle when it can serve another. */
void luapool__hn_detach(lp_hloop *l, lp_hreq *r);
void luapool__hn_free(lp_hloop *l);
/* Out of descriptors: closes the least recently used idle native
** connection; 1 if there was one. */
int luapool__hn_evict_idle(lp_hloop *l);
#endif
/* }====== */

#endif
