/*
** HTTP through libcurl: the fetch_length kernel, luapool.http.get and
** luapool.http.request.
**
** All three run through the event loop of httploop.c: each OS thread has a
** private loop (created on first use, freed at thread exit), on which a
** blocking call adds its one request and runs the loop until it ends, so
** retries, admission, keep-alive and result building have one
** implementation, shared with the iopool engine's loops.  The loop's multi
** handle keeps libcurl's connection cache, DNS cache and TLS sessions, so
** reuse across calls is what gives keep-alive.  Loops are never shared
** between threads, so no locking is needed around them.  The blocking
** caller runs the loop in 50 ms slices and looks for a stop in between, so
** a stop ends a transfer or a retry wait within 50 ms: in a task, the
** task's deadline, its pool's stop or Ctrl-C; in the host's main state,
** Ctrl-C.  Every socket is close-on-exec.
**
** Defaults (every entry point):
**   - connect timeout 30 s; no limit on the whole transfer unless the
**     caller gives one (a large download on a slow link is legitimate);
**   - a transfer that moves less than 1 byte/s for 60 s is aborted, so a
**     stalled server cannot hold a worker forever;
**   - redirects followed, at most 30; only http and https, also for
**     redirect targets (a task URL must not read local files via file://);
**   - Accept-Encoding: every encoding libcurl supports, decoded, so lengths
**     are of the decoded body (like Python requests' len(r.content));
**   - User-Agent: luapool/0.1;
**   - no retries (http.request: retries = N).
*/
#include <dlfcn.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <lauxlib.h>
#include <lua.h>

#include "base/alloc.h"
#include "kernels/httploop.h"
#include "kernels/kernel.h"
#include "kernels/kernels_internal.h"
#include "base/ctrlc.h" /* Ctrl-C in the host's main state */

#define lc luapool__lc

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
lp_curl_api luapool__lc;

/* Where each pointer of lc comes from. */
#define LC_SYM(f)                                                                                  \
  { "curl_" #f, (void **)&lc.f }
static const struct {
  const char *name;
  void **slot;
} lc_syms[] = {LC_SYM(global_init),
               LC_SYM(version_info),
               LC_SYM(easy_init),
               LC_SYM(easy_cleanup),
               LC_SYM(easy_reset),
               LC_SYM(easy_setopt),
               LC_SYM(easy_getinfo),
               LC_SYM(easy_strerror),
               LC_SYM(multi_init),
               LC_SYM(multi_cleanup),
               LC_SYM(multi_setopt),
               LC_SYM(multi_add_handle),
               LC_SYM(multi_remove_handle),
               LC_SYM(multi_socket_action),
               LC_SYM(multi_info_read),
               LC_SYM(slist_append),
               LC_SYM(slist_free_all),
               LC_SYM(url),
               LC_SYM(url_cleanup),
               LC_SYM(url_set),
               LC_SYM(url_get),
               LC_SYM(free),
               LC_SYM(getdate)};

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
static pthread_key_t loop_key;

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
  /* optional: the texts of the URL API's codes (the native client's
  ** redirect messages), since 7.80 */
  void *f = dlsym(lib, "curl_url_strerror");
  if (f) memcpy(&lc.url_strerror, &f, sizeof f);
  return 0;
}

/* The calling thread's private loop (blocking requests). */
static _Thread_local lp_hloop *thread_loop;

/* pthread key destructor: a worker thread that exits frees its loop. */
static void free_loop(void *l) { luapool__hloop_free(l); }

static void global_init(void) {
  if (load_libcurl() != 0) return;
  if (lc.global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return;
  /* No curl_global_cleanup on failure: the library is never unloaded,
  ** and cleanup is as unsafe to race as init. */
  if (pthread_key_create(&loop_key, free_loop) != 0) return;
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
  if (thread_loop == NULL) return;
  /* Clear the key first so the thread-exit destructor cannot free it a
  ** second time. */
  pthread_setspecific(loop_key, NULL);
  luapool__hloop_free(thread_loop);
  thread_loop = NULL;
}

/* The calling thread's loop, or NULL with a message in err (libcurl not
** loadable, out of memory or descriptors). */
static lp_hloop *private_loop(char *err, size_t errsz) {
  if (thread_loop != NULL) return thread_loop;
  const char *load_error = luapool__http_init_error();
  if (load_error != NULL) {
    snprintf(err, errsz, "%s", load_error);
    return NULL;
  }
  lp_hloop *l = luapool__hloop_new(NULL, err, errsz);
  if (l == NULL) return NULL;
  if (pthread_setspecific(loop_key, l) != 0) {
    luapool__hloop_free(l);
    snprintf(err, errsz, "not enough memory");
    return NULL;
  }
  thread_loop = l;
  return l;
}

/* }====== */

/* {====== one blocking request on the private loop */

/* How often the blocking caller looks for a stop. */
#define POLL_S 0.05

static void on_done(lp_hreq *r, void *ud) {
  (void)r;
  *(int *)ud = 1;
}

/* Runs r to its end on loop l, aborting it ("interrupted") when a stop
** comes: the task's stop (deadline, closing pool, Ctrl-C), or in the
** host's main state a signal waiting to be delivered. */
static void run_blocking(lp_hloop *l, lp_hreq *r, const lp_interrupt *intr) {
  int done = 0;
  luapool__hloop_add(l, r, on_done, &done);
  while (!done) {
    if (luapool__interrupted(intr) || (intr == NULL && luapool__signal_for_me())) {
      luapool__hloop_abort(l, r, "interrupted");
      break;
    }
    luapool__hloop_run(l, POLL_S);
  }
}

/* }====== */

/* {====== fetch_length kernel */

int luapool__fetch_length_run(lp_kcall *c) {
  static const char kname[] = "fetch_length";
  const lp_value *a1 = c->nargs >= 1 ? &c->args[0] : NULL;
  const lp_value *a2 = c->nargs >= 2 ? &c->args[1] : NULL;
  lp_hreq_opts o;
  char err[512];
  char *url;
  lp_hloop *l;
  lp_hreq *r;

  memset(&o, 0, sizeof o);
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
    o.timeout = t;
  }
  for (int i = 2; i < c->nargs; i++) /* (a trailing nil is no argument) */
    if (c->args[i].type != LP_NIL) return luapool__kargmsg(c, kname, i + 1, LP_FETCH_EXTRA_WHY);
  if (luapool__interrupted(c->interrupt))
    return luapool__kerr(c, "fetch_length: %.*s: interrupted",
                         (int)(a1->u.s.len > 512 ? 512 : a1->u.s.len), a1->u.s.p);

  /* LP_STR bytes are not guaranteed to be NUL-terminated (they may point
  ** into a message buffer); libcurl wants a C string. */
  url = lp_malloc(a1->u.s.len + 1);
  if (url == NULL)
    return luapool__kerr(c, "fetch_length: %.*s: not enough memory",
                         (int)(a1->u.s.len > 512 ? 512 : a1->u.s.len), a1->u.s.p);
  memcpy(url, a1->u.s.p, a1->u.s.len);
  url[a1->u.s.len] = '\0';

  o.url = url;
  o.deadline = c->deadline; /* the task's deadline caps the transfer too */
  o.max_redirs = LP_HMAX_REDIRS;
  o.retry_delay = -1;
  o.count_only = 1;
  l = private_loop(err, sizeof err);
  r = l ? luapool__hreq_new(&o, err, sizeof err) : NULL;
  if (r == NULL) {
    luapool__kerr(c, "fetch_length: %s: %s", url, err);
    lp_free(url);
    return -1;
  }
  run_blocking(l, r, c->interrupt);
  switch (luapool__hreq_state(r)) {
    case LP_H_OK: break;
    case LP_H_ABORTED: luapool__kerr(c, "fetch_length: %s: interrupted", url); break;
    case LP_H_DEADLINE:
      /* libcurl's clock may fire a little before luapool's: the task's
      ** deadline ended it, and its worker must know (kind "timeout"). */
      luapool__stop_self(c->interrupt);
      /* fall through */
    default: luapool__kerr(c, "fetch_length: %s: %s", url, luapool__hreq_error(r)); break;
  }
  lp_free(url);
  if (luapool__hreq_state(r) != LP_H_OK) {
    luapool__hreq_free(r);
    return -1;
  }
  uint64_t count = luapool__hreq_length(r);
  c->out[0].type = LP_INT;
  c->out[0].tname = "number";
  c->out[0].u.i = count > (uint64_t)LUA_MAXINTEGER ? LUA_MAXINTEGER : (lua_Integer)count;
  c->out[1].type = LP_INT;
  c->out[1].tname = "number";
  c->out[1].u.i = luapool__hreq_status(r);
  c->nout = 2;
  luapool__hreq_free(r);
  return 0;
}

/* }====== */

/* {====== luapool.http.get and luapool.http.request */

/* C memory of one call, owned by a userdata on the Lua stack so that a Lua
** error at any point (bad option, memory error while building the result)
** cannot leak it: __gc frees whatever is left. */
typedef struct req_box {
  char **lines; /* request header lines */
  size_t nlines, cap;
  lp_hreq *r;
} req_box;

#define REQ_BOX_MT "luapool.http.request"

static void box_free(req_box *b) {
  for (size_t i = 0; i < b->nlines; i++)
    lp_free(b->lines[i]);
  lp_free(b->lines);
  b->lines = NULL;
  b->nlines = b->cap = 0;
  /* (a coroutine collected while its request is in an engine's loop) */
  if (b->r) luapool__hreq_forget(b->r);
  luapool__hreq_free(b->r);
  b->r = NULL;
}

static int box_gc(lua_State *L) {
  box_free(luaL_checkudata(L, 1, REQ_BOX_MT));
  return 0;
}

static req_box *new_box(lua_State *L) {
  req_box *b = lua_newuserdatauv(L, sizeof *b, 0);
  memset(b, 0, sizeof *b);
  if (luaL_newmetatable(L, REQ_BOX_MT)) {
    lua_pushcfunction(L, box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return b;
}

/* What each entry point accepts. */
enum {
  O_TIMEOUT = 1 << 0,
  O_CONNECT_TIMEOUT = 1 << 1,
  O_HEADERS = 1 << 2,
  O_FOLLOW = 1 << 3,
  O_URL = 1 << 4,
  O_METHOD = 1 << 5,
  O_BODY = 1 << 6,
  O_RETRIES = 1 << 7,
  O_RETRY_DELAY = 1 << 8,
  O_RETRY_ALL = 1 << 9
};
static const char *const option_names[] = {"timeout",     "connect_timeout", "headers", "follow",
                                           "url",         "method",          "body",    "retries",
                                           "retry_delay", "retry_all",       NULL};
#define GET_OPTIONS (O_TIMEOUT | O_CONNECT_TIMEOUT | O_HEADERS | O_FOLLOW)
#define REQUEST_OPTIONS                                                                            \
  (GET_OPTIONS | O_URL | O_METHOD | O_BODY | O_RETRIES | O_RETRY_DELAY | O_RETRY_ALL)

/* Every key of the options table at idx must be an option fname accepts. */
static void check_option_names(lua_State *L, int idx, const char *fname, int allowed) {
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    lua_pop(L, 1);
    int ok = 0;
    if (lua_type(L, -1) == LUA_TSTRING)
      for (int i = 0; option_names[i] && !ok; i++)
        ok = (allowed & (1 << i)) && strcmp(lua_tostring(L, -1), option_names[i]) == 0;
    if (!ok) {
      /* (a copy: luaL_tolstring on the key itself would confuse lua_next) */
      lua_pushvalue(L, -1);
      luaL_error(L, "unknown option '%s' to '%s'", luaL_tolstring(L, -1, NULL), fname);
    }
  }
}

/* "bad option 'NAME' to 'FNAME' (DETAIL, got VALUE)", the value at -1. */
static int bad_option(lua_State *L, const char *name, const char *fname, const char *detail) {
  const char *got;
  if (lua_type(L, -1) == LUA_TNUMBER || lua_type(L, -1) == LUA_TBOOLEAN)
    got = luaL_tolstring(L, -1, NULL);
  else if (lua_type(L, -1) == LUA_TSTRING)
    got = lua_pushfstring(L, "'%s'", lua_tostring(L, -1));
  else
    got = luaL_typename(L, -1);
  return luaL_error(L, "bad option '%s' to '%s' (%s, got %s)", name, fname, detail, got);
}

/* opts[name] as a positive number of seconds; 0 when absent. */
static double opt_seconds(lua_State *L, int idx, const char *name, const char *fname) {
  double s = 0;
  if (lua_getfield(L, idx, name) != LUA_TNIL) {
    if (lua_type(L, -1) != LUA_TNUMBER || !((s = lua_tonumber(L, -1)) > 0))
      bad_option(L, name, fname, "positive number expected");
  }
  lua_pop(L, 1);
  return s;
}

/* Header text must not smuggle extra lines into the request. */
static int bad_header_text(const char *s, size_t len) {
  return memchr(s, '\r', len) != NULL || memchr(s, '\n', len) != NULL ||
         memchr(s, '\0', len) != NULL;
}

/* A header name is an HTTP token (RFC 9110, 5.6.2): no space, no
** separator; a server answers 400 to anything else. */
static int is_token(const char *s, size_t len) {
  if (len == 0) return 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL)))
      return 0;
  }
  return 1;
}

static void add_line(lua_State *L, req_box *b, const char *line) {
  if (b->nlines == b->cap) {
    size_t ncap = b->cap ? b->cap * 2 : 8;
    char **nl = lp_realloc(b->lines, ncap * sizeof *nl);
    if (nl == NULL) {
      luaL_error(L, "not enough memory");
      return; /* (not reached: for the analyzer, which cannot tell) */
    }
    b->lines = nl;
    b->cap = ncap;
  }
  size_t n = strlen(line) + 1;
  char *c = lp_malloc(n);
  if (c == NULL) {
    luaL_error(L, "not enough memory");
    return; /* (not reached) */
  }
  memcpy(c, line, n);
  b->lines[b->nlines++] = c;
}

/* opts.headers: {["Name"] = "value", ...} and/or {"Name: value", ...}. */
static void opt_headers(lua_State *L, int idx, const char *fname, req_box *b) {
  int t = lua_getfield(L, idx, "headers");
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (t != LUA_TTABLE) bad_option(L, "headers", fname, "table expected");
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    size_t vlen;
    const char *v;
    /* Type checks before lua_tolstring: converting a number in place is
    ** only safe for the value, never for the key lua_next needs. */
    if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
      bad_option(L, "headers", fname, "string values expected");
    v = lua_tolstring(L, -1, &vlen);
    if (bad_header_text(v, vlen))
      luaL_error(L, "bad option 'headers' to '%s' (line break or zero in a header)", fname);
    if (lua_type(L, -2) == LUA_TSTRING) {
      size_t klen;
      const char *k = lua_tolstring(L, -2, &klen);
      if (!is_token(k, klen))
        luaL_error(L, "bad option 'headers' to '%s' (invalid header name '%s')", fname, k);
      add_line(L, b, lua_pushfstring(L, "%s: %s", k, v));
      lua_pop(L, 1);
    } else if (lua_isinteger(L, -2)) {
      const char *colon = memchr(v, ':', vlen);
      if (colon == NULL)
        luaL_error(L, "bad option 'headers' to '%s' ('Name: value' string expected, got '%s')",
                   fname, v);
      if (!is_token(v, (size_t)(colon - v)))
        luaL_error(L, "bad option 'headers' to '%s' (invalid header name in '%s')", fname, v);
      add_line(L, b, v);
    } else {
      luaL_error(L, "bad option 'headers' to '%s' (invalid key)", fname);
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* Reads the options (their names checked) from the table at idx into o (and b:
** strings that stay on the Lua stack while the request is made, header
** lines in the box).  Raises for a bad option. */
static void read_options(lua_State *L, int idx, const char *fname, int allowed, lp_hreq_opts *o,
                         req_box *b) {
  o->timeout = opt_seconds(L, idx, "timeout", fname);
  o->connect_timeout = opt_seconds(L, idx, "connect_timeout", fname);
  int t = lua_getfield(L, idx, "follow");
  if (t == LUA_TBOOLEAN) {
    o->max_redirs = lua_toboolean(L, -1) ? LP_HMAX_REDIRS : 0;
  } else if (t != LUA_TNIL) {
    lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : -1;
    if (!(allowed & O_URL) || n < 0 || n > INT_MAX)
      bad_option(L, "follow", fname,
                 allowed & O_URL ? "boolean or non-negative integer expected" : "boolean expected");
    o->max_redirs = (int)n;
  }
  lua_pop(L, 1);
  opt_headers(L, idx, fname, b);
  o->headers = (const char *const *)b->lines;
  o->nheaders = b->nlines;
  if (!(allowed & O_URL)) return;
  /* http.request only; its strings are left on the stack (anchored). */
  t = lua_getfield(L, idx, "method");
  if (t != LUA_TNIL) {
    if (t != LUA_TSTRING || !luapool__http_token(lua_tostring(L, -1)) ||
        strlen(lua_tostring(L, -1)) != lua_rawlen(L, -1))
      bad_option(L, "method", fname, "HTTP method (a token such as GET or POST) expected");
    o->method = lua_tostring(L, -1);
  }
  t = lua_getfield(L, idx, "body");
  if (t != LUA_TNIL) {
    if (t != LUA_TSTRING) bad_option(L, "body", fname, "string expected");
    o->body = lua_tolstring(L, -1, &o->body_len);
  }
  if (lua_getfield(L, idx, "retries") != LUA_TNIL) {
    lua_Integer n = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : -1;
    if (n < 0 || n > 1000) bad_option(L, "retries", fname, "integer from 0 to 1000 expected");
    o->retries = (int)n;
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "retry_delay") != LUA_TNIL) {
    double d = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1;
    if (!(d >= 0 && d <= 3600))
      bad_option(L, "retry_delay", fname, "number of seconds from 0 to 3600 expected");
    o->retry_delay = d;
  }
  lua_pop(L, 1);
  t = lua_getfield(L, idx, "retry_all");
  if (t != LUA_TNIL) {
    if (t != LUA_TBOOLEAN) bad_option(L, "retry_all", fname, "boolean expected");
    o->retry_all = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
}

static int ascii_lower(int ch) { return ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch; }

/* Pushes a table of the header lines of the last response: lowercased
** name -> value, the last occurrence of a name winning. */
static void push_headers(lua_State *L, const lp_hreq *r) {
  size_t hlen, i = 0;
  const char *h = luapool__hreq_headers(r, &hlen);
  luaL_Buffer name;
  lua_newtable(L);
  while (i < hlen) {
    const char *line = h + i;
    const char *nl = memchr(line, '\n', hlen - i);
    size_t n = nl ? (size_t)(nl - line) : hlen - i;
    const char *colon = memchr(line, ':', n);
    i += n + (nl != NULL);
    /* Skips the status line, the blank end line and folded continuations
    ** (obsolete in HTTP/1.1). */
    if (colon == NULL || colon == line || line[0] == ' ' || line[0] == '\t') continue;
    const char *v = colon + 1, *e = line + n;
    luaL_buffinit(L, &name);
    for (const char *q = line; q < colon; q++)
      luaL_addchar(&name, (char)ascii_lower((unsigned char)*q));
    luaL_pushresult(&name);
    while (v < e && (*v == ' ' || *v == '\t'))
      v++;
    while (e > v && (e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t'))
      e--;
    lua_pushlstring(L, v, (size_t)(e - v));
    lua_rawset(L, -3);
  }
}

static void set_number(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

/* Pushes the result of a request that ended LP_H_OK or LP_H_FAILED the way
** fname returns it: the table (1), or nil and "METHOD URL: reason" (2).
** The body is moved out of r. */
static int push_result(lua_State *L, lp_hreq *r, int request) {
  const char *url = luapool__hreq_url(r);
  if (luapool__hreq_state(r) != LP_H_OK) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s %s: %s", luapool__hreq_method(r), luapool__hreq_target(r),
                    luapool__hreq_error(r));
    return 2;
  }
  lp_htimings t;
  size_t blen;
  luapool__hreq_timings(r, &t);
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, luapool__hreq_status(r));
  lua_setfield(L, -2, "status");
  /* the Lua copy made, the C buffer goes at once (big bodies) */
  const char *body = luapool__hreq_body(r, &blen);
  lua_pushlstring(L, body ? body : "", blen);
  lua_setfield(L, -2, "body");
  lp_free(luapool__hreq_take_body(r, &blen));
  push_headers(L, r);
  lua_setfield(L, -2, "headers");
  lua_pushstring(L, url);
  lua_setfield(L, -2, "url");
  if (!request) {
    set_number(L, "time", t.transfer);
    return 1;
  }
  lua_pushinteger(L, luapool__hreq_attempts(r));
  lua_setfield(L, -2, "attempts");
  lua_createtable(L, 0, 5);
  set_number(L, "dns", t.dns);
  set_number(L, "connect", t.connect);
  set_number(L, "tls", t.tls);
  set_number(L, "ttfb", t.ttfb);
  set_number(L, "total", t.total);
  lua_setfield(L, -2, "timings");
  return 1;
}

/* {====== yielding on an engine's loop thread (httploop.h) */

const char luapool__http_yield_marker = 0;
static _Thread_local lp_hloop *yield_loop;
static _Thread_local lp_hloop *(*yield_make)(void *ud);
static _Thread_local void *yield_make_ud;

void luapool__http_set_thread_loop(lp_hloop *l) { yield_loop = l; }
void luapool__http_set_thread_loop_maker(lp_hloop *(*make)(void *ud), void *ud) {
  yield_make = make;
  yield_make_ud = ud;
}
/* The loop is made at the first request that needs it (loading libcurl
** then, not at a task that makes none); a maker that failed is not asked
** again until it is set again. */
lp_hloop *luapool__http_thread_loop(void) {
  if (yield_loop == NULL && yield_make != NULL) {
    yield_loop = yield_make(yield_make_ud);
    if (yield_loop == NULL) yield_make = NULL;
  }
  return yield_loop;
}

/* }====== */

/* The end of a call whose request ended: the result (see push_result), or
** an error for a stopped one.  The box is at index 3 in both functions. */
static int end_call(lua_State *L, req_box *b, int request, int yielded) {
  double deadline;
  const lp_interrupt *intr = luapool__lua_interrupt(L, &deadline);
  lp_hreq *r = b->r;
  switch (luapool__hreq_state(r)) {
    case LP_H_ABORTED:
      /* Stopped (Ctrl-C in the main state; in a task its stop or its
      ** deadline; an engine's abort): an error, as fetch_length's, not a
      ** failed request the task could take for an answer. */
      lua_pushfstring(L, "%s %s: %s", luapool__hreq_method(r), luapool__hreq_target(r),
                      luapool__hreq_error(r));
      box_free(b);
      if (intr == NULL && !yielded) luapool__check_signal(L);
      return lua_error(L);
    case LP_H_DEADLINE:
      /* The deadline marks the task stopped by it, so its worker reports
      ** the timeout. */
      luapool__stop_self(intr);
      lua_pushfstring(L, "%s %s: %s", luapool__hreq_method(r), luapool__hreq_target(r),
                      luapool__hreq_error(r));
      box_free(b);
      return lua_error(L);
    default: return push_result(L, r, request);
  }
}

/* Resumed by the engine once the request ended. */
static int http_continue(lua_State *L, int status, lua_KContext request) {
  (void)status;
  return end_call(L, luaL_checkudata(L, 3, REQ_BOX_MT), (int)request, 1);
}

/* The body of both functions: url (a string), options read from the table
** at opts (0: none). */
static int http_call(lua_State *L, const char *fname, const char *url, int opts, int allowed) {
  double deadline;
  /* In a task its stop and deadline apply; outside one, Ctrl-C on the host. */
  const lp_interrupt *intr = luapool__lua_interrupt(L, &deadline);
  lp_hreq_opts o;
  char err[512];
  memset(&o, 0, sizeof o);
  o.url = url;
  o.max_redirs = LP_HMAX_REDIRS;
  o.retry_delay = -1;
  req_box *b = new_box(L); /* index 3 */
  if (opts) read_options(L, opts, fname, allowed, &o, b);
  const char *method = o.method ? o.method : "GET";
  o.deadline = deadline;
  /* (not from a coroutine an iopool task made itself: it blocks) */
  lp_hloop *yl = luapool__io_nested(L) ? NULL : luapool__http_thread_loop();
  if (yl != NULL && !lua_isyieldable(L))
    return luaL_error(L,
                      "luapool.http.%s: cannot yield here (inside a metamethod or a C function "
                      "such as table.sort's comparator); make the request in the task's own "
                      "code (a pcall is fine) and pass the result in",
                      fname);

  lp_hloop *l = yl ? yl : private_loop(err, sizeof err);
  if (l != NULL) b->r = luapool__hreq_new(&o, err, sizeof err);
  for (size_t i = 0; i < b->nlines; i++) /* copied into the request */
    lp_free(b->lines[i]);
  b->nlines = 0;
  if (b->r == NULL) {
    luaL_pushfail(L);
    lua_pushfstring(L, "%s %s: %s", method, url, err);
    return 2;
  }
  int request = (allowed & O_URL) != 0;
  if (yl != NULL) {
    lua_pushlightuserdata(L, (void *)&luapool__http_yield_marker);
    lua_pushlightuserdata(L, b->r);
    return lua_yieldk(L, 2, (lua_KContext)request, http_continue);
  }
  if (luapool__interrupted(intr) || (intr == NULL && luapool__signal_for_me())) {
    box_free(b);
    if (intr == NULL) luapool__check_signal(L);
    return luaL_error(L, "%s %s: interrupted", method, url);
  }
  run_blocking(l, b->r, intr);
  return end_call(L, b, request, 0);
}

/* {====== fetch_length yielding on an engine's loop thread */

/* Resumed by the engine once the fetch ended: length, status, or the
** kernel's error. */
static int fetch_continue(lua_State *L, int status, lua_KContext ctx) {
  req_box *b = luaL_checkudata(L, 3, REQ_BOX_MT);
  lp_hreq *r = b->r;
  double deadline;
  const lp_interrupt *intr = luapool__lua_interrupt(L, &deadline);
  (void)status, (void)ctx;
  switch (luapool__hreq_state(r)) {
    case LP_H_OK: {
      uint64_t n = luapool__hreq_length(r);
      lua_pushinteger(L, n > (uint64_t)LUA_MAXINTEGER ? LUA_MAXINTEGER : (lua_Integer)n);
      lua_pushinteger(L, luapool__hreq_status(r));
      box_free(b);
      return 2;
    }
    case LP_H_DEADLINE: luapool__stop_self(intr); /* fall through */
    default:
      /* as the kernel's own errors: no "chunk:line:" prefix */
      lua_pushfstring(L, "fetch_length: %s: %s", luapool__hreq_target(r), luapool__hreq_error(r));
      box_free(b);
      return lua_error(L);
  }
}

int luapool__http_fetch_length_yield(lua_State *L) {
  lp_hreq_opts o;
  char err[512];
  memset(&o, 0, sizeof o);
  int extra = 0; /* the first argument past URL and timeout that is not nil */
  for (int i = lua_gettop(L); i >= 3; i--)
    if (!lua_isnil(L, i)) extra = i;
  lua_settop(L, 2);
  /* the kernel's checks and messages (registry.c, fetch_length_run) */
  if (lua_type(L, 1) != LUA_TSTRING) {
    lua_pushfstring(L, "bad argument #1 to 'fetch_length' (string expected, got %s)",
                    luaL_typename(L, 1));
    return lua_error(L);
  }
  size_t ulen;
  const char *url = lua_tolstring(L, 1, &ulen);
  if (strlen(url) != ulen) {
    lua_pushstring(L, "bad argument #1 to 'fetch_length' (URL contains a zero byte)");
    return lua_error(L);
  }
  if (!lua_isnil(L, 2)) {
    if (lua_type(L, 2) != LUA_TNUMBER) {
      lua_pushfstring(L, "bad argument #2 to 'fetch_length' (number expected, got %s)",
                      luaL_typename(L, 2));
      return lua_error(L);
    }
    if (!((o.timeout = lua_tonumber(L, 2)) > 0)) {
      lua_pushfstring(L, "bad argument #2 to 'fetch_length' (positive number expected, got %s)",
                      luaL_tolstring(L, 2, NULL));
      return lua_error(L);
    }
  }
  if (extra) {
    lua_pushfstring(L, LP_FETCH_EXTRA_ARG, extra);
    return lua_error(L);
  }
  if (luapool__http_thread_loop() == NULL || !lua_isyieldable(L))
    return luaL_error(L, "luapool.kernels.fetch_length: cannot yield here (inside a metamethod "
                         "or a C function such as table.sort's comparator); make the request "
                         "in the task's own code (a pcall is fine) and pass the result in");
  double deadline;
  luapool__lua_interrupt(L, &deadline);
  o.url = url;
  o.deadline = deadline;
  o.max_redirs = LP_HMAX_REDIRS;
  o.retry_delay = -1;
  o.count_only = 1;
  req_box *b = new_box(L); /* index 3 */
  b->r = luapool__hreq_new(&o, err, sizeof err);
  if (b->r == NULL) {
    lua_pushfstring(L, "fetch_length: %s: %s", url, err);
    return lua_error(L);
  }
  lua_pushlightuserdata(L, (void *)&luapool__http_yield_marker);
  lua_pushlightuserdata(L, b->r);
  return lua_yieldk(L, 2, 0, fetch_continue);
}

/* }====== */

int luapool__http_get(lua_State *L) {
  /* A string, never a number: luaL_checklstring would turn 5 into "5",
  ** which libcurl reads as the address 0.0.0.5. */
  /* (named: a call through pcall or a tail call would say '?') */
  if (lua_type(L, 1) != LUA_TSTRING)
    return luaL_error(L, "bad argument #1 to 'get' (string expected, got %s)", luaL_typename(L, 1));
  size_t ulen;
  const char *url = lua_tolstring(L, 1, &ulen);
  if (strlen(url) != ulen)
    return luaL_error(L, "bad argument #1 to 'get' (URL contains a zero byte)");
  if (!lua_isnoneornil(L, 2)) {
    if (!lua_istable(L, 2))
      return luaL_error(L, "bad argument #2 to 'get' (table expected, got %s)",
                        luaL_typename(L, 2));
    check_option_names(L, 2, "get", GET_OPTIONS);
  }
  lua_settop(L, 2);
  return http_call(L, "get", url, lua_istable(L, 2) ? 2 : 0, GET_OPTIONS);
}

int luapool__http_request(lua_State *L) {
  /* (named: a call through pcall or a tail call would say '?') */
  if (lua_type(L, 1) != LUA_TTABLE)
    return luaL_error(L, "bad argument #1 to 'request' (table expected, got %s)",
                      luaL_typename(L, 1));
  lua_settop(L, 1);
  check_option_names(L, 1, "request", REQUEST_OPTIONS);
  if (lua_getfield(L, 1, "url") != LUA_TSTRING) bad_option(L, "url", "request", "string expected");
  size_t ulen;
  const char *url = lua_tolstring(L, -1, &ulen); /* anchored at 2 */
  if (strlen(url) != ulen)
    luaL_error(L, "bad option 'url' to 'request' (URL contains a zero byte)");
  return http_call(L, "request", url, 1, REQUEST_OPTIONS);
}

/* }====== */
