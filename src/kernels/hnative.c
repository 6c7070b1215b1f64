/*
** The native HTTP/1.1 transport of the HTTP loop (see httploop.h for the
** scope: which requests take it, and what differs from libcurl).
**
** Why: libcurl costs ~25 us of CPU and tens of KB per transfer (an easy
** handle, a connection with its buffers, a multi handle's bookkeeping);
** this path costs a socket, a ~150-byte connection and the request itself.
** It runs in the loop's epoll set (data.u64 tagged NATIVE_TAG, the
** descriptor in the low half, l->conns maps it to its connection) and uses
** the loop's timer heap for its timeouts, so the loop's wake-up, admission,
** retries and callbacks are the ones libcurl transfers have.
**
** A connection: connect (nonblocking) -> send the request (writev of the
** head and the body) -> receive (the header block appended to r->hdr as it
** comes, the body to r->rbody or only counted) -> idle on its host's list
** (LIFO) while keep-alive allows, watched for input: the server closing it
** (or anything else arriving) closes it.  A request on a reused connection
** that fails before any response byte (the server closed it meanwhile) is
** sent again on a fresh connection, once, not counted as an attempt, as
** libcurl does.
**
** Errors are libcurl 7.88's: the same CURLcode and the same detail text in
** r->errbuf, so messages read "<curl_easy_strerror> (<detail>)" as for a
** libcurl transfer.
*/
#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/util.h" /* luapool__now */
#define LUAPOOL_HTTPLOOP_PRIVATE
#include "kernels/httploop.h"

#define lc luapool__lc

#define MAX_HEADER_LINE ((size_t)100 * 1024) /* libcurl 7.88: a longer line is "Out of memory" */
#define MAX_HEADERS     ((size_t)300 * 1024) /* libcurl's limit on an answer's header blocks */
#define MAX_TRAILERS    ((size_t)64 * 1024)  /* libcurl's limit on a chunked body's trailers */
/* Seconds idle after which a reused connection is peeked first (the loop
** may not have run since: a blocking caller's runs only inside its calls). */
#define STALE_AFTER     1e-3
#define MAX_NATIVE_BODY ((size_t)1024 * 1024) /* from here libcurl sends Expect: 100-continue */
#define IDLE_CONN_MIN   16384                 /* idle connections kept per loop (at least) */

/* C_TRY: connect() said EINPROGRESS and the request is sent at once anyway
** (on loopback the handshake is usually done by then): EAGAIN means
** C_CONNECT, waiting for EPOLLOUT; sent saves that round and a system
** call. */
enum { C_TRY, C_CONNECT, C_SEND, C_RECV, C_IDLE };
/* what the response parser expects next */
enum {
  P_HEAD,     /* header block */
  P_LENGTH,   /* c->left body bytes (Content-Length) */
  P_CLOSE,    /* body until the server closes */
  P_CSIZE,    /* a chunk-size line's digits */
  P_CEXT,     /* the rest of a chunk-size line (extensions) */
  P_CDATA,    /* c->left bytes of a chunk */
  P_CDATA_CR, /* the CRLF after a chunk */
  P_CDATA_LF,
  P_TRAILER, /* trailer lines, until an empty one */
  P_DONE
};

/* {====== scope */

static int env_set(const char *name) {
  const char *v = getenv(name);
  return v != NULL && v[0] != '\0';
}

void luapool__hn_init(lp_hloop *l) {
  const char *m = getenv("LUAPOOL_HTTP");
  /* libcurl reads http_proxy (lowercase only, for http://) and all_proxy;
  ** any of them set, whatever no_proxy says: libcurl decides it all */
  l->nat_off = (m != NULL && strcmp(m, "curl") == 0) || env_set("http_proxy") ||
               env_set("all_proxy") || env_set("ALL_PROXY");
}

static int lower_eq(const char *line, const char *name) {
  size_t n = strlen(name);
  return strncasecmp(line, name, n) == 0 && line[n] == ':';
}

/* The user's header lines native can send as libcurl would: each "Name:
** value" with a value (libcurl gives "Name:" and "Name;" meanings of its
** own), none that changes the framing or asks for decoding. */
static int headers_ok(const lp_hreq *r) {
  for (const struct curl_slist *h = r->hdrs; h; h = h->next) {
    const char *s = h->data, *c = strchr(s, ':');
    if (c == NULL || c == s) return 0;
    const char *v = c + 1;
    while (*v == ' ' || *v == '\t')
      v++;
    if (*v == '\0') return 0;
    if (lower_eq(s, "transfer-encoding") || lower_eq(s, "expect") || lower_eq(s, "connection") ||
        lower_eq(s, "accept-encoding") || lower_eq(s, "content-length") ||
        lower_eq(s, "proxy-connection") || lower_eq(s, "te"))
      return 0;
  }
  return 1;
}

/* A dotted quad of decimals 0..255 without leading zeros (what libcurl
** leaves as it is: "127.1" or "0x7f.0.0.1" it rewrites). */
static int plain_ipv4(const char *s, size_t n) {
  int parts = 0;
  size_t i = 0;
  while (i < n) {
    size_t a = i;
    unsigned v = 0;
    while (i < n && s[i] >= '0' && s[i] <= '9' && i - a < 4)
      v = v * 10 + (unsigned)(s[i++] - '0');
    if (i == a || i - a > 3 || v > 255 || (s[a] == '0' && i - a > 1)) return 0;
    parts++;
    if (i < n && (s[i] != '.' || i + 1 == n)) return 0;
    if (i < n) i++;
  }
  return parts == 4;
}

/* Reads u's address, port, authority and target into r: 0 when native
** cannot take u as libcurl would (see httploop.h). */
static int parse_target(lp_hreq *r, const char *u) {
  if (strncmp(u, "http://", 7) != 0) return 0;
  const char *a = u + 7, *p = a;
  char host[INET6_ADDRSTRLEN + 1];
  size_t hn;
  if (*p == '[') {
    const char *e = strchr(p, ']');
    if (e == NULL) return 0;
    hn = (size_t)(e - p - 1);
    if (hn == 0 || hn >= sizeof host || strspn(p + 1, "0123456789abcdef:") != hn) return 0;
    memcpy(host, p + 1, hn);
    host[hn] = '\0';
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&r->addr;
    memset(s6, 0, sizeof *s6);
    if (inet_pton(AF_INET6, host, &s6->sin6_addr) != 1) return 0;
    char back[INET6_ADDRSTRLEN];
    /* only a form libcurl keeps as it is in the effective URL */
    if (inet_ntop(AF_INET6, &s6->sin6_addr, back, sizeof back) == NULL || strcmp(back, host) != 0)
      return 0;
    s6->sin6_family = AF_INET6;
    r->alen = sizeof *s6;
    p = e + 1;
  } else {
    hn = strspn(p, "0123456789.");
    if (hn == 0 || hn >= sizeof host || !plain_ipv4(p, hn)) return 0;
    memcpy(host, p, hn);
    host[hn] = '\0';
    struct sockaddr_in *s4 = (struct sockaddr_in *)&r->addr;
    memset(s4, 0, sizeof *s4);
    if (inet_pton(AF_INET, host, &s4->sin_addr) != 1) return 0;
    s4->sin_family = AF_INET;
    r->alen = sizeof *s4;
    p += hn;
  }
  unsigned port = 80;
  if (*p == ':') {
    p++;
    size_t d = strspn(p, "0123456789");
    if (d == 0 || d > 5 || p[0] == '0') return 0;
    port = 0;
    for (size_t i = 0; i < d; i++)
      port = port * 10 + (unsigned)(p[i] - '0');
    /* (an explicit :80 libcurl may drop from the effective URL) */
    if (port == 0 || port > 65535 || port == 80) return 0;
    p += d;
  }
  if (*p != '/') return 0; /* libcurl adds the "/" to the effective URL */
  r->auth = a;
  r->auth_len = (size_t)(p - a);
  r->path = p;
  /* the target as libcurl sends it: printable, no fragment, no dot segment
  ** (libcurl removes those) before the query */
  int query = 0;
  for (const char *q = p; *q; q++) {
    unsigned char ch = (unsigned char)*q;
    if (ch <= 0x20 || ch >= 0x7f || ch == '#') return 0;
    if (ch == '?') query = 1;
    if (!query && ch == '/' && q[1] == '.') return 0;
  }
  if (r->addr.ss_family == AF_INET)
    ((struct sockaddr_in *)&r->addr)->sin_port = htons((unsigned short)port);
  else
    ((struct sockaddr_in6 *)&r->addr)->sin6_port = htons((unsigned short)port);
  r->port = (unsigned short)port;
  return 1;
}

int luapool__hn_eligible(lp_hloop *l, lp_hreq *r) {
  if (l->nat_off || !parse_target(r, r->url)) return 0;
  if (r->has_body && r->body_len >= MAX_NATIVE_BODY) return 0;
  if (!headers_ok(r)) return 0;
  /* redirects: followed natively for a GET or HEAD without a body (the
  ** others change method and body by status in ways left to libcurl) */
  if (r->max_redirs > 0 && (r->has_body || !(strcmp(r->method, "GET") == 0 || r->head))) return 0;
  return 1;
}

/* }====== */

/* {====== connections */

static int conn_slot(lp_hloop *l, int fd, hconn *c) {
  if ((size_t)fd >= l->nconns) {
    size_t n = l->nconns ? l->nconns : 1024;
    while (n <= (size_t)fd)
      n *= 2;
    hconn **t = lp_realloc(l->conns, n * sizeof *t); // NOLINT(bugprone-sizeof-expression)
    if (t == NULL) return -1;
    memset(t + l->nconns, 0, (n - l->nconns) * sizeof *t); // NOLINT(bugprone-sizeof-expression)
    l->conns = t;
    l->nconns = n;
  }
  l->conns[fd] = c;
  return 0;
}

static void idle_unlink(lp_hloop *l, hconn *c) {
  if (c->prev)
    c->prev->next = c->next;
  else
    c->host->nidle = c->next;
  if (c->next) c->next->prev = c->prev;
  c->next = c->prev = NULL;
  l->nidle_conn--;
}

/* The most recent idle connection of h, off its list (NULL: none). */
static hconn *idle_pop(lp_hloop *l, hhost *h) {
  hconn *c = h->nidle;
  if (c == NULL) return NULL;
  h->nidle = c->next;
  if (c->next) c->next->prev = NULL;
  c->next = c->prev = NULL;
  l->nidle_conn--;
  return c;
}

/* Closes c (epoll drops a closed descriptor) and frees it; an idle one is
** off its list first. */
static void conn_close(lp_hloop *l, hconn *c) {
  if ((size_t)c->fd < l->nconns) l->conns[c->fd] = NULL;
  luapool__hl_close_fd(l, c->fd);
  lp_free(c->out);
  lp_free(c);
}

/* Out of descriptors: closes the idle connection unused the longest (of any
** host), so that a request to a new host does not fail while kept-alive
** connections nobody asked for hold the descriptors (the cap on idle ones
** is a count, not the process's RLIMIT_NOFILE).  1: one was closed, 0: none
** is idle.  A walk over the idle lists: it happens only at the limit. */
int luapool__hn_evict_idle(lp_hloop *l) {
  hconn *oldest = NULL;
  for (size_t i = 0; i < l->nbuckets && l->nidle_conn > 0; i++)
    for (hhost *h = l->buckets[i]; h; h = h->next)
      for (hconn *c = h->nidle; c; c = c->next)
        if (oldest == NULL || c->last_io < oldest->last_io) oldest = c;
  if (oldest == NULL) return 0;
  idle_unlink(l, oldest);
  conn_close(l, oldest);
  return 1;
}

static int watch(lp_hloop *l, hconn *c, int op, uint32_t events) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = events;
  ev.data.u64 = ((uint64_t)NATIVE_TAG << 32) | (uint32_t)c->fd;
  return epoll_ctl(l->ep, op, c->fd, &ev);
}

/* }====== */

/* {====== ending an attempt */

static double ms_since(double t0) { return (luapool__now() - t0) * 1000.0; }

static void set_timings(lp_hreq *r) {
  double now = luapool__now();
  double conn = r->t_conn > 0 ? r->t_conn : now;
  r->t.dns = 0;
  r->t.connect = conn - r->t_start;
  r->t.tls = 0;
  r->t.ttfb = r->t_first > 0 ? r->t_first - conn : 0;
  r->t.transfer = now - r->t_start;
}

/* The attempt on r ends (its connection closed, or kept by detach when
** code is CURLE_OK and the connection can serve another request). */
static void end(lp_hloop *l, lp_hreq *r, CURLcode code) {
  set_timings(r);
  if (code != CURLE_OK && r->conn) {
    conn_close(l, r->conn);
    r->conn = NULL;
  }
  luapool__hl_attempt_end(l, r, code);
}

static void failf(lp_hloop *l, lp_hreq *r, CURLcode code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void failf(lp_hloop *l, lp_hreq *r, CURLcode code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->errbuf, sizeof r->errbuf, fmt, ap);
  va_end(ap);
  end(l, r, code);
}

static void host_text(const lp_hreq *r, char *out, size_t sz) {
  if (r->addr.ss_family == AF_INET6)
    inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&r->addr)->sin6_addr, out, (socklen_t)sz);
  else
    inet_ntop(AF_INET, &((const struct sockaddr_in *)&r->addr)->sin_addr, out, (socklen_t)sz);
}

static void connect_failed(lp_hloop *l, lp_hreq *r) {
  char host[INET6_ADDRSTRLEN];
  host_text(r, host, sizeof host);
  failf(l, r, CURLE_COULDNT_CONNECT, "Failed to connect to %s port %u after %ld ms: %s", host,
        (unsigned)r->port, (long)ms_since(r->t_start), lc.easy_strerror(CURLE_COULDNT_CONNECT));
}

/* libcurl 7.88's words for a connect that outlived its timeout. */
static void connect_timed_out(lp_hloop *l, lp_hreq *r, long ms) {
  char host[INET6_ADDRSTRLEN];
  host_text(r, host, sizeof host);
  failf(l, r, CURLE_OPERATION_TIMEDOUT, "Failed to connect to %s port %u after %ld ms: %s", host,
        (unsigned)r->port, ms, lc.easy_strerror(CURLE_OPERATION_TIMEDOUT));
}

/* }====== */

/* {====== sending */

static int addf(lp_hloop *l, size_t *len, const char *s, size_t n) {
  if (*len + n + 1 > l->wcap) {
    size_t nc = l->wcap ? l->wcap : 1024;
    while (nc < *len + n + 1)
      nc *= 2;
    char *b = lp_realloc(l->wbuf, nc);
    if (b == NULL) return -1;
    l->wbuf = b;
    l->wcap = nc;
  }
  memcpy(l->wbuf + *len, s, n);
  *len += n;
  return 0;
}

#define ADDS(s) addf(l, &n, (s), strlen(s))

static int user_has(const lp_hreq *r, const char *name) {
  for (const struct curl_slist *h = r->hdrs; h; h = h->next)
    if (lower_eq(h->data, name)) return 1;
  return 0;
}

/* Whether libcurl sends r->body (POSTFIELDS): see setup in httploop.c. */
static int sends_body(const lp_hreq *r) {
  return !r->head && (r->has_body || strcmp(r->method, "POST") == 0 ||
                      strcmp(r->method, "PUT") == 0 || strcmp(r->method, "PATCH") == 0);
}

/* The request head in l->wbuf, as libcurl 7.88 writes it (its order: Host,
** User-Agent, Accept, the user's lines, then Content-Length and
** Content-Type for a body), but with "Accept-Encoding: identity" where
** libcurl lists its decoders: a native answer is never decoded, and a
** request with no Accept-Encoding would accept any coding (RFC 9110
** 12.5.3), so a server could compress it unasked.  -1: out of memory. */
static int build_head(lp_hloop *l, const lp_hreq *r, size_t *out) {
  size_t n = 0;
  int rc = ADDS(r->method) | ADDS(" ") | ADDS(r->path) | ADDS(" HTTP/1.1\r\n");
  const char *uhost = NULL;
  for (const struct curl_slist *h = r->hdrs; h; h = h->next)
    if (lower_eq(h->data, "host")) uhost = h->data;
  if (uhost) {
    rc |= ADDS(uhost) | ADDS("\r\n");
  } else {
    rc |= ADDS("Host: ") | addf(l, &n, r->auth, r->auth_len) | ADDS("\r\n");
  }
  if (!user_has(r, "user-agent")) rc |= ADDS("User-Agent: " USER_AGENT "\r\n");
  if (!user_has(r, "accept")) rc |= ADDS("Accept: */*\r\n");
  rc |= ADDS("Accept-Encoding: identity\r\n"); /* (a caller's own goes to libcurl) */
  for (const struct curl_slist *h = r->hdrs; h; h = h->next)
    if (h->data != uhost) rc |= ADDS(h->data) | ADDS("\r\n");
  if (sends_body(r)) {
    char cl[48];
    snprintf(cl, sizeof cl, "Content-Length: %zu\r\n", r->body_len);
    rc |= ADDS(cl);
    if (!user_has(r, "content-type"))
      rc |= ADDS("Content-Type: application/x-www-form-urlencoded\r\n");
  }
  rc |= ADDS("\r\n");
  *out = n;
  return rc ? -1 : 0;
}

static void recv_ready(lp_hloop *l, hconn *c);
static void fresh(lp_hloop *l, lp_hreq *r);

/* A failure on a reused connection before any answer: the server closed
** it while it was idle.  Again on a fresh one (once per attempt). */
static int stale(lp_hloop *l, lp_hreq *r) {
  hconn *c = r->conn;
  if (c == NULL || !c->reused || c->any) return 0;
  conn_close(l, c);
  r->conn = NULL;
  r->hlen = 0;
  r->t_conn = 0;
  fresh(l, r);
  return 1;
}

/* Writes what is left of the request: 1 all sent, 0 wait for EPOLLOUT,
** -1 the attempt ended. */
static int send_more(lp_hloop *l, hconn *c) {
  lp_hreq *r = c->r;
  size_t body = sends_body(r) ? r->body_len : 0;
  for (;;) {
    struct iovec iov[2];
    int k = 0;
    if (c->out_off < c->out_len) {
      iov[k].iov_base = (c->out ? c->out : l->wbuf) + c->out_off;
      iov[k++].iov_len = c->out_len - c->out_off;
    }
    if (c->body_off < body) {
      iov[k].iov_base = r->body + c->body_off;
      iov[k++].iov_len = body - c->body_off;
    }
    if (k == 0) break;
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)k;
    ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      int e = errno;
      if (c->state == C_TRY) { /* the connect's own failure (refused) */
        connect_failed(l, r);
        return -1;
      }
      if (stale(l, r)) return -1;
      failf(l, r, CURLE_SEND_ERROR, "Send failure: %s", strerror(e));
      return -1;
    }
    c->last_io = luapool__now();
    size_t ww = (size_t)w, h = c->out_len - c->out_off;
    if (ww >= h) {
      c->out_off = c->out_len;
      c->body_off += ww - h;
    } else {
      c->out_off += ww;
    }
  }
  int all = c->out_off == c->out_len && c->body_off >= body;
  if (c->state == C_TRY && c->out_off == 0 && c->body_off == 0) return 0; /* not connected yet */
  if (!all && !c->nodelay) {
    /* libcurl sets TCP_NODELAY on every socket; a request written whole
    ** (one writev, the connection otherwise quiet) is never held back by
    ** Nagle, so only one written in parts needs it (a system call saved
    ** per connection) */
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->nodelay = 1;
  }
  if (!all && c->out == NULL) {
    /* l->wbuf is the next request's: keep the rest of this head */
    size_t rest = c->out_len - c->out_off;
    c->out = lp_malloc(rest ? rest : 1);
    if (c->out == NULL) {
      r->oom = 1;
      end(l, r, CURLE_OUT_OF_MEMORY);
      return -1;
    }
    memcpy(c->out, l->wbuf + c->out_off, rest);
    c->out_len = rest;
    c->out_off = 0;
  }
  if (all) {
    lp_free(c->out);
    c->out = NULL;
  }
  return all;
}

/* Sends r's request on its connection and waits for the answer; reg is
** what epoll watches on it now (0: not registered). */
static void send_request(lp_hloop *l, hconn *c, uint32_t reg) {
  lp_hreq *r = c->r;
  size_t n;
  if (build_head(l, r, &n) != 0) {
    r->oom = 1;
    end(l, r, CURLE_OUT_OF_MEMORY);
    return;
  }
  int trying = c->state == C_TRY;
  if (!trying) c->state = C_SEND;
  c->out = NULL;
  c->out_len = n;
  c->out_off = c->body_off = 0;
  c->ps = P_HEAD;
  c->any = 0;
  c->line_start = 0;
  c->size = -1;
  c->hbytes = 0;
  c->ls_mark = luapool__now();
  c->ls_got = 0;
  int rc = send_more(l, c);
  if (rc < 0) return;
  uint32_t want = rc ? EPOLLIN : EPOLLOUT;
  if (trying) {
    if (rc == 0 && c->out_off == 0 && c->body_off == 0) {
      c->state = C_CONNECT; /* (its head is built again once connected) */
    } else {
      r->t_conn = luapool__now();
      c->state = C_SEND;
    }
  }
  if (rc) c->state = C_RECV;
  if (want != reg && watch(l, c, reg ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, want) != 0) {
    failf(l, r, CURLE_RECV_ERROR, "epoll: %s", strerror(errno));
    return;
  }
}

/* A new connection for r. */
static void fresh(lp_hloop *l, lp_hreq *r) {
  hconn *c = lp_calloc(1, sizeof *c);
  if (c == NULL) {
    r->oom = 1;
    end(l, r, CURLE_OUT_OF_MEMORY);
    return;
  }
  c->fd = socket(r->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  while (c->fd < 0 && (errno == EMFILE || errno == ENFILE) && luapool__hn_evict_idle(l))
    c->fd = socket(r->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) {
    int e = errno;
    lp_free(c);
    if (e == EMFILE || e == ENFILE) r->fd_errno = e;
    failf(l, r, CURLE_COULDNT_CONNECT, "socket: %s", strerror(e));
    return;
  }
  c->host = r->host;
  c->r = r;
  c->state = C_CONNECT;
  r->conn = c;
  if (conn_slot(l, c->fd, c) != 0) {
    r->oom = 1;
    end(l, r, CURLE_OUT_OF_MEMORY);
    return;
  }
  c->last_io = luapool__now();
  int rc = connect(c->fd, (struct sockaddr *)&r->addr, r->alen);
  if (rc != 0 && errno != EINPROGRESS && errno != EINTR) {
    connect_failed(l, r);
    return;
  }
  c->state = C_TRY;
  send_request(l, c, 0);
}

static void connected(lp_hloop *l, hconn *c) {
  lp_hreq *r = c->r;
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
  if (err != 0) {
    connect_failed(l, r);
    return;
  }
  /* An event meant for the descriptor's last owner: its number was reused
  ** within one epoll batch (a connection closed, or evicted out of
  ** descriptors, and this socket made), and the event's bits say nothing of
  ** this socket, which is still connecting while it is neither writable nor
  ** in error. */
  struct pollfd pf = {c->fd, POLLOUT, 0};
  if (poll(&pf, 1, 0) == 0) return;
  r->t_conn = luapool__now();
  send_request(l, c, EPOLLOUT);
}

/* The timer of r's attempt: its next due time (the attempt's end, the
** connect timeout while connecting, the low-speed check). */
static double due(const lp_hreq *r) {
  double at = r->t_limit;
  const hconn *c = r->conn;
  if (c && c->state == C_CONNECT) {
    double ct = r->t_start +
                (r->connect_timeout > 0 ? r->connect_timeout : DEFAULT_CONNECT_TIMEOUT_MS / 1000.0);
    if (at == 0 || ct < at) at = ct;
  }
  if (c) {
    double ls = c->ls_mark + (double)LOW_SPEED_TIME_S;
    if (at == 0 || ls < at) at = ls;
  }
  return at;
}

static void arm(lp_hloop *l, lp_hreq *r) {
  double at = due(r);
  if (at <= 0) return;
  r->wake = at;
  if (luapool__hl_heap_push(l, r) != 0) {
    r->oom = 1;
    end(l, r, CURLE_OUT_OF_MEMORY);
  }
}

/* On an idle connection of r's host (the most recent: the likeliest still
** open), or a new one. */
static void go(lp_hloop *l, lp_hreq *r) {
  /* The most recent idle one (the likeliest still open).  One idle for a
  ** while (a blocking caller's loop runs only inside its calls, so no EOF
  ** was read) is peeked first: input on an idle connection (the server's
  ** close, or bytes nobody asked for) would be taken as the answer.  One
  ** released this instant (a burst) is not. */
  hconn *c;
  while ((c = idle_pop(l, r->host)) != NULL) {
    if (luapool__now() - c->last_io <= STALE_AFTER) break;
    char b;
    ssize_t k = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break; /* quiet: usable */
    conn_close(l, c);
  }
  if (c != NULL) {
    c->state = C_SEND;
    c->reused = 1;
    c->r = r;
    r->conn = c;
    r->t_conn = r->t_start;
  }
  if (c)
    send_request(l, c, EPOLLIN); /* (an idle one is watched for input) */
  else
    fresh(l, r);
  /* (unless it ended already: a refused connect, a failed send) */
  if (r->state == R_RUNNING && r->conn != NULL && !r->in_heap) arm(l, r);
}

void luapool__hn_start(lp_hloop *l, lp_hreq *r, long timeout_ms) {
  r->t_start = luapool__now();
  r->t_conn = r->t_first = 0;
  r->t_limit = timeout_ms > 0 ? r->t_start + (double)timeout_ms / 1000.0 : 0;
  r->conn = NULL;
  if (r->hops > 0 || r->hop_url) { /* the last attempt was redirected: from the start */
    r->hops = 0;
    lp_free(r->hop_url);
    r->hop_url = NULL;
    parse_target(r, r->url);
  }
  lp_free(r->eff);
  r->eff = NULL;
  go(l, r);
}

/* }====== */

/* {====== receiving */

static int body_bytes(lp_hreq *r, const char *p, size_t n) {
  r->count += n;
  if (r->count_only || n == 0) return 0;
  return luapool__hl_append(&r->rbody, &r->blen, &r->bcap, p, n, 1024);
}

/* The next token of the comma-separated header value v[*i..n), its spaces
** trimmed: its start, *len its length (0: none left).  *i moves past it. */
static const char *next_token(const char *v, size_t n, size_t *i, size_t *len) {
  size_t k = *i;
  while (k < n && (v[k] == ' ' || v[k] == '\t' || v[k] == ','))
    k++;
  size_t a = k;
  while (k < n && v[k] != ',')
    k++;
  size_t e = k;
  while (e > a && (v[e - 1] == ' ' || v[e - 1] == '\t'))
    e--;
  *i = k;
  *len = e - a;
  return v + a;
}

/* Case-insensitive: does the header value v (n bytes) list token t? */
static int has_token(const char *v, size_t n, const char *t) {
  size_t tn = strlen(t), i = 0, len;
  while (i < n) {
    const char *tok = next_token(v, n, &i, &len);
    if (len == tn && strncasecmp(tok, t, tn) == 0) return 1;
  }
  return 0;
}

/* The codings of a Transfer-Encoding value v[0..n): *chunked when one is
** "chunked", *other when one is neither that nor "identity" (libcurl would
** decode it: gzip, deflate; this client decodes none), *any when there is
** one at all. */
static void te_scan(const char *v, size_t n, int *chunked, int *other, int *any) {
  size_t i = 0, len;
  while (i < n) {
    const char *tok = next_token(v, n, &i, &len);
    if (len == 0) continue;
    *any = 1;
    if (len == 7 && strncasecmp(tok, "chunked", 7) == 0)
      *chunked = 1;
    else if (!(len == 8 && strncasecmp(tok, "identity", 8) == 0))
      *other = 1;
  }
}

static int is_digit(char ch) { return ch >= '0' && ch <= '9'; }

/* The status line h[0..n) (its end of line not included), which starts
** "HTTP/": 0 with c->http10 and c->status set, or -1 with the attempt
** failed as libcurl fails that line (its checks in its order: the code
** before the version). */
static int status_line(lp_hloop *l, hconn *c, const char *h, size_t n) {
  lp_hreq *r = c->r;
  if (memchr(h, '\0', n) != NULL) {
    failf(l, r, CURLE_WEIRD_SERVER_REPLY, "Nul byte in header");
    return -1;
  }
  size_t k = 9;
  int code = 0, digits = 0;
  if (n > 9 && is_digit(h[5]) && h[6] == '.' && is_digit(h[7]) && h[8] == ' ')
    for (; k < n && digits < 3 && is_digit(h[k]); k++, digits++)
      code = code * 10 + (h[k] - '0');
  if (digits == 0) { /* "HTTP/2 200", "HTTP/1.1 abc": no version and code libcurl reads */
    failf(l, r, CURLE_UNSUPPORTED_PROTOCOL, "Unsupported HTTP version in response");
    return -1;
  }
  /* "099", "20", "2000"; and "200x", which libcurl takes as 200 and RFC
  ** 9112 does not (three digits, then a space) */
  if (code < 100 || (k < n && h[k] != ' ')) {
    failf(l, r, CURLE_UNSUPPORTED_PROTOCOL, "Unsupported response code in HTTP response");
    return -1;
  }
  if (h[5] != '1' || (h[7] != '0' && h[7] != '1')) {
    failf(l, r, CURLE_UNSUPPORTED_PROTOCOL, "Unsupported HTTP version (%c.%c) in response", h[5],
          h[7]);
    return -1;
  }
  c->http10 = h[7] == '0';
  c->status = code;
  return 0;
}

/* The header block r->hdr[0..hlen) is complete: status and framing.  0, or
** -1 when the attempt ended. */
static int head_done(lp_hloop *l, hconn *c) {
  lp_hreq *r = c->r;
  const char *h = r->hdr;
  size_t n = r->hlen;
  const char *nl1 = memchr(h, '\n', n);
  size_t sl = nl1 ? (size_t)(nl1 - h) : n;
  if (sl && h[sl - 1] == '\r') sl--;
  if (status_line(l, c, h, sl) != 0) return -1;
  if (c->status >= 100 && c->status < 200 && c->status != 101) {
    r->hlen = 0; /* informational: the next block is the answer */
    c->line_start = 0;
    return 0;
  }
  int chunked = 0, te_other = 0, te_any = 0, close_ = c->http10, have_len = 0;
  uint64_t len = 0;
  size_t i = nl1 ? (size_t)(nl1 - h) + 1 : n; /* the header lines, after the status line */
  while (i < n) {
    const char *line = h + i, *nl = memchr(line, '\n', n - i);
    size_t ln = nl ? (size_t)(nl - line) : n - i;
    i += ln + 1;
    if (ln && line[ln - 1] == '\r') ln--;
    if (ln == 0) continue; /* the block's end */
    /* as libcurl: a NUL is refused (RFC 9110 5.5), and so is a line that
    ** is no header, unless it continues one (obs-fold) */
    if (memchr(line, '\0', ln) != NULL) {
      failf(l, r, CURLE_WEIRD_SERVER_REPLY, "Nul byte in header");
      return -1;
    }
    if (line[0] == ' ' || line[0] == '\t') continue;
    const char *colon = memchr(line, ':', ln);
    if (colon == NULL) {
      failf(l, r, CURLE_WEIRD_SERVER_REPLY, "Header without colon");
      return -1;
    }
    size_t nn = (size_t)(colon - line);
    const char *v = colon + 1;
    size_t vn = ln - nn - 1;
    while (vn && (*v == ' ' || *v == '\t'))
      v++, vn--;
    while (vn && (v[vn - 1] == ' ' || v[vn - 1] == '\t'))
      vn--;
    if (nn == 14 && strncasecmp(line, "content-length", 14) == 0) {
      uint64_t x = 0;
      size_t k = 0;
      for (; k < vn && v[k] >= '0' && v[k] <= '9'; k++) {
        if (x > (UINT64_MAX - 9) / 10) break;
        x = x * 10 + (uint64_t)(v[k] - '0');
      }
      if (k == 0 || k != vn || (have_len && x != len)) {
        failf(l, r, CURLE_WEIRD_SERVER_REPLY, "Invalid Content-Length: value");
        return -1;
      }
      have_len = 1;
      len = x;
    } else if (nn == 17 && strncasecmp(line, "transfer-encoding", 17) == 0) {
      /* the codings of every such header are one list (as libcurl reads
      ** them: chunked framing when one is chunked, whatever its place) */
      te_scan(v, vn, &chunked, &te_other, &te_any);
    } else if (nn == 10 && strncasecmp(line, "connection", 10) == 0) {
      if (has_token(v, vn, "close")) close_ = 1;
      if (c->http10 && has_token(v, vn, "keep-alive")) close_ = 0;
    }
  }
  if (te_other) { /* a body this client cannot decode: an error, never the coded bytes */
    failf(l, r, CURLE_BAD_CONTENT_ENCODING,
          "a transfer coding other than chunked in the response (not decoded natively)");
    return -1;
  }
  r->status = c->status;
  c->keep = !close_;
  if (r->head || c->status == 204 || c->status == 304) {
    c->ps = P_DONE;
  } else if (chunked) {
    c->ps = P_CSIZE;
    c->digits = 0;
    c->left = 0;
  } else if (have_len && !te_any) {
    /* (a Transfer-Encoding overrides it, RFC 9112 6.3: "identity" is read
    ** to the close, as libcurl reads it) */
    c->size = (int64_t)len;
    c->left = len;
    c->ps = len ? P_LENGTH : P_DONE;
  } else {
    c->ps = P_CLOSE;
    c->keep = 0;
  }
  return 0;
}

static int hexval(int ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

/* The body bytes of p[*i..n) that c->left still counts (a Content-Length
** body, a chunk's data): kept or counted; c->ps becomes then once the count
** is done.  -1: out of memory. */
static int counted_body(hconn *c, const char *p, size_t n, size_t *i, int then) {
  size_t k = n - *i;
  if ((uint64_t)k > c->left) k = (size_t)c->left;
  if (body_bytes(c->r, p + *i, k) != 0) return -1;
  *i += k;
  c->left -= k;
  if (c->left == 0) c->ps = then;
  return 0;
}

/* A chunk-size line has ended: its data next, or the trailers after the
** last chunk (size 0). */
static void chunk_size_read(hconn *c) {
  c->ps = c->left ? P_CDATA : P_TRAILER;
  c->trailer_len = 0;
  c->line_start = c->r->hlen; /* where the first trailer line goes */
}

/* A trailer line has ended (in r->hdr from c->line_start, its end of line
** included): 0, or -1 with the attempt failed as libcurl fails a trailer
** that is no header (which also ends a size line "0x5" read as 0 and an
** extension: its data and the rest are then trailers). */
static int trailer_line(lp_hloop *l, hconn *c) {
  lp_hreq *r = c->r;
  const char *line = r->hdr + c->line_start;
  size_t ln = r->hlen - c->line_start;
  while (ln && (line[ln - 1] == '\n' || line[ln - 1] == '\r'))
    ln--;
  c->line_start = r->hlen;
  if (ln == 0 || (memchr(line, ':', ln) != NULL && memchr(line, '\0', ln) == NULL)) return 0;
  failf(l, r, CURLE_BAD_FUNCTION_ARGUMENT, "Failed reading the chunked-encoded stream");
  return -1;
}

/* Feeds n received bytes to the parser.  0: more wanted (or P_DONE with
** *used bytes of p consumed); -1: the attempt ended. */
static int parse(lp_hloop *l, hconn *c, const char *p, size_t n, size_t *used) {
  lp_hreq *r = c->r;
  size_t i = 0;
  while (i < n && c->ps != P_DONE) {
    switch (c->ps) {
      case P_HEAD: {
        if (r->hlen == 0 && c->line_start == 0) {
          /* libcurl: what does not start as "HTTP/" is HTTP/0.9 */
          size_t k = n - i < 5 ? n - i : 5;
          if (memcmp(p + i, "HTTP/", k) != 0) {
            failf(l, r, CURLE_UNSUPPORTED_PROTOCOL, "Received HTTP/0.9 when not allowed");
            return -1;
          }
        }
        /* append up to and including the end of the block, if here */
        size_t a = i, end_at = 0;
        int found = 0;
        while (i < n) {
          const char *nl = memchr(p + i, '\n', n - i);
          if (nl == NULL) {
            i = n;
            break;
          }
          size_t pos = (size_t)(nl - p);
          size_t line_len = r->hlen + (pos - a) + 1 - c->line_start;
          i = pos + 1;
          if (line_len > MAX_HEADER_LINE) break;
          /* counted line by line, as libcurl counts: the total at the
          ** first line past the limit (not at the end of this read) */
          size_t total = c->hbytes + (i - a);
          if (total > MAX_HEADERS) {
            failf(l, r, CURLE_RECV_ERROR, "Too large response headers: %zu > %zu", total,
                  MAX_HEADERS);
            return -1;
          }
          /* an empty line ("\n" or "\r\n") ends the block */
          if (line_len == 1 ||
              (line_len == 2 && (pos > a ? p[pos - 1] == '\r' : r->hdr[r->hlen - 1] == '\r'))) {
            found = 1;
            end_at = i;
            break;
          }
          c->line_start = r->hlen + (i - a);
        }
        size_t take = found ? end_at - a : i - a;
        if (r->hlen + take - c->line_start > MAX_HEADER_LINE) {
          end(l, r, CURLE_OUT_OF_MEMORY); /* libcurl: "Out of memory", no detail */
          return -1;
        }
        c->hbytes += take;
        if (luapool__hl_append(&r->hdr, &r->hlen, &r->hcap, p + a, take, 256) != 0) {
          r->oom = 1;
          end(l, r, CURLE_OUT_OF_MEMORY);
          return -1;
        }
        if (found) {
          c->line_start = 0;
          if (head_done(l, c) != 0) return -1;
        }
        break;
      }
      case P_LENGTH:
        if (counted_body(c, p, n, &i, P_DONE) != 0) goto oom;
        break;
      case P_CLOSE:
        if (body_bytes(r, p + i, n - i) != 0) goto oom;
        i = n;
        break;
      case P_CSIZE: {
        int ch = (unsigned char)p[i], v = hexval(ch);
        if (v >= 0) {
          if (++c->digits > 16) {
            failf(l, r, CURLE_RECV_ERROR, "Too long hexadecimal number in chunked-encoding");
            return -1;
          }
          if (c->digits == 16 && c->left >> 59 >= 1) { /* >= 2^63 once shifted: libcurl refuses */
            failf(l, r, CURLE_RECV_ERROR,
                  "Illegal or missing hexadecimal sequence in chunked-encoding");
            return -1;
          }
          c->left = (c->left << 4) | (uint64_t)v;
          i++;
        } else if (c->digits == 0) {
          failf(l, r, CURLE_RECV_ERROR,
                "Illegal or missing hexadecimal sequence in chunked-encoding");
          return -1;
        } else if (ch == '\n') {
          i++;
          chunk_size_read(c);
        } else {
          c->ps = P_CEXT; /* ";ext", spaces, the CR */
        }
        break;
      }
      case P_CEXT: {
        const char *nl = memchr(p + i, '\n', n - i);
        if (nl == NULL) {
          i = n;
        } else {
          i = (size_t)(nl - p) + 1;
          chunk_size_read(c);
        }
        break;
      }
      case P_CDATA:
        if (counted_body(c, p, n, &i, P_CDATA_CR) != 0) goto oom;
        break;
      case P_CDATA_CR:
      case P_CDATA_LF: {
        int ch = (unsigned char)p[i];
        if (ch == '\r' && c->ps == P_CDATA_CR) {
          c->ps = P_CDATA_LF;
          i++;
        } else if (ch == '\n') {
          c->ps = P_CSIZE;
          c->digits = 0;
          c->left = 0;
          i++;
        } else {
          failf(l, r, CURLE_RECV_ERROR, "Malformed encoding found in chunked-encoding");
          return -1;
        }
        break;
      }
      case P_TRAILER: {
        /* trailer lines go to the headers, as libcurl's header callback
        ** gets them; an empty one ends the body */
        const char *nl = memchr(p + i, '\n', n - i);
        size_t e = nl ? (size_t)(nl - p) + 1 : n;
        for (size_t k = i; k < e; k++)
          if (p[k] != '\r' && p[k] != '\n') c->trailer_len++;
        int last = nl != NULL && c->trailer_len == 0;
        c->hbytes += e - i;
        if (!last && c->hbytes > MAX_HEADERS + MAX_TRAILERS) { /* (the block's share counted) */
          failf(l, r, CURLE_RECV_ERROR, "Out of memory in chunked-encoding");
          return -1;
        }
        if (!last && luapool__hl_append(&r->hdr, &r->hlen, &r->hcap, p + i, e - i, 256) != 0)
          goto oom;
        i = e;
        if (nl) {
          if (last)
            c->ps = P_DONE;
          else if (trailer_line(l, c) != 0)
            return -1;
          c->trailer_len = 0;
        }
        break;
      }
      default: break;
    }
  }
  *used = i;
  return 0;
oom:
  r->oom = 1;
  end(l, r, CURLE_OUT_OF_MEMORY);
  return -1;
}

/* The Location of r's answer (trimmed, a copy), or NULL. */
static char *location(const lp_hreq *r) {
  size_t i = 0;
  while (i < r->hlen) {
    const char *line = r->hdr + i, *nl = memchr(line, '\n', r->hlen - i);
    size_t n = nl ? (size_t)(nl - line) : r->hlen - i;
    i += n + 1;
    if (n < 9 || strncasecmp(line, "location:", 9) != 0) continue;
    size_t a = 9;
    while (a < n && (line[a] == ' ' || line[a] == '\t'))
      a++;
    while (n > a && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
      n--;
    if (n == a) return NULL;
    char *v = lp_malloc(n - a + 1);
    if (v) {
      memcpy(v, line + a, n - a);
      v[n - a] = '\0';
    }
    return v;
  }
  return NULL;
}

/* loc resolved against base as libcurl resolves a redirect (its URL API),
** or NULL with *uc the URL API's code (CURLUE_OUT_OF_MEMORY also when the
** copy failed). */
static char *resolve(const char *base, const char *loc, CURLUcode *uc) {
  CURLU *u = lc.url();
  char *out = NULL, *copy = NULL;
  *uc = CURLUE_OUT_OF_MEMORY;
  if (u == NULL) return NULL;
  if ((*uc = lc.url_set(u, CURLUPART_URL, base, 0)) == CURLUE_OK &&
      (*uc = lc.url_set(u, CURLUPART_URL, loc, 0)) == CURLUE_OK &&
      (*uc = lc.url_get(u, CURLUPART_URL, &out, 0)) == CURLUE_OK) {
    size_t n = strlen(out) + 1;
    copy = lp_malloc(n);
    if (copy)
      memcpy(copy, out, n);
    else
      *uc = CURLUE_OUT_OF_MEMORY;
  }
  if (out) lc.free(out);
  lc.url_cleanup(u);
  return copy;
}

/* A Location the URL API refused: libcurl's code and message for it (an
** unsupported scheme, else a malformed URL), not "out of memory". */
static void bad_location(lp_hloop *l, lp_hreq *r, CURLUcode uc) {
  if (uc == CURLUE_OUT_OF_MEMORY) {
    r->oom = 1;
    end(l, r, CURLE_OUT_OF_MEMORY);
    return;
  }
  const char *why = lc.url_strerror ? lc.url_strerror(uc) : NULL;
  failf(l, r, uc == CURLUE_UNSUPPORTED_SCHEME ? CURLE_UNSUPPORTED_PROTOCOL : CURLE_URL_MALFORMAT,
        "The redirect target URL could not be parsed%s%s", why ? ": " : "", why ? why : "");
}

/* r's answer is complete: the result, or a redirect to follow (natively
** on the same host:port, else in libcurl). */
static void answered(lp_hloop *l, hconn *c) {
  lp_hreq *r = c->r;
  char *loc = NULL;
  if (r->max_redirs > 0 && r->status >= 300 && r->status < 400) loc = location(r);
  if (loc == NULL) {
    end(l, r, CURLE_OK);
    return;
  }
  if (r->hops >= r->max_redirs) {
    lp_free(loc);
    failf(l, r, CURLE_TOO_MANY_REDIRECTS, "Maximum (%d) redirects followed", r->max_redirs);
    return;
  }
  CURLUcode uc;
  char *next = resolve(r->hop_url ? r->hop_url : r->url, loc, &uc);
  lp_free(loc);
  if (next == NULL) {
    bad_location(l, r, uc);
    return;
  }
  char *eff = lp_malloc(strlen(next) + 1);
  if (eff == NULL) {
    lp_free(next);
    r->oom = 1;
    end(l, r, CURLE_OUT_OF_MEMORY);
    return;
  }
  strcpy(eff, next); // NOLINT(clang-analyzer-security.insecureAPI.strcpy): sized above
  lp_free(r->eff);
  r->eff = eff;
  lp_free(r->hop_url);
  r->hop_url = next;
  r->hops++;
  /* the redirect's body is not the answer's (libcurl ignores it) */
  r->blen = 0;
  r->count = 0;
  r->hlen = 0;
  unsigned short port = r->port;
  struct sockaddr_storage was = r->addr;
  int same = parse_target(r, next) && r->port == port && r->alen > 0 &&
             memcmp(&was, &r->addr, r->alen) == 0;
  if (!same) {
    r->addr = was; /* (for the connection's release) */
    r->port = port;
    luapool__hl_handoff(l, r);
    return;
  }
  /* the connection back to the pool (or closed); go arms the timer again */
  luapool__hn_detach(l, r);
  r->t_first = 0;
  go(l, r);
}

/* The server closed the connection (or it failed with e, 0 for EOF). */
static void closed(lp_hloop *l, hconn *c, int e) {
  lp_hreq *r = c->r;
  if (!c->any) {
    if (stale(l, r)) return;
    if (e == 0)
      failf(l, r, CURLE_GOT_NOTHING, "Empty reply from server");
    else
      failf(l, r, CURLE_RECV_ERROR, "Recv failure: %s", strerror(e));
    return;
  }
  if (e != 0) {
    failf(l, r, CURLE_RECV_ERROR, "Recv failure: %s", strerror(e));
  } else if (c->ps == P_CLOSE) {
    c->ps = P_DONE;
    c->keep = 0;
    answered(l, c);
  } else if (c->ps == P_LENGTH) {
    failf(l, r, CURLE_PARTIAL_FILE, "transfer closed with %llu bytes remaining to read",
          (unsigned long long)c->left);
  } else if (c->ps == P_HEAD) {
    /* as libcurl: the complete lines are the headers, then the framing
    ** they give decides (a 200 without a length is an empty answer) */
    if (c->line_start == 0) {
      failf(l, r, CURLE_GOT_NOTHING, "Empty reply from server");
      return;
    }
    r->hlen = c->line_start;
    if (head_done(l, c) != 0) return;
    if (c->ps == P_HEAD) { /* (a 1xx) */
      failf(l, r, CURLE_GOT_NOTHING, "Empty reply from server");
      return;
    }
    if (c->ps == P_DONE) {
      c->keep = 0;
      answered(l, c);
    } else {
      closed(l, c, 0);
    }
  } else {
    failf(l, r, CURLE_PARTIAL_FILE, "transfer closed with outstanding read data remaining");
  }
}

static void recv_ready(lp_hloop *l, hconn *c) {
  lp_hreq *r = c->r;
  for (;;) {
    ssize_t got = recv(c->fd, l->rbuf, sizeof l->rbuf, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      closed(l, c, errno);
      return;
    }
    if (got == 0) {
      closed(l, c, 0);
      return;
    }
    double now = luapool__now();
    c->last_io = now;
    c->ls_got += (uint64_t)got;
    if (!c->any) {
      c->any = 1;
      r->t_first = now;
    }
    size_t used = 0;
    if (parse(l, c, l->rbuf, (size_t)got, &used) != 0) return;
    if (c->ps == P_DONE) {
      if (used < (size_t)got) c->keep = 0; /* more than the answer: no reuse */
      answered(l, c);
      return;
    }
    if ((size_t)got < sizeof l->rbuf) return; /* (level-triggered: more wakes us) */
  }
}

void luapool__hn_event(lp_hloop *l, int fd, uint32_t events) {
  hconn *c = (size_t)fd < l->nconns ? l->conns[fd] : NULL;
  if (c == NULL) return; /* closed earlier in this batch: its number may be libcurl's now */
  switch (c->state) {
    case C_CONNECT:
      if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) connected(l, c);
      break;
    case C_SEND: {
      int rc = send_more(l, c);
      if (rc == 1) {
        c->state = C_RECV;
        if (watch(l, c, EPOLL_CTL_MOD, EPOLLIN) != 0)
          failf(l, c->r, CURLE_RECV_ERROR, "epoll: %s", strerror(errno));
      }
      break;
    }
    case C_RECV: recv_ready(l, c); break;
    default: { /* idle: the server closed it, or sent what nobody asked for */
      char b;
      if (recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) < 0 &&
          (errno == EAGAIN || errno == EWOULDBLOCK))
        break; /* nothing came: an event of the number's last owner (see connected) */
      idle_unlink(l, c);
      conn_close(l, c);
      break;
    }
  }
}

void luapool__hn_timer(lp_hloop *l, lp_hreq *r) {
  double now = luapool__now();
  hconn *c = r->conn;
  if (r->t_limit > 0 && now >= r->t_limit) {
    long ms = (long)((now - r->t_start) * 1000.0);
    if (c && c->state == C_CONNECT)
      connect_timed_out(l, r, ms);
    else if (c && c->size >= 0)
      failf(l, r, CURLE_OPERATION_TIMEDOUT,
            "Operation timed out after %ld milliseconds with %llu out of %lld bytes received", ms,
            (unsigned long long)r->count, (long long)c->size);
    else
      failf(l, r, CURLE_OPERATION_TIMEDOUT,
            "Operation timed out after %ld milliseconds with %llu bytes received", ms,
            (unsigned long long)r->count);
    return;
  }
  if (c && c->state == C_CONNECT) {
    double ct = r->t_start +
                (r->connect_timeout > 0 ? r->connect_timeout : DEFAULT_CONNECT_TIMEOUT_MS / 1000.0);
    if (now >= ct) {
      connect_timed_out(l, r, (long)((now - r->t_start) * 1000.0));
      return;
    }
  }
  if (c && now >= c->ls_mark + (double)LOW_SPEED_TIME_S) {
    /* libcurl's low-speed limit: under 1 byte/s over the whole window (a
    ** trickle of a byte every few seconds does not keep a request alive) */
    if (c->ls_got < (uint64_t)LOW_SPEED_TIME_S) {
      failf(l, r, CURLE_OPERATION_TIMEDOUT,
            "Operation too slow. Less than 1 bytes/sec transferred the last %ld seconds",
            LOW_SPEED_TIME_S);
      return;
    }
    c->ls_mark = now;
    c->ls_got = 0;
  }
  arm(l, r);
}

void luapool__hn_detach(lp_hloop *l, lp_hreq *r) {
  luapool__hl_heap_remove(l, r);
  hconn *c = r->conn;
  r->conn = NULL;
  if (c == NULL) return;
  size_t cap = l->max_conn > IDLE_CONN_MIN ? (size_t)l->max_conn : IDLE_CONN_MIN;
  if (c->state == C_RECV && c->ps == P_DONE && c->keep && !l->closing && l->nidle_conn < cap) {
    c->state = C_IDLE; /* still watched for input: an EOF closes it */
    c->r = NULL;
    c->reused = 0;
    c->prev = NULL;
    c->next = c->host->nidle;
    if (c->next) c->next->prev = c;
    c->host->nidle = c;
    l->nidle_conn++;
    return;
  }
  conn_close(l, c); /* mid-request (aborted, failed) or not reusable */
}

void luapool__hn_free(lp_hloop *l) {
  l->nidle_conn = 0;
  for (size_t i = 0; i < l->nbuckets; i++)
    for (hhost *h = l->buckets[i]; h; h = h->next) {
      for (hconn *c = h->nidle, *n; c; c = n) {
        n = c->next;
        luapool__hl_close_fd(l, c->fd); /* (no loop left to tell: the table goes too) */
        lp_free(c->out);
        lp_free(c);
      }
      h->nidle = NULL;
    }
  lp_free(l->conns);
  l->conns = NULL;
  l->nconns = 0;
  lp_free(l->wbuf);
  l->wbuf = NULL;
}

/* }====== */
