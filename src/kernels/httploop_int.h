/*
** The HTTP loop's private types, shared by httploop.c (the loop, admission,
** retries, the libcurl transport) and hnative.c (the native HTTP/1.1
** transport).  Not part of the loop's contract (httploop.h).
*/
#ifndef LUAPOOL_HTTPLOOP_INT_H
#define LUAPOOL_HTTPLOOP_INT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "kernels/httploop.h"
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
  char key[];              /* "host:port", lower case; "" when unparsable */
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
  int fd, state, reused, keep, any, ps, hdr_done, status, http10, nodelay;
  double last_io;
  char *out; /* the unsent rest of the request head (NULL: none) */
  size_t out_len, out_off, body_off;
  uint64_t left;     /* Content-Length or chunk bytes left */
  int64_t size;      /* Content-Length (-1: unknown), for the timeout message */
  size_t line_start; /* in r->hdr: the header line being received */
  size_t scan;       /* in r->hdr: bytes already scanned for a line end */
  int digits, trailer_len;
} hconn;

struct lp_hloop {
  hshard shards[MAX_SHARDS];
  int nshards;
  int ep, ev;
  atomic_int woken;
  int per_host, max_conn, closing;
  size_t in_flight, owned;
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

#endif
