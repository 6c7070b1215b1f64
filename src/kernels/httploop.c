/*
** The HTTP event loop (see httploop.h for the contract).
**
** A request takes the native HTTP/1.1 transport (hnative.c: r->nat, set at
** luapool__hloop_add) or libcurl's, below.  Admission, retries, timers and
** callbacks are this file's for both: start() hands a native attempt to
** luapool__hn_start, which ends it with luapool__hl_attempt_end; its
** descriptors share the epoll set (tagged NATIVE_TAG), its timeouts the
** timer heap (fire_timers tells a running attempt's timer from a retry's
** wait by the request's state).
**
** One libcurl multi handle per loop, driven with curl_multi_socket_action
** on an epoll set, not curl_multi_perform + curl_multi_poll: libcurl 7.88
** (Debian 12) walks every easy handle on each perform and poll call
** (multi_getsock per handle, one pollfd each), so a loop with 5,000
** transfers in flight paid O(5,000) per event; socket_action only touches
** the sockets that are ready and the timers that expired.  An eventfd in
** the same epoll set is the wake-up (luapool__hloop_wakeup).
**
** libcurl 7.88's connection cache is linear in places that run once per
** transfer: a new transfer walks the host's connections for one to reuse,
** a removed handle walks the connections older than its own (looking for a
** CONNECT_ONLY one), and the removal walks the unread messages.  With
** thousands of fresh connections to one host:port that was O(n^2), most of
** the loop's time.  So a loop has several multi handles ("shards", up to
** MAX_SHARDS, each filled to SHARD_CAP transfers before the next is made),
** each with its own cache; a transfer gets CURLOPT_FRESH_CONNECT (no
** search) when our count says no idle connection of its host can be in its
** shard; and the messages are all read before any handle is removed.
**
** Admission is ours, not libcurl's pending queue: each host:port of a
** request's URL has a FIFO of waiting requests, and a request is handed to
** libcurl only when its host has fewer than per_host transfers and the loop
** fewer than max_connections (and, for a loop made with a share of the
** limits, when the share has a slot: counted across its loops, below).  Hosts with waiting requests and room are on a
** "ready" list, served round robin when the total has room, so starting a
** request is O(1) however many wait.  libcurl's own limits are set to the
** same numbers (CURLMOPT_MAX_HOST_CONNECTIONS, _MAX_TOTAL_CONNECTIONS) and
** its connection cache keeps idle connections for reuse (keep-alive across
** requests).  A redirect to another host is counted against the first.
**
** Retries follow curl's --retry: timeouts, connection failures (the
** CURLcodes in retryable_code) and HTTP 408/429/500/502/503/504, for
** idempotent methods unless retry_all, with exponential backoff (base
** retry_delay, doubling, capped at LP_HRETRY_MAX, times a random factor in
** [0.5, 1.5)) or the response's Retry-After (seconds or HTTP-date).  A wait
** is a timer in the loop (a min-heap), never a sleeping thread.  A request
** with a time budget (timeout, or the task's deadline) does not retry when
** the wait would end past it: the last answer (or failure) is its result.
*/
#include <arpa/inet.h> /* inet_pton */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h> /* strncasecmp */
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "base/util.h" /* luapool__now */
#include "base/alloc.h"
#define LUAPOOL_HTTPLOOP_PRIVATE
#include "kernels/httploop.h"

#define lc luapool__lc

/* {====== small helpers */

/* first is the first allocation's size: 256 for headers (a small answer's
** fit), 1024 for bodies. */
int luapool__hl_append(char **buf, size_t *len, size_t *cap, const char *p, size_t n,
                       size_t first) {
  if (n > SIZE_MAX - *len) return -1;
  if (*len + n > *cap) {
    size_t ncap = *cap ? *cap : first;
    while (ncap < *len + n)
      ncap = ncap > SIZE_MAX / 2 ? *len + n : ncap * 2;
    char *nb = lp_realloc(*buf, ncap);
    if (nb == NULL) return -1;
    *buf = nb;
    *cap = ncap;
  }
  memcpy(*buf + *len, p, n);
  *len += n;
  return 0;
}

#define append luapool__hl_append

static char *dupstr(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = lp_malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

static long to_ms(double s) {
  double ms = ceil(s * 1000.0);
  if (ms > (double)INT_MAX) ms = (double)INT_MAX;
  if (ms < 1) ms = 1;
  return (long)ms;
}

/* xorshift64*: jitter only, needs no quality. */
static double rand01(lp_hloop *l) {
  l->rng ^= l->rng >> 12;
  l->rng ^= l->rng << 25;
  l->rng ^= l->rng >> 27;
  return (double)((l->rng * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

/* The message of a request that ran out of descriptors. */
static void fd_message(char *out, size_t sz, int e) {
  struct rlimit rl;
  long long soft = -1, hard = -1;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    soft = rl.rlim_cur == RLIM_INFINITY ? -1 : (long long)rl.rlim_cur;
    hard = rl.rlim_max == RLIM_INFINITY ? -1 : (long long)rl.rlim_max;
  }
  snprintf(out, sz,
           "out of file descriptors (%s): raise RLIMIT_NOFILE (ulimit -n: soft limit %lld, hard "
           "limit %lld) or put fewer requests in flight",
           strerror(e), soft, hard);
}

/* }====== */

/* {====== the timer heap (retry waits) */

static void heap_set(lp_hloop *l, size_t i, lp_hreq *r) {
  r->in_heap = 1;
  l->heap[i] = r;
  r->heap_i = i;
}

static void heap_up(lp_hloop *l, size_t i) {
  lp_hreq *r = l->heap[i];
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (l->heap[p]->wake <= r->wake) break;
    heap_set(l, i, l->heap[p]);
    i = p;
  }
  heap_set(l, i, r);
}

static void heap_down(lp_hloop *l, size_t i) {
  lp_hreq *r = l->heap[i];
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= l->nheap) break;
    if (c + 1 < l->nheap && l->heap[c + 1]->wake < l->heap[c]->wake) c++;
    if (l->heap[c]->wake >= r->wake) break;
    heap_set(l, i, l->heap[c]);
    i = c;
  }
  heap_set(l, i, r);
}

static int heap_push(lp_hloop *l, lp_hreq *r) {
  if (l->nheap == l->heapcap) {
    size_t ncap = l->heapcap ? l->heapcap * 2 : 64;
    lp_hreq **nh = lp_realloc(
        l->heap, ncap * sizeof *nh); // NOLINT(bugprone-sizeof-expression): an array of pointers
    if (nh == NULL) return -1;
    l->heap = nh;
    l->heapcap = ncap;
  }
  heap_set(l, l->nheap++, r);
  heap_up(l, l->nheap - 1);
  return 0;
}

static void heap_remove(lp_hloop *l, lp_hreq *r) {
  size_t i = r->heap_i;
  r->in_heap = 0;
  lp_hreq *last = l->heap[--l->nheap];
  if (i == l->nheap) return;
  heap_set(l, i, last);
  heap_up(l, i);
  heap_down(l, last->heap_i);
}

int luapool__hl_heap_push(lp_hloop *l, lp_hreq *r) { return heap_push(l, r); }
void luapool__hl_heap_remove(lp_hloop *l, lp_hreq *r) {
  if (r->in_heap) heap_remove(l, r);
}

/* }====== */

/* {====== hosts */

static size_t hash(const char *s) {
  size_t h = 2166136261u;
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 16777619u;
  return h;
}

/* "host:port" of url (default port filled in), or "" when libcurl cannot
** parse it (the transfer will then fail with libcurl's own message). */
static char *host_key(const char *url) {
  CURLU *u = lc.url();
  char *host = NULL, *port = NULL, *key = NULL;
  if (u == NULL) return NULL;
  if (lc.url_set(u, CURLUPART_URL, url, CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME) ==
          CURLUE_OK &&
      lc.url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
      lc.url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK) {
    size_t n = strlen(host) + strlen(port) + 2;
    key = lp_malloc(n);
    if (key) {
      snprintf(key, n, "%s:%s", host, port);
      for (char *p = key; *p; p++)
        if (*p >= 'A' && *p <= 'Z') *p = (char)(*p - 'A' + 'a');
    }
  } else {
    key = dupstr("");
  }
  if (host) lc.free(host);
  if (port) lc.free(port);
  lc.url_cleanup(u);
  return key;
}

/* The length of url's "scheme://authority" when both are plain (letters,
** digits, ".-+" in the scheme; letters, digits, ".-_:[]" in the
** authority: no userinfo, no escapes) and a '/', '?', '#' or the end
** follows; else 0.  Two URLs with the same such prefix have the same host
** key, so the parse (8,000 instructions) is done once per run of them. */
static size_t auth_prefix(const char *url) {
  const char *p = url;
  if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z'))) return 0;
  while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
         *p == '+' || *p == '-' || *p == '.')
    p++;
  if (p[0] != ':' || p[1] != '/' || p[2] != '/') return 0;
  p += 3;
  const char *a = p;
  while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
         *p == '.' || *p == '-' || *p == '_' || *p == ':' || *p == '[' || *p == ']')
    p++;
  if (p == a || (*p != '\0' && *p != '/' && *p != '?' && *p != '#')) return 0;
  return (size_t)(p - url);
}

/* {====== limits shared by several loops
**
** The share counts the transfers of every loop made with it: per host:port
** (an hshost, found once per loop's hhost) and in all.  A loop takes a slot
** (admit) before it starts a request from its queue and gives it back
** (release) when the attempt leaves it, both under the share's one mutex,
** held for a few instructions (no loop's own state is touched under it but
** its place in the list of loops to wake).  A loop that finds no slot puts
** the host on its blocked list and itself on the share's list of loops to
** wake: the next release, by any loop, sets their unblock flag and wakes
** them, and each moves its blocked hosts back to its ready list (pump).
** Registering and waking are both under the mutex, so no wake-up is lost.
** A loop alone has no share: its own counters are the limits, no lock.
** Not fair across loops: the loop that frees a slot may take it again
** before the one it woke. */

typedef struct hshost {
  struct hshost *next;
  int active; /* transfers of this host:port in all the loops */
  char key[];
} hshost;

struct lp_hshare {
  pthread_mutex_t mu;
  int per_host, max_conn;
  int total;         /* transfers in all the loops */
  lp_hloop *waiters; /* loops that found no slot since the last release */
  hshost **buckets;
  size_t nbuckets, nhosts;
};

lp_hshare *luapool__hshare_new(int per_host, int max_connections) {
  lp_hshare *s = lp_calloc(1, sizeof *s);
  if (s == NULL) return NULL;
  if (pthread_mutex_init(&s->mu, NULL) != 0) {
    lp_free(s);
    return NULL;
  }
  s->per_host = per_host;
  s->max_conn = max_connections;
  return s;
}

void luapool__hshare_free(lp_hshare *s) {
  if (s == NULL) return;
  for (size_t i = 0; i < s->nbuckets; i++)
    for (hshost *e = s->buckets[i], *n; e; e = n) {
      n = e->next;
      lp_free(e);
    }
  lp_free(s->buckets);
  pthread_mutex_destroy(&s->mu);
  lp_free(s);
}

/* The share's count of host key (made at 0), or NULL when out of memory. */
static hshost *share_host(lp_hshare *s, const char *key) {
  size_t h = hash(key);
  hshost *e = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->nbuckets)
    for (e = s->buckets[h & (s->nbuckets - 1)]; e; e = e->next)
      if (strcmp(e->key, key) == 0) goto out;
  if (s->nhosts >= s->nbuckets) { /* grow: load factor 1 */
    size_t nb = s->nbuckets ? s->nbuckets * 2 : 64;
    hshost **b =
        lp_calloc(nb, sizeof *b); // NOLINT(bugprone-sizeof-expression): an array of pointers
    if (b == NULL) goto out;      /* (e is NULL) */
    for (size_t i = 0; i < s->nbuckets; i++)
      for (hshost *x = s->buckets[i], *n; x; x = n) {
        n = x->next;
        size_t j = hash(x->key) & (nb - 1);
        x->next = b[j];
        b[j] = x;
      }
    lp_free(s->buckets);
    s->buckets = b;
    s->nbuckets = nb;
  }
  size_t klen = strlen(key) + 1;
  e = lp_calloc(1, sizeof *e + klen);
  if (e == NULL) goto out;
  memcpy(e->key, key, klen);
  e->next = s->buckets[h & (s->nbuckets - 1)];
  s->buckets[h & (s->nbuckets - 1)] = e;
  s->nhosts++;
out:
  pthread_mutex_unlock(&s->mu);
  return e;
}

/* A slot for a transfer of h: 1 taken, 0 none (the loop is then woken at
** the next release, by any loop). */
static int admit(lp_hloop *l, hhost *h) {
  lp_hshare *s = l->share;
  pthread_mutex_lock(&s->mu);
  int ok = (s->per_host <= 0 || h->sh->active < s->per_host) &&
           (s->max_conn <= 0 || s->total < s->max_conn);
  if (ok) {
    h->sh->active++;
    s->total++;
  } else if (!l->swaiting) {
    l->swaiting = 1;
    l->swnext = s->waiters;
    s->waiters = l;
  }
  pthread_mutex_unlock(&s->mu);
  return ok;
}

/* Gives r's slot back and wakes the loops that found none (this one too:
** its pump looks at unblock first). */
static void release(lp_hloop *l, lp_hreq *r) {
  lp_hshare *s = l->share;
  if (!r->slot) return;
  r->slot = 0;
  pthread_mutex_lock(&s->mu);
  r->host->sh->active--;
  s->total--;
  lp_hloop *w = s->waiters;
  s->waiters = NULL;
  while (w) {
    lp_hloop *next = w->swnext;
    w->swnext = NULL;
    w->swaiting = 0;
    atomic_store(&w->unblock, 1);
    if (w != l) luapool__hloop_wakeup(w); /* (a loop leaves the list before it is freed) */
    w = next;
  }
  pthread_mutex_unlock(&s->mu);
}

/* Out of the share's list of loops to wake (a loop being freed). */
static void share_leave(lp_hloop *l) {
  lp_hshare *s = l->share;
  pthread_mutex_lock(&s->mu);
  for (lp_hloop **p = &s->waiters; *p; p = &(*p)->swnext)
    if (*p == l) {
      *p = l->swnext;
      break;
    }
  l->swaiting = 0;
  pthread_mutex_unlock(&s->mu);
}

/* }====== */

static hhost *host_get(lp_hloop *l, const char *key) {
  size_t h = hash(key);
  if (l->nbuckets) {
    for (hhost *e = l->buckets[h & (l->nbuckets - 1)]; e; e = e->next)
      if (strcmp(e->key, key) == 0) return e;
  }
  hshost *sh = NULL;
  if (l->share && (sh = share_host(l->share, key)) == NULL) return NULL;
  if (l->nhosts >= l->nbuckets) { /* grow: load factor 1 */
    size_t nb = l->nbuckets ? l->nbuckets * 2 : 64;
    hhost **b =
        lp_calloc(nb, sizeof *b); // NOLINT(bugprone-sizeof-expression): an array of pointers
    if (b == NULL) return NULL;
    for (size_t i = 0; i < l->nbuckets; i++)
      for (hhost *e = l->buckets[i], *n; e; e = n) {
        n = e->next;
        size_t j = hash(e->key) & (nb - 1);
        e->next = b[j];
        b[j] = e;
      }
    lp_free(l->buckets);
    l->buckets = b;
    l->nbuckets = nb;
  }
  size_t klen = strlen(key) + 1;
  hhost *e = lp_calloc(1, sizeof *e + klen);
  if (e == NULL) return NULL;
  memcpy(e->key, key, klen);
  e->sh = sh;
  e->next = l->buckets[h & (l->nbuckets - 1)];
  l->buckets[h & (l->nbuckets - 1)] = e;
  l->nhosts++;
  return e;
}

static int host_room(const lp_hloop *l, const hhost *h) {
  return l->per_host <= 0 || h->active < l->per_host;
}

static int total_room(const lp_hloop *l) {
  return l->max_conn <= 0 || l->in_flight < (size_t)l->max_conn;
}

static void ready_push(lp_hloop *l, hhost *h) {
  if (h->in_ready || h->qh == NULL || !host_room(l, h)) return;
  h->in_ready = 1;
  h->rnext = NULL;
  if (l->ready_t)
    l->ready_t->rnext = h;
  else
    l->ready_h = h;
  l->ready_t = h;
}

static void queue_unlink(lp_hreq *r, lp_hreq **head, lp_hreq **tail) {
  if (r->qprev)
    r->qprev->qnext = r->qnext;
  else
    *head = r->qnext;
  if (r->qnext)
    r->qnext->qprev = r->qprev;
  else
    *tail = r->qprev;
  r->qnext = r->qprev = NULL;
}

static void queue_append(lp_hreq *r, lp_hreq **head, lp_hreq **tail) {
  r->qnext = NULL;
  r->qprev = *tail;
  if (*tail)
    (*tail)->qnext = r;
  else
    *head = r;
  *tail = r;
}

/* }====== */

/* {====== ending requests */

/* The request's result is set: it waits on the finished list for its
** callback (run_finished), so callbacks only run where the contract says. */
static void finish(lp_hloop *l, lp_hreq *r, int result) {
  r->result = result;
  r->t.total = luapool__now() - r->added;
  r->state = R_FINISHED;
  queue_append(r, &l->fin_h, &l->fin_t);
}

static void fail(lp_hloop *l, lp_hreq *r, CURLcode code, const char *msg) {
  r->code = code;
  snprintf(r->err, sizeof r->err, "%s", msg);
  finish(l, r, LP_H_FAILED);
}

/* r leaves the loop: off its list of owned requests, no longer its. */
static void leave(lp_hloop *l, lp_hreq *r) {
  if (r->anext) r->anext->aprev = r->aprev;
  if (r->aprev)
    r->aprev->anext = r->anext;
  else
    l->all = r->anext;
  r->anext = r->aprev = NULL;
  r->state = R_DONE;
  r->loop = NULL;
  l->owned--;
}

/* Runs r's callback now: it leaves the loop. */
static void callback(lp_hloop *l, lp_hreq *r) {
  leave(l, r);
  r->done(r, r->ud); /* r may be freed from here on */
}

static void run_finished(lp_hloop *l) {
  lp_hreq *r;
  while ((r = l->fin_h) != NULL) {
    queue_unlink(r, &l->fin_h, &l->fin_t);
    callback(l, r);
  }
}

/* The URL libcurl starts at, and the redirects it may follow from there
** (a handoff goes on where the native transport stopped). */
static const char *cur_url(const lp_hreq *r) { return r->handoff ? r->hop_url : r->url; }
static int redirs_left(const lp_hreq *r) {
  int n = r->max_redirs - (r->handoff ? r->hops : 0);
  return n > 0 ? n : 0;
}

static long connect_ms(const lp_hreq *r) {
  return r->connect_timeout > 0 ? to_ms(r->connect_timeout) : DEFAULT_CONNECT_TIMEOUT_MS;
}

static hshape shape_of(const lp_hreq *r) {
  hshape sh = {0, 0, 0};
  if (!r->head && !r->has_body && r->hdrs == NULL && strcmp(r->method, "GET") == 0) {
    sh.plain = 1;
    sh.max_redirs = redirs_left(r);
    sh.connect_ms = connect_ms(r);
  }
  return sh;
}

/* e back to the idle list: with r's options kept when r is plain and set
** them all (keep), else reset (options only).  Either way no pointer into
** a dead request stays where libcurl could use it outside a transfer. */
static void easy_recycle(lp_hloop *l, CURL *e, const lp_hreq *r, int keep) {
  if (e == NULL) return;
  if (l->nidle < IDLE_EASY_MAX && !l->closing) {
    hshape sh = keep ? shape_of(r) : (hshape){0, 0, 0};
    if (sh.plain) {
      lc.easy_setopt(e, CURLOPT_PRIVATE, (void *)NULL);
      lc.easy_setopt(e, CURLOPT_ERRORBUFFER, (char *)NULL);
    } else {
      lc.easy_reset(e);
    }
    l->idle_shape[l->nidle] = sh;
    l->idle[l->nidle++] = e;
  } else {
    lc.easy_cleanup(e);
  }
}

/* Takes r out of libcurl (its slot is free again). */
static void detach(lp_hloop *l, lp_hreq *r) {
  hshard *sh = r->shard;
  if (sh == NULL) {
    luapool__hn_detach(l, r); /* native */
  } else {
    lc.multi_remove_handle(sh->multi, r->easy);
    easy_recycle(l, r->easy, r, 1);
    r->easy = NULL;
    r->shard = NULL;
    sh->n--;
    r->host->idle[sh->idx]++; /* its connection may now be idle in that cache */
  }
  r->host->active--;
  l->in_flight--;
  if (l->share) release(l, r);
  ready_push(l, r->host);
}

/* }====== */

/* {====== starting attempts */

static size_t on_body(char *p, size_t sz, size_t n, void *ud) {
  lp_hreq *r = ud;
  size_t len = sz * n;
  r->count += len;
  if (r->count_only) return len;
  if (append(&r->rbody, &r->blen, &r->bcap, p, len, 1024) != 0) {
    r->oom = 1;
    return 0; /* libcurl stops with CURLE_WRITE_ERROR */
  }
  return len;
}

/* One complete header line per call, status lines included: a new status
** line (a redirect, "100 Continue") starts the set over, so only the last
** response's headers are kept. */
static size_t on_header(char *p, size_t sz, size_t n, void *ud) {
  lp_hreq *r = ud;
  size_t len = sz * n;
  if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) r->hlen = 0;
  if (append(&r->hdr, &r->hlen, &r->hcap, p, len, 256) != 0) {
    r->oom = 1;
    return 0;
  }
  return len;
}

/* Every socket close-on-exec (a command a task starts holds no connection),
** and running out of descriptors noted, to be reported as such. */
static void fd_ours(lp_hloop *l, curl_socket_t s);

static curl_socket_t open_socket(void *ud, curlsocktype purpose, struct curl_sockaddr *a) {
  lp_hreq *r = ud;
  (void)purpose;
  int fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
  /* (the native transport's idle connections give way; libcurl's own cache
  ** is bounded by CURLMOPT_MAXCONNECTS) */
  while (fd < 0 && (errno == EMFILE || errno == ENFILE) && luapool__hn_evict_idle(r->loop))
    fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
  if (fd < 0 && (errno == EMFILE || errno == ENFILE)) r->fd_errno = errno;
  if (fd < 0) return CURL_SOCKET_BAD;
  fd_ours(r->loop, fd);
  return fd;
}

/* A connection the closing loop closes (idle in the cache, or aborted with
** the loop) is reset (SO_LINGER of 0), not closed with a FIN: the side that
** sends the first FIN keeps the port in TIME_WAIT for 60 s, so a pool that
** ends with 10,000 kept-alive connections left 10,000 ports of a 28,232-port
** ephemeral range waiting, and the next run's connects landed on them (the
** kernel reuses such a port on loopback: half of a second run of 10,000
** requests ended a second late, TcpExtTWRecycled and PAWS drops).  Nothing
** is in flight on an idle connection, and an aborted one has nothing left
** worth delivering.  A connection closed while the loop runs (the server's
** Connection: close, a failure, a stale one) closes as usual. */
int luapool__hl_close_fd(const lp_hloop *l, int fd) {
  if (l->closing) {
    struct linger now = {1, 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, sizeof now); /* (a plain close if refused) */
  }
  return close(fd);
}

#if LIBCURL_VERSION_NUM >= 0x073b00 /* 7.59: CURLOPT_RESOLVER_START_FUNCTION */
/* Descriptors a host name's resolving takes before open_socket is asked
** for one: libcurl's threaded resolver's socketpair, then the resolver's own
** files (/etc/hosts, a DNS socket). */
#define RESOLVE_FDS 4

/* Whether url's host is an IP address (libcurl asks its resolver-start
** callback for those too, then resolves nothing). */
static int ip_host(const char *url) {
  const char *h = strstr(url, "://");
  h = h ? h + 3 : url;
  size_t n = strcspn(h, "/?#");
  const char *at = memchr(h, '@', n);
  if (at) {
    n -= (size_t)(at + 1 - h);
    h = at + 1;
  }
  if (n > 0 && h[0] == '[') return 1;
  char buf[64];
  size_t hn = strcspn(h, ":/?#");
  if (hn > n) hn = n;
  if (hn == 0 || hn >= sizeof buf) return 0;
  memcpy(buf, h, hn);
  buf[hn] = '\0';
  struct in_addr a;
  return inet_pton(AF_INET, buf, &a) == 1;
}

/* Before libcurl resolves a name: at the descriptor limit, the native idle
** connections give way (as in open_socket), and a request that still finds
** too few fails saying descriptors ran out, not "getaddrinfo() thread failed
** to start".  Probed with dups of the loop's epoll descriptor. */
static int resolver_start(void *resolver_state, void *reserved, void *ud) {
  (void)resolver_state;
  (void)reserved;
  lp_hreq *r = ud;
  if (ip_host(cur_url(r))) return 0;
  int fds[RESOLVE_FDS], n = 0;
  while (n < RESOLVE_FDS) {
    int fd = fcntl(r->loop->ep, F_DUPFD_CLOEXEC, 0);
    if (fd >= 0) {
      fds[n++] = fd;
    } else if ((errno == EMFILE || errno == ENFILE) && luapool__hn_evict_idle(r->loop)) {
      continue;
    } else {
      if (errno == EMFILE || errno == ENFILE) r->fd_errno = errno;
      break;
    }
  }
  while (n > 0)
    close(fds[--n]);
  return 0; /* (libcurl goes on: short of descriptors, it fails, and r->fd_errno names why) */
}
#endif

/* libcurl closes its sockets here (every connection remembers the loop):
** the table forgets the descriptor before its number can be reused. */
static int close_socket(void *ud, curl_socket_t s) {
  lp_hloop *l = ud;
  if (s >= 0 && (size_t)s < l->nfd) l->fdreg[s] = 0;
  return luapool__hl_close_fd(l, s);
}

#define SETOPT(h, opt, val)                                                                        \
  do {                                                                                             \
    CURLcode rc_ = lc.easy_setopt((h), (opt), (val));                                              \
    if (rc_ != CURLE_OK) return rc_;                                                               \
  } while (0)

static CURLcode setup(lp_hreq *r, long timeout_ms) {
  CURL *h = r->easy;
  SETOPT(h, CURLOPT_URL, cur_url(r));
  SETOPT(h, CURLOPT_PRIVATE, (void *)r);
  SETOPT(h, CURLOPT_ERRORBUFFER, r->errbuf);
  /* Signals (SIGALRM for DNS timeouts) are not thread-safe. */
  SETOPT(h, CURLOPT_NOSIGNAL, 1L);
#if LIBCURL_VERSION_NUM >= 0x075500 /* 7.85: the _STR forms */
  SETOPT(h, CURLOPT_PROTOCOLS_STR, "http,https");
  SETOPT(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
  SETOPT(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
  SETOPT(h, CURLOPT_REDIR_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  SETOPT(h, CURLOPT_FOLLOWLOCATION, redirs_left(r) > 0 ? 1L : 0L);
  SETOPT(h, CURLOPT_MAXREDIRS, (long)redirs_left(r));
  SETOPT(h, CURLOPT_ACCEPT_ENCODING, ""); /* all built-in encodings, decoded */
  SETOPT(h, CURLOPT_USERAGENT, USER_AGENT);
  SETOPT(h, CURLOPT_CONNECTTIMEOUT_MS, connect_ms(r));
  SETOPT(h, CURLOPT_TIMEOUT_MS, timeout_ms);
  /* a stalled server cannot hold a request forever */
  SETOPT(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
  SETOPT(h, CURLOPT_LOW_SPEED_TIME, LOW_SPEED_TIME_S);
  SETOPT(h, CURLOPT_WRITEFUNCTION, on_body);
  SETOPT(h, CURLOPT_WRITEDATA, (void *)r);
  SETOPT(h, CURLOPT_HEADERFUNCTION, on_header);
  SETOPT(h, CURLOPT_HEADERDATA, (void *)r);
  if (r->hdrs != NULL) SETOPT(h, CURLOPT_HTTPHEADER, r->hdrs);
  SETOPT(h, CURLOPT_OPENSOCKETFUNCTION, open_socket);
  SETOPT(h, CURLOPT_OPENSOCKETDATA, (void *)r);
  SETOPT(h, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
  SETOPT(h, CURLOPT_CLOSESOCKETDATA, (void *)r->loop);
#if LIBCURL_VERSION_NUM >= 0x073b00
  SETOPT(h, CURLOPT_RESOLVER_START_FUNCTION, resolver_start);
  SETOPT(h, CURLOPT_RESOLVER_START_DATA, (void *)r);
#endif
  if (r->head) {
    SETOPT(h, CURLOPT_NOBODY, 1L);
  } else if (strcmp(r->method, "POST") == 0) {
    SETOPT(h, CURLOPT_POST, 1L);
  } else if (strcmp(r->method, "GET") == 0 && !r->has_body) {
    SETOPT(h, CURLOPT_HTTPGET, 1L);
  } else {
    /* (kept on redirects, unlike POST which a 301/302/303 turns to GET) */
    SETOPT(h, CURLOPT_CUSTOMREQUEST, r->method);
  }
  if (!r->head && (r->has_body || strcmp(r->method, "POST") == 0 || strcmp(r->method, "PUT") == 0 ||
                   strcmp(r->method, "PATCH") == 0)) {
    /* a body, or Content-Length: 0 for a bodyless POST/PUT/PATCH */
    SETOPT(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)r->body_len);
    SETOPT(h, CURLOPT_POSTFIELDS, r->body ? r->body : "");
  }
  return CURLE_OK;
}

/* A handle a plain request of r's shape left: what setup sets that
** differs from one request to the next (FRESH_CONNECT is set by start). */
static CURLcode setup_plain(lp_hreq *r, long timeout_ms) {
  CURL *h = r->easy;
  SETOPT(h, CURLOPT_URL, cur_url(r));
  SETOPT(h, CURLOPT_PRIVATE, (void *)r);
  SETOPT(h, CURLOPT_ERRORBUFFER, r->errbuf);
  SETOPT(h, CURLOPT_TIMEOUT_MS, timeout_ms);
  SETOPT(h, CURLOPT_WRITEDATA, (void *)r);
  SETOPT(h, CURLOPT_HEADERDATA, (void *)r);
  SETOPT(h, CURLOPT_OPENSOCKETDATA, (void *)r);
  SETOPT(h, CURLOPT_CLOSESOCKETDATA, (void *)r->loop);
#if LIBCURL_VERSION_NUM >= 0x073b00
  SETOPT(h, CURLOPT_RESOLVER_START_DATA, (void *)r);
#endif
  return CURLE_OK;
}

static int new_shard(lp_hloop *l);

/* The shard for a transfer of host h: one whose cache may hold an idle
** connection of h (reuse), else the first with fewer than SHARD_CAP
** transfers (a new one made when all are full), else the least loaded;
** *fresh says no idle connection of h can be in it.  Several multi handles
** bound libcurl 7.88's walks over a cache (a removed handle walks the
** connections older than its own, a reuse walks the host's busy ones):
** one cache of 5,000 connections made them O(n^2). */
static hshard *pick_shard(lp_hloop *l, hhost *h, int *fresh) {
  int least = 0;
  *fresh = 0;
  for (int i = 0; i < l->nshards; i++)
    if (h->idle[i] > 0) return &l->shards[i];
  *fresh = 1;
  for (int i = 0; i < l->nshards; i++) {
    if (l->shards[i].n < SHARD_CAP) return &l->shards[i];
    if (l->shards[i].n < l->shards[least].n) least = i;
  }
  if (l->nshards < MAX_SHARDS && new_shard(l) == 0) return &l->shards[l->nshards - 1];
  return &l->shards[least];
}

/* r reached its budget's end (end_by) before an attempt could start (it
** waited in its host's queue for a slot): it ends as an attempt that ran
** out of time does, in libcurl's words, having received nothing. */
static void out_of_time(lp_hloop *l, lp_hreq *r) {
  long ms = (long)((luapool__now() - r->added) * 1000.0);
  r->capped = 1;
  r->code = CURLE_OPERATION_TIMEDOUT;
  r->status = 0;
  r->count = 0;
  r->blen = r->hlen = 0;
  snprintf(r->err, sizeof r->err,
           "%s (Operation timed out after %ld milliseconds with 0 bytes received)",
           lc.easy_strerror(CURLE_OPERATION_TIMEDOUT), ms);
  finish(l, r, r->end_by_task ? LP_H_DEADLINE : LP_H_FAILED);
}

/* Hands r to libcurl (the caller checked the limits), or ends it. */
static void start(lp_hloop *l, lp_hreq *r) {
  long timeout_ms = 0;
  r->capped = 0;
  if (r->end_by > 0) {
    double left = r->end_by - luapool__now();
    if (left <= 0) {
      out_of_time(l, r);
      return;
    }
    timeout_ms = to_ms(left);
    r->capped = 1;
  }
  if (r->nat) {
    r->blen = r->hlen = 0;
    r->count = 0;
    r->errbuf[0] = '\0';
    r->oom = r->fd_errno = 0;
    r->shard = NULL;
    r->attempts++;
    r->state = R_RUNNING;
    r->host->active++;
    l->in_flight++;
    luapool__hn_start(l, r, timeout_ms); /* (may end the attempt at once) */
    return;
  }
  hshape want = shape_of(r), had = {0, 0, 0};
  if (l->nidle) {
    had = l->idle_shape[--l->nidle];
    r->easy = l->idle[l->nidle];
    if (had.plain &&
        (!want.plain || had.max_redirs != want.max_redirs || had.connect_ms != want.connect_ms)) {
      lc.easy_reset(r->easy); /* another shape: from scratch */
      had.plain = 0;
    }
  } else {
    r->easy = lc.easy_init();
  }
  if (r->easy == NULL) {
    fail(l, r, CURLE_OUT_OF_MEMORY, "not enough memory");
    return;
  }
  r->blen = r->hlen = 0;
  r->count = 0;
  r->errbuf[0] = '\0';
  r->oom = r->fd_errno = 0;
  int fresh;
  hshard *sh = pick_shard(l, r->host, &fresh);
  CURLcode rc = had.plain ? setup_plain(r, timeout_ms) : setup(r, timeout_ms);
  /* No connection of this host can be idle in the shard: libcurl need not
  ** search its cache for one (7.88 walks every connection of the host,
  ** O(n) per transfer).  The new connection is still kept for reuse.  (A
  ** kept handle may have it set from its last request.) */
  if (rc == CURLE_OK && (fresh || had.plain))
    rc = lc.easy_setopt(r->easy, CURLOPT_FRESH_CONNECT, fresh ? 1L : 0L);
  if (rc != CURLE_OK) {
    easy_recycle(l, r->easy, r, 0);
    r->easy = NULL;
    fail(l, r, rc, lc.easy_strerror(rc));
    return;
  }
  if (lc.multi_add_handle(sh->multi, r->easy) != CURLM_OK) {
    easy_recycle(l, r->easy, r, 0);
    r->easy = NULL;
    fail(l, r, CURLE_OUT_OF_MEMORY, "not enough memory");
    return;
  }
  if (!fresh) r->host->idle[sh->idx]--; /* (it may find none: then it makes one) */
  r->shard = sh;
  sh->n++;
  if (!r->handoff) r->attempts++;
  r->state = R_RUNNING;
  r->host->active++;
  l->in_flight++;
}

/* A loop of a share was told a slot freed: its blocked hosts try again. */
static void unblock(lp_hloop *l) {
  if (!atomic_exchange(&l->unblock, 0)) return;
  hhost *h = l->blocked;
  l->blocked = NULL;
  while (h) {
    hhost *next = h->bnext;
    h->bnext = NULL;
    h->in_blocked = 0;
    ready_push(l, h);
    h = next;
  }
}

/* Starts what the limits allow, hosts round robin.  With a share, a host
** whose next request finds no slot in it waits on the blocked list. */
static void pump(lp_hloop *l) {
  if (l->share) unblock(l);
  while (!l->closing && l->ready_h != NULL && total_room(l)) {
    hhost *h = l->ready_h;
    l->ready_h = h->rnext;
    if (l->ready_h == NULL) l->ready_t = NULL;
    h->in_ready = 0;
    lp_hreq *r = h->qh;
    if (r == NULL) continue; /* its waiting requests were aborted */
    if (l->share) {
      if (!admit(l, h)) {
        if (!h->in_blocked) {
          h->in_blocked = 1;
          h->bnext = l->blocked;
          l->blocked = h;
        }
        continue;
      }
      r->slot = 1;
    }
    queue_unlink(r, &h->qh, &h->qt);
    if (r->in_heap) heap_remove(l, r); /* its budget's timer (enqueue) */
    start(l, r);
    if (r->state != R_RUNNING && l->share) release(l, r); /* (ended at once) */
    ready_push(l, h);
  }
}

/* A request that must wait for a slot waits no longer than its budget
** (timeout, the task's deadline): a timer of the heap ends it there
** (fire_timers), as one in flight ends, not when a slot frees. */
static void enqueue(lp_hloop *l, lp_hreq *r) {
  r->state = R_QUEUED;
  queue_append(r, &r->host->qh, &r->host->qt);
  ready_push(l, r->host);
  pump(l);
  if (r->state != R_QUEUED || r->end_by <= 0) return;
  r->wake = r->end_by;
  if (heap_push(l, r) != 0) {
    queue_unlink(r, &r->host->qh, &r->host->qt);
    fail(l, r, CURLE_OUT_OF_MEMORY, "not enough memory");
  }
}

/* }====== */

/* {====== the end of an attempt: result or retry */

/* Seconds the response asks to wait (Retry-After), or -1. */
static double retry_after(lp_hreq *r) {
  size_t i = 0;
  while (i < r->hlen) {
    char *line = r->hdr + i;
    char *nl = memchr(line, '\n', r->hlen - i);
    size_t n = nl ? (size_t)(nl - line) : r->hlen - i;
    i += n + (nl != NULL);
    if (n < 12 || strncasecmp(line, "retry-after:", 12) != 0) continue;
    char v[128];
    size_t a = 12, e = n;
    while (a < e && (line[a] == ' ' || line[a] == '\t'))
      a++;
    while (e > a && (line[e - 1] == '\r' || line[e - 1] == ' ' || line[e - 1] == '\t'))
      e--;
    if (e == a || e - a >= sizeof v) return -1;
    memcpy(v, line + a, e - a);
    v[e - a] = '\0';
    if (strspn(v, "0123456789") == e - a) return strtod(v, NULL); /* delay-seconds */
    time_t at = lc.getdate(v, NULL);                              /* HTTP-date */
    if (at == (time_t)-1) return -1;
    double d = difftime(at, time(NULL));
    return d > 0 ? d : 0;
  }
  return -1;
}

/* Transport failures worth another try, as curl --retry (timeouts, DNS)
** plus what --retry-connrefused and a dropped connection add: refused or
** unreachable, reset, nothing or part of an answer. */
static int retryable_code(CURLcode c) {
  switch (c) {
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_CONNECT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM: return 1;
    default: return 0;
  }
}

static int retryable_status(long s) {
  return s == 408 || s == 429 || s == 500 || s == 502 || s == 503 || s == 504;
}

static double us(curl_off_t v) { return (double)v / 1e6; }
static double pos(double v) { return v > 0 ? v : 0; }

static void read_timings(lp_hreq *r) {
  curl_off_t nl = 0, ct = 0, ac = 0, st = 0, tt = 0;
  lc.easy_getinfo(r->easy, CURLINFO_NAMELOOKUP_TIME_T, &nl);
  lc.easy_getinfo(r->easy, CURLINFO_CONNECT_TIME_T, &ct);
  lc.easy_getinfo(r->easy, CURLINFO_APPCONNECT_TIME_T, &ac);
  lc.easy_getinfo(r->easy, CURLINFO_STARTTRANSFER_TIME_T, &st);
  lc.easy_getinfo(r->easy, CURLINFO_TOTAL_TIME_T, &tt);
  /* libcurl's times count from the attempt's start: phases are the
  ** differences (a reused connection has ~0 dns and connect). */
  r->t.dns = us(nl);
  r->t.connect = pos(us(ct) - us(nl));
  r->t.tls = ac > 0 ? pos(us(ac) - us(ct)) : 0;
  r->t.ttfb = st > 0 ? pos(us(st) - us(ac > ct ? ac : ct)) : 0;
  r->t.transfer = us(tt);
}

static void attempt_result(lp_hloop *l, lp_hreq *r, CURLcode code, long status);

static void attempt_done(lp_hloop *l, lp_hreq *r, CURLcode code) {
  long status = 0, oserr = 0;
  char *eff = NULL;
  if (code == CURLE_OK) lc.easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
  lc.easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &eff);
  lc.easy_getinfo(r->easy, CURLINFO_OS_ERRNO, &oserr);
  if (r->fd_errno == 0 && (oserr == EMFILE || oserr == ENFILE)) r->fd_errno = (int)oserr;
  read_timings(r);
  lp_free(r->eff);
  r->eff = eff ? dupstr(eff) : NULL; /* eff lives in the handle */
  if (eff && r->eff == NULL) r->oom = 1;
  detach(l, r);
  if (r->handoff) { /* the next attempt starts native again, at r->url */
    r->handoff = 0;
    r->nat = 1;
  }
  attempt_result(l, r, code, status);
}

void luapool__hl_handoff(lp_hloop *l, lp_hreq *r) {
  luapool__hn_detach(l, r);
  r->host->active--; /* (start counts it again: no ready_push, the slot stays taken) */
  l->in_flight--;
  r->nat = 0;
  r->handoff = 1;
  start(l, r);
  if (r->state != R_RUNNING) {
    r->handoff = 0;
    r->nat = 1;
    if (l->share) release(l, r);
    ready_push(l, r->host);
  }
}

void luapool__hl_attempt_end(lp_hloop *l, lp_hreq *r, CURLcode code) {
  long status = code == CURLE_OK ? r->status : 0;
  detach(l, r);
  attempt_result(l, r, code, status);
}

/* The result of an attempt that left the loop's slot: the answer, or a
** retry's wait. */
static void attempt_result(lp_hloop *l, lp_hreq *r, CURLcode code, long status) {
  int result;
  r->code = code;
  r->status = status;
  if (r->oom) {
    r->code = CURLE_OUT_OF_MEMORY;
    snprintf(r->err, sizeof r->err, "not enough memory");
    result = LP_H_FAILED;
  } else if (code != CURLE_OK && r->fd_errno) {
    fd_message(r->err, sizeof r->err, r->fd_errno);
    result = LP_H_FAILED;
  } else if (code != CURLE_OK) {
    if (r->errbuf[0])
      snprintf(r->err, sizeof r->err, "%s (%s)", lc.easy_strerror(code), r->errbuf);
    else
      snprintf(r->err, sizeof r->err, "%s", lc.easy_strerror(code));
    /* libcurl's clock may fire a little before the task's deadline */
    result = code == CURLE_OPERATION_TIMEDOUT && r->capped && r->end_by_task ? LP_H_DEADLINE
                                                                             : LP_H_FAILED;
  } else {
    r->err[0] = '\0';
    result = LP_H_OK;
  }

  int again = r->attempts <= r->retries && (r->idempotent || r->retry_all) && !r->oom &&
              !r->fd_errno && result != LP_H_DEADLINE &&
              (result == LP_H_OK ? retryable_status(status) : retryable_code(code));
  if (again) {
    double now = luapool__now(), d = result == LP_H_OK ? retry_after(r) : -1;
    if (d < 0) {
      double base = r->retry_delay < 0 ? LP_HRETRY_DELAY : r->retry_delay;
      d = base * ldexp(1.0, r->attempts - 1);
      if (d > LP_HRETRY_MAX) d = LP_HRETRY_MAX;
      d *= 0.5 + rand01(l);
    }
    /* no time left for the wait and another try: this is the answer */
    if (r->end_by > 0 && now + d >= r->end_by) again = 0;
    r->wake = now + d;
    if (again && heap_push(l, r) == 0) {
      r->state = R_WAITING;
      return;
    }
  }
  finish(l, r, result);
}

/* Every message is read before any handle is removed: libcurl 7.88's
** curl_multi_remove_handle walks the messages still unread looking for the
** handle's own, so removing each as it is read cost O(messages left) per
** handle (5,000 sleeps ending in one pass: 12 million steps). */
static void read_messages(lp_hloop *l, hshard *sh) {
  CURLMsg *m;
  int left;
  for (;;) {
    size_t n = 0;
    while (n < LP_MSG_BATCH && (m = lc.multi_info_read(sh->multi, &left)) != NULL) {
      if (m->msg != CURLMSG_DONE) continue;
      char *p = NULL;
      lc.easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, &p);
      if (p == NULL) continue;
      l->msg_req[n] = (lp_hreq *)(void *)p;
      l->msg_code[n++] = m->data.result; /* m dies with the handle's removal */
    }
    if (n == 0) return;
    for (size_t i = 0; i < n; i++)
      attempt_done(l, l->msg_req[i], l->msg_code[i]);
  }
}

static void fire_timers(lp_hloop *l) {
  double now = luapool__now();
  while (l->nheap > 0 && l->heap[0]->wake <= now) {
    lp_hreq *r = l->heap[0];
    heap_remove(l, r);
    if (r->state == R_RUNNING) {
      luapool__hn_timer(l, r);         /* a native attempt's timeout */
    } else if (r->state == R_QUEUED) { /* its budget ended while it waited for a slot */
      queue_unlink(r, &r->host->qh, &r->host->qt);
      out_of_time(l, r);
    } else {
      enqueue(l, r); /* a retry's wait ended */
    }
  }
}

/* }====== */

/* {====== libcurl's socket and timer callbacks */

/* What epoll holds for a descriptor (the loop's table, by descriptor):
** registered, with IN/OUT, whether libcurl watches it now, and whether
** open_socket made it (FD_OURS, fd_ours).  A socket of ours libcurl stops
** watching (REMOVE at each transfer's end, its connection kept alive)
** stays registered for input: the next transfer on it costs
** one MOD or none instead of a DEL, a failed MOD and an ADD.  Should it
** become readable meanwhile (the server closed it), the loop takes it out
** then.  Closing (close_socket) forgets it: epoll drops a closed one. */
enum { FD_IN = 1, FD_OUT = 2, FD_REG = 4, FD_WATCHED = 8, FD_OURS = 16 };

static unsigned char *fd_slot(lp_hloop *l, curl_socket_t s) {
  if (s < 0) return NULL;
  if ((size_t)s >= l->nfd) {
    size_t n = l->nfd ? l->nfd : 1024;
    while (n <= (size_t)s)
      n *= 2;
    unsigned char *t = lp_realloc(l->fdreg, n);
    if (t == NULL) return NULL; /* (then epoll is told everything, as it comes) */
    memset(t + l->nfd, 0, n - l->nfd);
    l->fdreg = t;
    l->nfd = n;
  }
  return &l->fdreg[s];
}

/* A socket open_socket made: libcurl closes it through close_socket, which
** forgets it, so it may stay registered between transfers.  Any other
** descriptor libcurl hands on_socket (its threaded resolver's socket pair)
** it closes itself, after REMOVE: that one is dropped at REMOVE, or a stale
** entry would keep a reused number out of epoll. */
static void fd_ours(lp_hloop *l, curl_socket_t s) {
  unsigned char *st = fd_slot(l, s);
  if (st) *st = FD_OURS;
}

static int on_socket(CURL *e, curl_socket_t s, int what, void *ud, void *sockp) {
  hshard *sh = ud;
  lp_hloop *l = sh->l;
  struct epoll_event ev;
  (void)e, (void)sockp;
  unsigned char *st = fd_slot(l, s);
  memset(&ev, 0, sizeof ev);
  ev.data.u64 = ((uint64_t)(sh->idx + 1) << 32) | (uint32_t)s; /* its shard, from 1 */
  if (what == CURL_POLL_REMOVE) {
    if (st == NULL || !(*st & FD_REG) || !(*st & FD_OURS)) {
      epoll_ctl(l->ep, EPOLL_CTL_DEL, s, NULL); /* (already gone if closed) */
      if (st) *st = *st & FD_OURS;
      return 0;
    }
    *st &= (unsigned char)~FD_WATCHED;
    if (*st & FD_OUT) { /* (level-triggered: writable would wake the loop for ever) */
      ev.events = EPOLLIN;
      if (epoll_ctl(l->ep, EPOLL_CTL_MOD, s, &ev) == 0)
        *st = FD_OURS | FD_REG | FD_IN;
      else
        *st = FD_OURS;
    }
    return 0;
  }
  unsigned want = ((what & CURL_POLL_IN) ? FD_IN : 0u) | ((what & CURL_POLL_OUT) ? FD_OUT : 0u);
  if (st && (*st & FD_REG) && (*st & (FD_IN | FD_OUT)) == want) {
    *st |= FD_WATCHED;
    return 0;
  }
  ev.events = ((want & FD_IN) ? EPOLLIN : 0u) | ((want & FD_OUT) ? EPOLLOUT : 0u);
  int op = st && (*st & FD_REG) ? EPOLL_CTL_MOD : st ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
  int rc = epoll_ctl(l->ep, op, s, &ev);
  /* (no table: a descriptor libcurl closed without REMOVE and reopened is
  ** new to epoll; with one, a stale entry is corrected the same way) */
  if (rc != 0 && op == EPOLL_CTL_MOD && errno == ENOENT)
    rc = epoll_ctl(l->ep, EPOLL_CTL_ADD, s, &ev);
  else if (rc != 0 && op == EPOLL_CTL_ADD && errno == EEXIST)
    rc = epoll_ctl(l->ep, EPOLL_CTL_MOD, s, &ev);
  if (st) *st = (unsigned char)((*st & FD_OURS) | (rc == 0 ? FD_REG | FD_WATCHED | want : 0));
  return 0;
}

static int on_timer(CURLM *m, long ms, void *ud) {
  hshard *sh = ud;
  (void)m;
  sh->timer_at = ms < 0 ? -1 : luapool__now() + (double)ms / 1000.0;
  return 0;
}

/* }====== */

/* {====== the loop */

/* libcurl 7.x makes the multi handle's wake-up socket pair without
** close-on-exec: the AF_UNIX sockets that appeared during multi_init and
** lack the flag get it.  A new descriptor is the lowest free one, so only a
** window above the lowest free descriptor before the call is scanned (a
** loop with 5,000 sockets open would need a scan past them all otherwise);
** other threads' sockets opened meanwhile have the flag already. */
#define FD_WINDOW 64

static CURLM *new_multi(int probe) {
  unsigned char before[FD_WINDOW];
  int lo = fcntl(probe, F_DUPFD_CLOEXEC, 0); /* the lowest free descriptor */
  if (lo >= 0)
    close(lo);
  else
    lo = 0;
  for (int i = 0; i < FD_WINDOW; i++)
    before[i] = fcntl(lo + i, F_GETFD) >= 0;
  CURLM *m = lc.multi_init();
  for (int i = 0; i < FD_WINDOW; i++) {
    int fd = lo + i;
    if (before[i]) continue;
    int fl = fcntl(fd, F_GETFD);
    if (fl < 0 || (fl & FD_CLOEXEC)) continue;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    memset(&ss, 0, sizeof ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 && len >= sizeof ss.ss_family &&
        ss.ss_family == AF_UNIX)
      fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
  }
  return m;
}

/* Adds a shard: 0, or -1 with errno set (EMFILE: out of descriptors). */
static int new_shard(lp_hloop *l) {
  hshard *sh = &l->shards[l->nshards];
  errno = 0;
  sh->multi = new_multi(l->ep);
  if (sh->multi == NULL) return -1;
  sh->l = l;
  sh->idx = l->nshards++;
  sh->timer_at = -1;
  sh->n = 0;
  lc.multi_setopt(sh->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
  lc.multi_setopt(sh->multi, CURLMOPT_SOCKETDATA, (void *)sh);
  lc.multi_setopt(sh->multi, CURLMOPT_TIMERFUNCTION, on_timer);
  lc.multi_setopt(sh->multi, CURLMOPT_TIMERDATA, (void *)sh);
  /* libcurl's limits agree with the admission (never reached by it).  The
  ** cache keeps as many idle connections as may be busy at once, and at
  ** least a full shard's: its default (4 per easy handle in the multi)
  ** shrinks as transfers end, so the connections of the first to end were
  ** closed before the next requests to their host could reuse them. */
  if (l->per_host > 0) lc.multi_setopt(sh->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)l->per_host);
  if (l->max_conn > 0)
    lc.multi_setopt(sh->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)l->max_conn);
  lc.multi_setopt(sh->multi, CURLMOPT_MAXCONNECTS,
                  (long)(l->max_conn > SHARD_CAP ? l->max_conn : SHARD_CAP));
  return 0;
}

lp_hloop *luapool__hloop_new(const lp_hloop_limits *lim, char *err, size_t errsz) {
  lp_hloop *l = lp_calloc(1, sizeof *l);
  if (l == NULL) {
    snprintf(err, errsz, "not enough memory");
    return NULL;
  }
  l->ep = l->ev = -1;
  l->share = lim ? lim->share : NULL;
  l->per_host = l->share ? l->share->per_host : lim ? lim->per_host : 0;
  l->max_conn = l->share ? l->share->max_conn : lim ? lim->max_connections : 0;
  atomic_init(&l->unblock, 0);
  l->rng = (uint64_t)(uintptr_t)l ^ (uint64_t)(luapool__now() * 1e9) ^ 0x9e3779b97f4a7c15ULL;
  if (l->rng == 0) l->rng = 1;
  l->ep = epoll_create1(EPOLL_CLOEXEC);
  if (l->ep >= 0) l->ev = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (l->ep < 0 || l->ev < 0) {
    int e = errno;
    if (e == EMFILE || e == ENFILE)
      fd_message(err, errsz, e);
    else
      snprintf(err, errsz, "cannot make an event loop (%s)", strerror(e));
    goto fail;
  }
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = EPOLLIN;
  ev.data.u64 = (uint32_t)l->ev; /* shard 0: the wake-up */
  if (epoll_ctl(l->ep, EPOLL_CTL_ADD, l->ev, &ev) != 0) {
    snprintf(err, errsz, "cannot make an event loop (%s)", strerror(errno));
    goto fail;
  }
  luapool__hn_init(l);
  if (new_shard(l) != 0) {
    /* (libcurl 7.x makes a socket pair in multi_init) */
    if (errno == EMFILE || errno == ENFILE)
      fd_message(err, errsz, errno);
    else
      snprintf(err, errsz, "not enough memory");
    goto fail;
  }
  return l;
fail:
  if (l->ev >= 0) close(l->ev);
  if (l->ep >= 0) close(l->ep);
  lp_free(l);
  return NULL;
}

void luapool__hloop_add(lp_hloop *l, lp_hreq *r, lp_hdone done, void *ud) {
  double now = luapool__now(), t1 = r->timeout > 0 ? now + r->timeout : 0;
  r->loop = l;
  r->done = done;
  r->ud = ud;
  r->added = now;
  r->result = LP_H_PENDING;
  r->attempts = 0;
  r->end_by = t1;
  r->end_by_task = 0;
  if (r->deadline > 0 && (t1 == 0 || r->deadline <= t1))
    r->end_by = r->deadline, r->end_by_task = 1;
  r->anext = l->all;
  r->aprev = NULL;
  if (l->all) l->all->aprev = r;
  l->all = r;
  l->owned++;
  size_t pre = auth_prefix(r->url);
  if (pre > 0 && l->last_host && pre == l->last_len && memcmp(r->url, l->last_auth, pre) == 0) {
    r->host = l->last_host; /* (hosts live as long as the loop) */
  } else {
    char *key = host_key(r->url);
    r->host = key ? host_get(l, key) : NULL;
    l->last_host = NULL;
    /* (not a URL libcurl could not parse: its key, "", says nothing) */
    if (r->host && key[0] != '\0' && pre > 0 && pre < LAST_AUTH_MAX) {
      memcpy(l->last_auth, r->url, pre);
      l->last_len = pre;
      l->last_host = r->host;
    }
    lp_free(key);
  }
  r->nat = r->host != NULL && luapool__hn_eligible(l, r);
  if (r->host == NULL || l->closing) {
    r->state = R_NEW;
    fail(l, r, CURLE_OUT_OF_MEMORY, l->closing ? "loop closed" : "not enough memory");
    return;
  }
  enqueue(l, r);
}

/* Takes r out of wherever it waits in l (not out of l->all); 1 when it
** was still running or waiting, 0 when it had already ended (R_FINISHED)
** or is not the loop's (-1). */
static int take_out(lp_hloop *l, lp_hreq *r) {
  switch (r->state) {
    case R_QUEUED:
      queue_unlink(r, &r->host->qh, &r->host->qt);
      if (r->in_heap) heap_remove(l, r);
      return 1;
    case R_WAITING: heap_remove(l, r); return 1;
    case R_RUNNING: detach(l, r); return 1;
    case R_FINISHED: queue_unlink(r, &l->fin_h, &l->fin_t); return 0;
    default: return -1;
  }
}

void luapool__hreq_forget(lp_hreq *r) {
  lp_hloop *l = r->loop;
  if (l == NULL || take_out(l, r) < 0) return;
  leave(l, r);
  pump(l);
}

void luapool__hloop_abort(lp_hloop *l, lp_hreq *r, const char *why) {
  int was = take_out(l, r);
  if (was < 0) return; /* not the loop's */
  if (was == 0) {      /* it ended first: its own result stands */
    callback(l, r);
    return;
  }
  r->code = CURLE_ABORTED_BY_CALLBACK;
  snprintf(r->err, sizeof r->err, "%s", why ? why : "aborted");
  r->result = LP_H_ABORTED;
  r->t.total = luapool__now() - r->added;
  callback(l, r);
  pump(l); /* its slot is free */
}

/* libcurl's due timers, shard by shard, and the messages they made: a
** handle just added is due at once (multi_add_handle asks for 0 ms), so
** this sends its request (or starts its connect). */
static void run_due(lp_hloop *l, int all) {
  int running = 0;
  double now = luapool__now();
  for (int i = 0; i < l->nshards; i++) {
    hshard *sh = &l->shards[i];
    if (sh->timer_at >= 0 && now >= sh->timer_at) {
      sh->timer_at = -1; /* (libcurl sets the next one while it runs) */
      lc.multi_socket_action(sh->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    } else if (!all) {
      continue;
    }
    read_messages(l, sh);
  }
}

size_t luapool__hloop_run(lp_hloop *l, double max_wait) {
  struct epoll_event evs[EPOLL_BATCH];
  int running = 0;
  run_finished(l);
  fire_timers(l);
  double now = luapool__now(), wait = max_wait;
  if (l->fin_h) wait = 0;
  for (int i = 0; i < l->nshards; i++) {
    double at = l->shards[i].timer_at;
    if (at >= 0 && at - now < wait) wait = at - now;
  }
  if (l->nheap && l->heap[0]->wake - now < wait) wait = l->heap[0]->wake - now;
  int ms = wait <= 0 ? 0 : wait > 1e6 ? 1000000000 : (int)ceil(wait * 1000.0);
  int n = epoll_wait(l->ep, evs, EPOLL_BATCH, ms);
  for (int i = 0; i < n; i++) {
    int fd = (int)(uint32_t)evs[i].data.u64;
    unsigned si = (unsigned)(evs[i].data.u64 >> 32);
    if (si == NATIVE_TAG) {
      luapool__hn_event(l, fd, evs[i].events);
      if (l->fin_h || l->ready_h) {
        pump(l);
        run_finished(l);
        run_due(l, 0);
      }
      continue;
    }
    if (si == 0) {
      uint64_t v;
      while (read(l->ev, &v, sizeof v) == (ssize_t)sizeof v) {
      }
      atomic_store(&l->woken, 0);
      continue;
    }
    if ((size_t)fd < l->nfd && (l->fdreg[fd] & (FD_REG | FD_WATCHED)) == FD_REG) {
      epoll_ctl(l->ep, EPOLL_CTL_DEL, fd, NULL); /* an idle connection's news: at reuse */
      l->fdreg[fd] = FD_OURS;
      continue;
    }
    int mask = 0;
    if (evs[i].events & EPOLLIN) mask |= CURL_CSELECT_IN;
    if (evs[i].events & EPOLLOUT) mask |= CURL_CSELECT_OUT;
    if (evs[i].events & (EPOLLERR | EPOLLHUP)) mask |= CURL_CSELECT_ERR;
    hshard *sh = &l->shards[si - 1];
    lc.multi_socket_action(sh->multi, fd, mask, &running);
    /* The transfer this event ended, at once: its callback may add the
    ** owner's next request, which goes out now (run_due), not after the
    ** rest of the batch.  A burst of 100 answers used to be read whole
    ** before the first of the next 100 requests was sent (1.4-2 ms per
    ** round at concurrency 100, every round). */
    read_messages(l, sh);
    if (l->fin_h || l->ready_h) {
      pump(l);
      run_finished(l);
      run_due(l, 0);
    }
  }
  run_due(l, 1);
  pump(l); /* into the slots the ended transfers freed */
  fire_timers(l);
  run_finished(l);
  run_due(l, 0); /* what the callbacks added */
  return l->owned;
}

void luapool__hloop_wakeup(lp_hloop *l) {
  if (atomic_exchange(&l->woken, 1)) return; /* one pending write wakes it */
  uint64_t one = 1;
  ssize_t w = write(l->ev, &one, sizeof one);
  (void)w; /* EAGAIN: the counter is full, so it is readable anyway */
}

size_t luapool__hloop_owned(const lp_hloop *l) { return l->owned; }
size_t luapool__hloop_in_flight(const lp_hloop *l) { return l->in_flight; }

void luapool__hloop_free(lp_hloop *l) {
  if (l == NULL) return;
  l->closing = 1; /* aborting frees slots: start nothing in them */
  while (l->all)
    luapool__hloop_abort(l, l->all, "loop closed");
  if (l->share) share_leave(l); /* no loop wakes it from here on */
  luapool__hn_free(l);
  for (int i = 0; i < l->nidle; i++)
    lc.easy_cleanup(l->idle[i]);
  for (int i = 0; i < l->nshards; i++)
    lc.multi_cleanup(l->shards[i].multi); /* closes cached connections (epoll still open) */
  lp_free(l->fdreg);                      /* (after: the closes above update it) */
  for (size_t i = 0; i < l->nbuckets; i++)
    for (hhost *e = l->buckets[i], *n; e; e = n) {
      n = e->next;
      lp_free(e);
    }
  lp_free(l->buckets);
  lp_free(l->heap);
  close(l->ev);
  close(l->ep);
  lp_free(l);
}

/* }====== */

/* {====== requests */

static int is_tchar(int c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

int luapool__http_token(const char *s) {
  if (s[0] == '\0') return 0;
  for (; *s; s++)
    if (!is_tchar((unsigned char)*s)) return 0;
  return 1;
}

lp_hreq *luapool__hreq_new(const lp_hreq_opts *o, char *err, size_t errsz) {
  const char *m = o->method ? o->method : "GET";
  if (!luapool__http_token(m)) {
    snprintf(err, errsz, "method: HTTP token expected");
    return NULL;
  }
  lp_hreq *r = lp_calloc(1, sizeof *r);
  if (r == NULL) goto oom;
  r->state = R_NEW;
  r->url = dupstr(o->url);
  r->method = dupstr(m);
  if (r->url == NULL || r->method == NULL) goto oom;
  for (size_t i = 0; i < o->nheaders; i++) {
    struct curl_slist *s = lc.slist_append(r->hdrs, o->headers[i]);
    if (s == NULL) goto oom; /* (the old list is intact, freed below) */
    r->hdrs = s;
  }
  if (o->body != NULL) {
    r->has_body = 1;
    r->body_len = o->body_len;
    r->body = lp_malloc(o->body_len ? o->body_len : 1);
    if (r->body == NULL) goto oom;
    memcpy(r->body, o->body, o->body_len);
  }
  static const char *const idem[] = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE", NULL};
  for (int i = 0; idem[i]; i++)
    if (strcmp(m, idem[i]) == 0) r->idempotent = 1;
  r->head = strcmp(m, "HEAD") == 0;
  r->timeout = o->timeout;
  r->connect_timeout = o->connect_timeout;
  r->deadline = o->deadline;
  r->retries = o->retries > 0 ? o->retries : 0;
  r->retry_delay = o->retry_delay;
  r->retry_all = o->retry_all;
  r->max_redirs = o->max_redirs > 0 ? o->max_redirs : 0;
  r->count_only = o->count_only;
  return r;
oom:
  luapool__hreq_free(r);
  snprintf(err, errsz, "not enough memory");
  return NULL;
}

void luapool__hreq_free(lp_hreq *r) {
  if (r == NULL) return;
  lp_free(r->url);
  lp_free(r->method);
  if (r->hdrs) lc.slist_free_all(r->hdrs);
  lp_free(r->body);
  lp_free(r->rbody);
  lp_free(r->hdr);
  lp_free(r->eff);
  lp_free(r->hop_url);
  lp_free(r);
}

int luapool__hreq_state(const lp_hreq *r) { return r->result; }
long luapool__hreq_status(const lp_hreq *r) { return r->status; }
const char *luapool__hreq_body(const lp_hreq *r, size_t *len) {
  *len = r->blen;
  return r->blen ? r->rbody : NULL;
}
char *luapool__hreq_take_body(lp_hreq *r, size_t *len) {
  char *b = r->rbody;
  *len = r->blen;
  r->rbody = NULL;
  r->blen = r->bcap = 0;
  return b;
}
uint64_t luapool__hreq_length(const lp_hreq *r) { return r->count; }
const char *luapool__hreq_headers(const lp_hreq *r, size_t *len) {
  *len = r->hlen;
  return r->hlen ? r->hdr : NULL;
}
const char *luapool__hreq_url(const lp_hreq *r) { return r->eff ? r->eff : r->url; }
const char *luapool__hreq_target(const lp_hreq *r) { return r->url; }
const char *luapool__hreq_method(const lp_hreq *r) { return r->method; }
int luapool__hreq_attempts(const lp_hreq *r) { return r->attempts; }
void luapool__hreq_timings(const lp_hreq *r, lp_htimings *t) { *t = r->t; }
const char *luapool__hreq_error(const lp_hreq *r) { return r->err; }
int luapool__hreq_curlcode(const lp_hreq *r) { return (int)r->code; }

/* }====== */
