/*
** HTTP through libcurl: the fetch_length kernel and luapool.http.get.
**
** Each OS thread owns one CURL easy handle and one multi handle that runs
** its transfers, reused request after request: libcurl keeps its
** connection cache, DNS cache and TLS sessions there, so reuse is what
** gives keep-alive.  Handles are never shared between threads, so no
** locking is needed around them.  luapool drives each transfer itself
** (perform), so that a stop ends it within 50 ms whatever the transfer is
** doing: in a task, the task's deadline, its pool's stop or Ctrl-C; in the
** host's main state, Ctrl-C.  Every socket is close-on-exec.
**
** Defaults (both entry points):
**   - connect timeout 30 s; no limit on the whole transfer unless the
**     caller gives one (a large download on a slow link is legitimate);
**   - a transfer that moves less than 1 byte/s for 60 s is aborted, so a
**     stalled server cannot hold a worker forever;
**   - redirects followed, at most 30; only http and https, also for
**     redirect targets (a task URL must not read local files via file://);
**   - Accept-Encoding: every encoding libcurl supports, decoded, so lengths
**     are of the decoded body (like Python requests' len(r.content));
**   - User-Agent: luapool/0.1.
*/
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>

#include "kernels/kernel.h"
#include "kernels/kernels_internal.h"
#include "bind/luapool.h" /* Ctrl-C in the host's main state */

#define USER_AGENT                 "luapool/0.1"
#define MAX_REDIRS                 30L
#define DEFAULT_CONNECT_TIMEOUT_MS 30000L
#define LOW_SPEED_TIME_S           60L
/* libcurl stores timeouts as unsigned int milliseconds: clamp below that. */
#define MAX_TIMEOUT_MS ((double)INT_MAX)

/* {====== libcurl, loaded on first use */

/* libcurl (and through it OpenSSL and some thirty other libraries) is not
** linked: loading and initialising them took most of a script's start-up
** and every process worker's, HTTP or not.  It is dlopen'ed the first time
** something needs it (a fetch, http.get, info().curl), inside one
** pthread_once that also runs curl_global_init: once, before any transfer,
** and never concurrently with itself (it is not thread-safe on old
** libcurls).  The headers still give the types and constants; the
** functions are called through this table.  RTLD_LOCAL: its symbols do not
** leak into the global namespace a script's C modules resolve against. */
static struct {
  CURLcode (*global_init)(long);
  curl_version_info_data *(*version_info)(CURLversion);
  CURL *(*easy_init)(void);
  void (*easy_cleanup)(CURL *);
  void (*easy_reset)(CURL *);
  CURLcode (*easy_setopt)(CURL *, CURLoption, ...);
  CURLcode (*easy_getinfo)(CURL *, CURLINFO, ...);
  const char *(*easy_strerror)(CURLcode);
  CURLM *(*multi_init)(void);
  CURLMcode (*multi_cleanup)(CURLM *);
  CURLMcode (*multi_add_handle)(CURLM *, CURL *);
  CURLMcode (*multi_remove_handle)(CURLM *, CURL *);
  CURLMcode (*multi_perform)(CURLM *, int *);
  CURLMcode (*multi_poll)(CURLM *, struct curl_waitfd[], unsigned int, int, int *);
  CURLMsg *(*multi_info_read)(CURLM *, int *);
  struct curl_slist *(*slist_append)(struct curl_slist *, const char *);
  void (*slist_free_all)(struct curl_slist *);
} lc;

/* Where each pointer of lc comes from. */
#define LC_SYM(f)                                                                                  \
  { "curl_" #f, (void **)&lc.f }
static const struct {
  const char *name;
  void **slot;
} lc_syms[] = {LC_SYM(global_init),   LC_SYM(version_info),     LC_SYM(easy_init),
               LC_SYM(easy_cleanup),  LC_SYM(easy_reset),       LC_SYM(easy_setopt),
               LC_SYM(easy_getinfo),  LC_SYM(easy_strerror),    LC_SYM(multi_init),
               LC_SYM(multi_cleanup), LC_SYM(multi_add_handle), LC_SYM(multi_remove_handle),
               LC_SYM(multi_perform), LC_SYM(multi_poll),       LC_SYM(multi_info_read),
               LC_SYM(slist_append),  LC_SYM(slist_free_all)};

/* The soname of libcurl4 (OpenSSL flavour), whose headers this is built
** with; LUAPOOL_LIBCURL names another build of the same ABI (e.g.
** libcurl-gnutls.so.4) or, in the specs, one that does not exist. */
#define LIBCURL_SONAME "libcurl.so.4"

static pthread_once_t init_once = PTHREAD_ONCE_INIT;
/* Written only inside init_once; pthread_once orders them before any
** reader that returned from pthread_once. */
static int init_status = -1;
/* Why init_status is -1: "cannot load libcurl (DLERROR)" or "cannot
** initialise libcurl". */
static char init_error[512] = "cannot initialise libcurl";
static pthread_key_t handle_key;

/* Loads libcurl and fills lc; 0, or -1 with init_error set.  The handle is
** never closed: libcurl's atexit-time and thread-exit code must stay
** mapped. */
static int load_libcurl(void) {
  const char *name = secure_getenv("LUAPOOL_LIBCURL");
  void *lib;
  if (name == NULL || name[0] == '\0') name = LIBCURL_SONAME;
  dlerror();
  lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    const char *why = dlerror();
    snprintf(init_error, sizeof init_error, "cannot load libcurl (%s)", why ? why : name);
    return -1;
  }
  for (size_t i = 0; i < sizeof lc_syms / sizeof lc_syms[0]; i++) {
    /* (POSIX: a data pointer from dlsym converts to a function pointer) */
    void *f = dlsym(lib, lc_syms[i].name);
    if (f == NULL) {
      const char *why = dlerror();
      snprintf(init_error, sizeof init_error, "cannot load libcurl (%s)",
               why ? why : lc_syms[i].name);
      dlclose(lib);
      memset(&lc, 0, sizeof lc);
      return -1;
    }
    memcpy(lc_syms[i].slot, &f, sizeof f);
  }
  return 0;
}

/* A thread's easy handle and the multi handle that drives it: transfers
** run in luapool's own loop (perform), which looks for stops between
** short polls.  Connections and DNS entries are cached in the multi. */
typedef struct thread_handles {
  CURL *easy;
  CURLM *multi;
} thread_handles;
static _Thread_local thread_handles *thread_curl;

static void handles_free(thread_handles *t) {
  if (t->multi) lc.multi_cleanup(t->multi);
  if (t->easy) lc.easy_cleanup(t->easy);
  free(t);
}

/* pthread key destructor: a worker thread that exits frees its handles. */
static void free_handle(void *h) { handles_free(h); }

static void global_init(void) {
  if (load_libcurl() != 0) return;
  if (lc.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return;
  /* No curl_global_cleanup on failure: the library is never unloaded,
  ** and cleanup is as unsafe to race as init. */
  if (pthread_key_create(&handle_key, free_handle) != 0) return;
  init_status = 0;
}

int luapool__http_global_init(void) {
  pthread_once(&init_once, global_init);
  return init_status;
}

const char *luapool__http_init_error(void) {
  return luapool__http_global_init() == 0 ? NULL : init_error;
}

const char *luapool__curl_version(void) {
  if (luapool__http_global_init() != 0) return "?";
  const curl_version_info_data *v = lc.version_info(CURLVERSION_NOW);
  return v && v->version ? v->version : "?";
}

void luapool__http_thread_cleanup(void) {
  if (thread_curl == NULL) return;
  /* Clear the key first so the thread-exit destructor cannot free it a
  ** second time. */
  pthread_setspecific(handle_key, NULL);
  handles_free(thread_curl);
  thread_curl = NULL;
}

/* Sets close-on-exec on the descriptors opened while curl_multi_init ran:
** libcurl 7.x makes the multi handle's wake-up socket pair without it, and
** a command a task starts must not hold it.  Only new AF_UNIX sockets that
** lack the flag are touched. */
#define FD_SCAN 1024

static void cloexec_new_sockets(const unsigned char *before) {
  for (int fd = 0; fd < FD_SCAN; fd++) {
    if (before[fd]) continue;
    int fl = fcntl(fd, F_GETFD);
    if (fl < 0 || (fl & FD_CLOEXEC)) continue;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    memset(&ss, 0, sizeof ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 && len >= sizeof ss.ss_family &&
        ss.ss_family == AF_UNIX)
      fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
  }
}

static CURLM *new_multi(void) {
  unsigned char before[FD_SCAN];
  for (int fd = 0; fd < FD_SCAN; fd++)
    before[fd] = fcntl(fd, F_GETFD) >= 0;
  CURLM *m = lc.multi_init();
  cloexec_new_sockets(before);
  return m;
}

/* The calling thread's handles, the easy one with every option at its
** default, or NULL with *why set (libcurl could not be loaded or
** initialised, or out of memory).
** Each request ends with release_handle; the reset here is for a request
** that was cut short by a Lua error before it could release. */
static thread_handles *thread_handle(const char **why) {
  thread_handles *t;
  *why = "cannot initialise libcurl";
  if (thread_curl != NULL) {
    /* Options only: live connections and caches survive a reset. */
    lc.easy_reset(thread_curl->easy);
    return thread_curl;
  }
  /* The first use in the process loads libcurl; later ones only check. */
  const char *load_error = luapool__http_init_error();
  if (load_error != NULL) {
    *why = load_error;
    return NULL;
  }
  t = calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  t->easy = lc.easy_init();
  t->multi = t->easy ? new_multi() : NULL;
  if (t->multi == NULL || pthread_setspecific(handle_key, t) != 0) {
    handles_free(t);
    return NULL;
  }
  thread_curl = t;
  return t;
}

/* Ends a request: drops every option, in particular the pointers into the
** caller's stack frame and buffers (error buffer, write targets, header
** list), so the idle handle points at nothing that dies.  Connections and
** caches survive a reset. */
static void release_handle(thread_handles *t) { lc.easy_reset(t->easy); }

/* }====== */

/* {====== request setup shared by both entry points */

typedef struct req_opts {
  long timeout_ms;         /* whole transfer; 0: none */
  long connect_timeout_ms; /* 0: libcurl's default would apply; never 0 */
  int follow;
  struct curl_slist *headers;
  const lp_interrupt *interrupt; /* the task's stop (NULL: not in a task) */
  int main_signal;               /* in the host's main state: Ctrl-C stops it */
} req_opts;

/* Is the transfer to stop?  The task's stop (deadline, closing pool,
** Ctrl-C), or in the host's main state a signal waiting to be delivered. */
static int stop_wanted(const req_opts *o) {
  return luapool__interrupted(o->interrupt) || (o->main_signal && luapool__signal_for_me());
}

/* How often the transfer loop looks for a stop. */
#define POLL_MS 50

/* Runs the easy handle's transfer on the thread's multi handle, looking
** for a stop every POLL_MS whatever the transfer does: a stop ends it with
** CURLE_ABORTED_BY_CALLBACK; else the transfer's own result. */
static CURLcode perform(thread_handles *t, const req_opts *o) {
  CURLcode rc = CURLE_OK;
  if (lc.multi_add_handle(t->multi, t->easy) != CURLM_OK) return CURLE_OUT_OF_MEMORY;
  for (;;) {
    int running = 0;
    CURLMcode mc = lc.multi_perform(t->multi, &running);
    if (mc != CURLM_OK) {
      rc = mc == CURLM_OUT_OF_MEMORY ? CURLE_OUT_OF_MEMORY : CURLE_FAILED_INIT;
      break;
    }
    if (running == 0) {
      int left;
      CURLMsg *m;
      rc = CURLE_FAILED_INIT; /* no message: should not happen */
      while ((m = lc.multi_info_read(t->multi, &left)) != NULL)
        if (m->msg == CURLMSG_DONE && m->easy_handle == t->easy) rc = m->data.result;
      break;
    }
    if (stop_wanted(o)) {
      rc = CURLE_ABORTED_BY_CALLBACK;
      break;
    }
    mc = lc.multi_poll(t->multi, NULL, 0, POLL_MS, NULL);
    if (mc != CURLM_OK && mc != CURLM_UNRECOVERABLE_POLL) {
      rc = CURLE_FAILED_INIT;
      break;
    }
  }
  lc.multi_remove_handle(t->multi, t->easy);
  return rc;
}

/* OPENSOCKETFUNCTION: every socket libcurl connects with is close-on-exec,
** so a command started by a task (os.execute, io.popen) never holds a
** connection open. */
static curl_socket_t open_socket(void *p, curlsocktype purpose, struct curl_sockaddr *a) {
  (void)p, (void)purpose;
  return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

#define SETOPT(h, opt, val)                                                                        \
  do {                                                                                             \
    CURLcode rc_ = lc.easy_setopt((h), (opt), (val));                                              \
    if (rc_ != CURLE_OK) return rc_;                                                               \
  } while (0)

static CURLcode setup(CURL *h, const char *url, const req_opts *o, char *errbuf,
                      curl_write_callback body_fn, void *body_data) {
  SETOPT(h, CURLOPT_URL, url);
  SETOPT(h, CURLOPT_ERRORBUFFER, errbuf);
  /* Signals (SIGALRM for DNS timeouts) are not thread-safe. */
  SETOPT(h, CURLOPT_NOSIGNAL, 1L);
  SETOPT(h, CURLOPT_HTTPGET, 1L);
#if LIBCURL_VERSION_NUM >= 0x075500 /* 7.85: the _STR forms */
  SETOPT(h, CURLOPT_PROTOCOLS_STR, "http,https");
  SETOPT(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#else
  SETOPT(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
  SETOPT(h, CURLOPT_REDIR_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  SETOPT(h, CURLOPT_FOLLOWLOCATION, o->follow ? 1L : 0L);
  SETOPT(h, CURLOPT_MAXREDIRS, MAX_REDIRS);
  SETOPT(h, CURLOPT_ACCEPT_ENCODING, ""); /* all built-in encodings */
  SETOPT(h, CURLOPT_USERAGENT, USER_AGENT);
  SETOPT(h, CURLOPT_CONNECTTIMEOUT_MS, o->connect_timeout_ms);
  SETOPT(h, CURLOPT_TIMEOUT_MS, o->timeout_ms);
  SETOPT(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
  SETOPT(h, CURLOPT_LOW_SPEED_TIME, LOW_SPEED_TIME_S);
  SETOPT(h, CURLOPT_WRITEFUNCTION, body_fn);
  SETOPT(h, CURLOPT_WRITEDATA, body_data);
  if (o->headers != NULL) SETOPT(h, CURLOPT_HTTPHEADER, o->headers);
  SETOPT(h, CURLOPT_OPENSOCKETFUNCTION, open_socket);
  return CURLE_OK;
}

/* Seconds to libcurl milliseconds, rounding up so that a tiny positive
** timeout never becomes 0 (which means "no timeout" to libcurl). */
static long seconds_to_ms(double s) {
  double ms = ceil(s * 1000.0);
  if (ms > MAX_TIMEOUT_MS) ms = MAX_TIMEOUT_MS;
  if (ms < 1) ms = 1;
  return (long)ms;
}

/* "REASON" or "REASON (DETAIL)" for a failed transfer. */
static const char *reason_detail(const char *errbuf) { return errbuf[0] != '\0' ? errbuf : NULL; }

/* }====== */

/* {====== fetch_length kernel */

/* Counts body bytes without keeping them. */
static size_t count_body(char *ptr, size_t size, size_t nmemb, void *p) {
  uint64_t *count = p;
  (void)ptr;
  *count += (uint64_t)size * nmemb;
  return size * nmemb;
}

int luapool__fetch_length_run(lp_kcall *c) {
  static const char kname[] = "fetch_length";
  const lp_value *a1 = c->nargs >= 1 ? &c->args[0] : NULL;
  const lp_value *a2 = c->nargs >= 2 ? &c->args[1] : NULL;
  /* Outside a task (no interrupt block), Ctrl-C on the host stops it. */
  req_opts o = {0, DEFAULT_CONNECT_TIMEOUT_MS, 1, NULL, c->interrupt, c->interrupt == NULL};
  char errbuf[CURL_ERROR_SIZE];
  char *url;
  uint64_t count = 0;
  long status = 0;
  CURLcode rc;
  thread_handles *h;
  const char *why;

  if (a1 == NULL || a1->type != LP_STR) return luapool__kargerr(c, kname, 1, "string");
  if (memchr(a1->u.s.p, '\0', a1->u.s.len) != NULL)
    return luapool__kargmsg(c, kname, 1, "URL contains a zero byte");
  if (a2 != NULL && a2->type != LP_NIL) {
    double t;
    char got[64];
    switch (a2->type) {
      case LP_INT: t = (double)a2->u.i; break;
      case LP_NUM: t = a2->u.n; break;
      case LP_INT128: t = (double)a2->u.big; break;
      default: return luapool__kargerr(c, kname, 2, "number");
    }
    if (!(t > 0)) /* also rejects NaN */
      return luapool__kargmsg(c, kname, 2, "positive number expected, got %s",
                              luapool__knumfmt(a2, got, sizeof got));
    o.timeout_ms = seconds_to_ms(t);
  }

  int capped = 0;        /* the transfer's timeout is the task's deadline */
  if (c->deadline > 0) { /* the task's deadline caps the transfer too */
    long left = seconds_to_ms(c->deadline - luapool__now());
    if (o.timeout_ms == 0 || left < o.timeout_ms) o.timeout_ms = left, capped = 1;
  }
  if (luapool__interrupted(o.interrupt))
    return luapool__kerr(c, "fetch_length: %.*s: interrupted",
                         (int)(a1->u.s.len > 512 ? 512 : a1->u.s.len), a1->u.s.p);

  /* LP_STR bytes are not guaranteed to be NUL-terminated (they may point
  ** into a message buffer); libcurl wants a C string. */
  url = malloc(a1->u.s.len + 1);
  if (url == NULL)
    return luapool__kerr(c, "fetch_length: %.*s: not enough memory",
                         (int)(a1->u.s.len > 512 ? 512 : a1->u.s.len), a1->u.s.p);
  memcpy(url, a1->u.s.p, a1->u.s.len);
  url[a1->u.s.len] = '\0';

  h = thread_handle(&why);
  if (h == NULL) {
    luapool__kerr(c, "fetch_length: %s: %s", url, why);
    free(url);
    return -1;
  }
  errbuf[0] = '\0';
  rc = setup(h->easy, url, &o, errbuf, count_body, &count);
  if (rc == CURLE_OK) rc = perform(h, &o);
  if (rc == CURLE_OK) rc = lc.easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &status);
  release_handle(h);

  if (rc != CURLE_OK) {
    const char *detail = reason_detail(errbuf);
    /* libcurl's clock may fire a little before luapool's: the task's
    ** deadline ended it, and its worker must know (kind "timeout"). */
    if (rc == CURLE_OPERATION_TIMEDOUT && capped) luapool__stop_self(c->interrupt);
    /* (in the host's main state, its Lua face then raises the signal) */
    if (rc == CURLE_ABORTED_BY_CALLBACK)
      luapool__kerr(c, "fetch_length: %s: interrupted", url);
    else if (detail != NULL)
      luapool__kerr(c, "fetch_length: %s: %s (%s)", url, lc.easy_strerror(rc), detail);
    else
      luapool__kerr(c, "fetch_length: %s: %s", url, lc.easy_strerror(rc));
    free(url);
    return -1;
  }
  free(url);

  c->out[0].type = LP_INT;
  c->out[0].tname = "number";
  c->out[0].u.i = count > (uint64_t)LUA_MAXINTEGER ? LUA_MAXINTEGER : (lua_Integer)count;
  c->out[1].type = LP_INT;
  c->out[1].tname = "number";
  c->out[1].u.i = status;
  c->nout = 2;
  return 0;
}

/* }====== */

/* {====== luapool.http.get */

/* C memory of one http.get call, owned by a userdata on the Lua stack so
** that a Lua error at any point (bad option, memory error while building
** the result) cannot leak it: __gc frees whatever is left. */
typedef struct get_box {
  char *body;
  size_t len, cap;
  char *hdr; /* raw header lines of the last response */
  size_t hlen, hcap;
  struct curl_slist *headers; /* request headers */
  char *eff;                  /* effective URL, copied out of the handle */
  int oom;                    /* a callback failed to grow a buffer */
} get_box;

#define GET_BOX_MT "luapool.http.getbuffer"

static void box_free(get_box *b) {
  free(b->body);
  free(b->hdr);
  if (b->headers) lc.slist_free_all(b->headers);
  free(b->eff);
  b->body = b->hdr = b->eff = NULL;
  b->headers = NULL;
  b->len = b->cap = b->hlen = b->hcap = 0;
}

static int box_gc(lua_State *L) {
  box_free(luaL_checkudata(L, 1, GET_BOX_MT));
  return 0;
}

/* Appends n bytes to a growable buffer; 0 on success, -1 out of memory. */
static int buf_append(char **buf, size_t *len, size_t *cap, const char *p, size_t n) {
  if (n > SIZE_MAX - *len) return -1;
  if (*len + n > *cap) {
    size_t ncap = *cap ? *cap : 16384;
    char *nb;
    while (ncap < *len + n) {
      if (ncap > SIZE_MAX / 2) {
        ncap = *len + n;
        break;
      }
      ncap *= 2;
    }
    nb = realloc(*buf, ncap);
    if (nb == NULL) return -1;
    *buf = nb;
    *cap = ncap;
  }
  memcpy(*buf + *len, p, n);
  *len += n;
  return 0;
}

static size_t box_body(char *ptr, size_t size, size_t nmemb, void *p) {
  get_box *b = p;
  size_t n = size * nmemb;
  if (buf_append(&b->body, &b->len, &b->cap, ptr, n) != 0) {
    b->oom = 1;
    return 0; /* makes libcurl stop with CURLE_WRITE_ERROR */
  }
  return n;
}

/* libcurl hands over one complete header line per call, the status line of
** every response included: a new status line (after a redirect or a
** "100 Continue") starts the set over, so only the last response's headers
** are kept. */
static size_t box_header(char *ptr, size_t size, size_t nmemb, void *p) {
  get_box *b = p;
  size_t n = size * nmemb;
  if (n >= 5 && memcmp(ptr, "HTTP/", 5) == 0) b->hlen = 0;
  if (buf_append(&b->hdr, &b->hlen, &b->hcap, ptr, n) != 0) {
    b->oom = 1;
    return 0;
  }
  return n;
}

/* opts[field] as milliseconds, or dflt when absent. */
static long opt_seconds(lua_State *L, const char *field, long dflt) {
  long ms = dflt;
  int t = lua_getfield(L, 2, field);
  if (t != LUA_TNIL) {
    int isnum;
    lua_Number s = lua_tonumberx(L, -1, &isnum);
    if (t != LUA_TNUMBER || !isnum || !(s > 0)) {
      const char *msg = lua_pushfstring(L, "opts.%s: positive number expected", field);
      luaL_argerror(L, 2, msg);
    }
    ms = seconds_to_ms(s);
  }
  lua_pop(L, 1);
  return ms;
}

/* Header text must not smuggle extra lines into the request. */
static int bad_header_text(const char *s, size_t len) {
  return memchr(s, '\r', len) != NULL || memchr(s, '\n', len) != NULL ||
         memchr(s, '\0', len) != NULL;
}

static void add_header(lua_State *L, get_box *b, const char *line) {
  struct curl_slist *l = lc.slist_append(b->headers, line);
  /* On failure the old list is untouched and still owned by the box. */
  if (l == NULL) luaL_error(L, "not enough memory");
  b->headers = l;
}

/* opts.headers: {["Name"] = "value", ...} and/or {"Name: value", ...}. */
static void opt_headers(lua_State *L, get_box *b) {
  int t = lua_getfield(L, 2, "headers");
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (t != LUA_TTABLE) luaL_argerror(L, 2, "opts.headers: table expected");
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    size_t vlen;
    const char *v;
    /* Type checks before lua_tolstring: converting a number in place is
    ** only safe for the value, never for the key lua_next needs. */
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
      luaL_argerror(L, 2, "opts.headers: values must be strings");
    v = lua_tolstring(L, -1, &vlen);
    if (bad_header_text(v, vlen))
      luaL_argerror(L, 2, "opts.headers: line break or zero in a header");
    if (lua_type(L, -2) == LUA_TSTRING) {
      size_t klen;
      const char *k = lua_tolstring(L, -2, &klen);
      if (klen == 0 || bad_header_text(k, klen) || memchr(k, ':', klen))
        luaL_argerror(L, 2, "opts.headers: invalid header name");
      add_header(L, b, lua_pushfstring(L, "%s: %s", k, v));
      lua_pop(L, 1);
    } else if (lua_isinteger(L, -2)) {
      if (memchr(v, ':', vlen) == NULL)
        luaL_argerror(L, 2, "opts.headers: 'Name: value' string expected");
      add_header(L, b, v);
    } else {
      luaL_argerror(L, 2, "opts.headers: invalid key");
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static int ascii_lower(int ch) { return ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch; }

/* Pushes a table of the kept header lines: lowercased name -> value, the
** last occurrence of a name winning. */
static void push_headers(lua_State *L, get_box *b) {
  size_t i = 0;
  lua_newtable(L);
  while (i < b->hlen) {
    char *line = b->hdr + i;
    char *nl = memchr(line, '\n', b->hlen - i);
    size_t n = nl ? (size_t)(nl - line) : b->hlen - i;
    char *colon = memchr(line, ':', n);
    i += n + (nl != NULL);
    /* Skips the status line, the blank end line and folded continuations
    ** (obsolete in HTTP/1.1). */
    if (colon == NULL || colon == line || line[0] == ' ' || line[0] == '\t') continue;
    {
      char *v = colon + 1, *e = line + n;
      for (char *q = line; q < colon; q++)
        *q = (char)ascii_lower(*q);
      while (v < e && (*v == ' ' || *v == '\t'))
        v++;
      while (e > v && (e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t'))
        e--;
      lua_pushlstring(L, line, (size_t)(colon - line));
      lua_pushlstring(L, v, (size_t)(e - v));
      lua_rawset(L, -3);
    }
  }
}

/* Every key of the options table at 2 must be a known option. */
static void check_option_names(lua_State *L) {
  static const char *const known[] = {"timeout", "connect_timeout", "headers", "follow", NULL};
  lua_pushnil(L);
  while (lua_next(L, 2) != 0) {
    lua_pop(L, 1);
    int ok = 0;
    if (lua_type(L, -1) == LUA_TSTRING)
      for (int i = 0; known[i] && !ok; i++)
        ok = strcmp(lua_tostring(L, -1), known[i]) == 0;
    if (!ok) {
      /* (a copy: luaL_tolstring on the key itself would confuse lua_next) */
      lua_pushvalue(L, -1);
      luaL_error(L, "unknown option '%s' to 'get'", luaL_tolstring(L, -1, NULL));
    }
  }
}

int luapool__http_get(lua_State *L) {
  size_t ulen;
  /* A string, never a number: luaL_checklstring would turn 5 into "5",
  ** which libcurl reads as the address 0.0.0.5. */
  if (lua_type(L, 1) != LUA_TSTRING) luaL_typeerror(L, 1, "string");
  const char *url = lua_tolstring(L, 1, &ulen);
  double deadline;
  const lp_interrupt *intr = luapool__lua_interrupt(L, &deadline);
  /* In a task its stop and deadline apply; outside one, Ctrl-C on the host. */
  req_opts o = {0, DEFAULT_CONNECT_TIMEOUT_MS, 1, NULL, intr, intr == NULL};
  char errbuf[CURL_ERROR_SIZE];
  long status = 0;
  curl_off_t total_us = 0;
  char *eff = NULL; /* owned by the handle */
  get_box *b;
  CURLcode rc;
  thread_handles *h;
  const char *why;

  luaL_argcheck(L, strlen(url) == ulen, 1, "URL contains a zero byte");
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    check_option_names(L);
  }
  lua_settop(L, 2);
  /* Loaded before the options are read: the header list is libcurl's. */
  if ((why = luapool__http_init_error()) != NULL) {
    luaL_pushfail(L);
    lua_pushfstring(L, "GET %s: %s", url, why);
    return 2;
  }

  b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  if (luaL_newmetatable(L, GET_BOX_MT)) {
    lua_pushcfunction(L, box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);

  if (lua_istable(L, 2)) {
    o.timeout_ms = opt_seconds(L, "timeout", 0);
    o.connect_timeout_ms = opt_seconds(L, "connect_timeout", DEFAULT_CONNECT_TIMEOUT_MS);
    if (lua_getfield(L, 2, "follow") != LUA_TNIL) {
      if (!lua_isboolean(L, -1)) luaL_argerror(L, 2, "opts.follow: boolean expected");
      o.follow = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    opt_headers(L, b);
    o.headers = b->headers;
  }
  int capped = 0;     /* the transfer's timeout is the task's deadline */
  if (deadline > 0) { /* the task's deadline caps the transfer too */
    long left = seconds_to_ms(deadline - luapool__now());
    if (o.timeout_ms == 0 || left < o.timeout_ms) o.timeout_ms = left, capped = 1;
  }
  if (stop_wanted(&o)) {
    box_free(b);
    if (intr == NULL) luapool__check_signal(L);
    return luaL_error(L, "GET %s: interrupted", url);
  }

  h = thread_handle(&why);
  if (h == NULL) {
    box_free(b);
    luaL_pushfail(L);
    lua_pushfstring(L, "GET %s: %s", url, why);
    return 2;
  }
  errbuf[0] = '\0';
  rc = setup(h->easy, url, &o, errbuf, box_body, b);
  if (rc == CURLE_OK) rc = lc.easy_setopt(h->easy, CURLOPT_HEADERFUNCTION, box_header);
  if (rc == CURLE_OK) rc = lc.easy_setopt(h->easy, CURLOPT_HEADERDATA, b);
  if (rc == CURLE_OK) rc = perform(h, &o);
  if (rc == CURLE_OK) rc = lc.easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &status);
  if (rc == CURLE_OK) rc = lc.easy_getinfo(h->easy, CURLINFO_EFFECTIVE_URL, &eff);
  if (rc == CURLE_OK) rc = lc.easy_getinfo(h->easy, CURLINFO_TOTAL_TIME_T, &total_us);
  /* eff lives in the handle: copy it before the reset (NULL copy: use the
  ** requested URL). */
  if (rc == CURLE_OK && eff != NULL && (b->eff = strdup(eff)) == NULL) {
    b->oom = 1;
    rc = CURLE_OUT_OF_MEMORY;
  }
  release_handle(h);

  if (rc != CURLE_OK) {
    const char *detail = reason_detail(errbuf);
    int oom = b->oom;
    box_free(b); /* before anything that could raise */
    /* Stopped (Ctrl-C in the main state; in a task its stop or its
    ** deadline): an error, as fetch_length's, not a failed request the
    ** task could take for an answer.  The deadline marks the task stopped
    ** by it, so its worker reports the timeout. */
    if (rc == CURLE_ABORTED_BY_CALLBACK) {
      if (intr == NULL) luapool__check_signal(L);
      return luaL_error(L, "GET %s: interrupted", url);
    }
    if (rc == CURLE_OPERATION_TIMEDOUT && capped) {
      luapool__stop_self(intr);
      return luaL_error(L, "GET %s: %s", url, lc.easy_strerror(rc));
    }
    luaL_pushfail(L);
    if (oom)
      lua_pushfstring(L, "GET %s: not enough memory", url);
    else if (detail != NULL)
      lua_pushfstring(L, "GET %s: %s (%s)", url, lc.easy_strerror(rc), detail);
    else
      lua_pushfstring(L, "GET %s: %s", url, lc.easy_strerror(rc));
    return 2;
  }

  lua_createtable(L, 0, 5);
  lua_pushinteger(L, status);
  lua_setfield(L, -2, "status");
  lua_pushlstring(L, b->body ? b->body : "", b->len);
  lua_setfield(L, -2, "body");
  free(b->body); /* the Lua copy exists: release the big buffer early */
  b->body = NULL;
  b->len = b->cap = 0;
  push_headers(L, b);
  lua_setfield(L, -2, "headers");
  lua_pushstring(L, b->eff ? b->eff : url);
  lua_setfield(L, -2, "url");
  lua_pushnumber(L, (lua_Number)total_us / 1e6);
  lua_setfield(L, -2, "time");
  box_free(b);
  return 1;
}

/* }====== */
