/*
** The worker side of a task, shared by thread and process workers: decode a
** task message, run each call, encode the reply.  An event loop (iopool)
** runs the same calls inside a coroutine of its state instead, so that a
** call may yield to the loop (lp_cotask, at the end).
**
** Task message:  u8 kind, then
**   LP_MSG_SINGLE: u32 n, values fn, arg1..   (one reference space: sharing
**               between the function's upvalues and the arguments survives)
**   LP_MSG_BATCH:  u32 ncalls, fn, then per call: u32 nargs, args
**               (each call its own reference space; fn decoded once)
** Reply: u32 count of calls that failed (so C can count without Lua), then
** per call, u8 status, then
**   OK:       u32 n, values
**   ERROR:    message string, traceback string, then the error value
**             (nil when it could not travel): C reads the text without Lua
**   TRANSFER: message string (a result that could not be encoded)
**   TIMEOUT:  message string (the call outlived its own deadline; see
**             lp_wstate.call_timeout)
**
** A call whose function is a native kernel and whose arguments are all
** scalars runs straight from the bytes: no Lua state is created for it.
*/
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "codec/codec.h"
#include "core/future.h"
#include "kernels/kernel.h"
#include "codec/message.h"
#include "base/stop.h"
#include "base/util.h"
#include "worker/worker.h"
#include "worker/wstate.h"

/* {======================================================
** Native kernel calls
** ======================================================= */

/* Appends a TRANSFER reply: the call could not be received or answered. */
static int put_transfer(lp_buf *out, const char *m) {
  return luapool__put_u8(out, LP_REPLY_TRANSFER) || luapool__put_string(out, m, strlen(m)) ? -1 : 0;
}

/* Appends an ERROR reply whose value is the message itself. */
static int put_error_text(lp_buf *out, const char *m) {
  size_t l = strlen(m);
  return (luapool__put_u8(out, LP_REPLY_ERROR) || luapool__put_string(out, m, l) ||
          luapool__put_string(out, "", 0) || luapool__put_string(out, m, l))
             ? -1
             : 0;
}

/* Reads nargs scalars; 1 ok, 0 some argument is not a scalar, -1 malformed. */
static int read_kargs(lp_reader *r, uint32_t nargs, lp_value *args) {
  for (uint32_t i = 0; i < nargs; i++) {
    int s = luapool__get_scalar(r, &args[i]);
    if (s != 1) return s;
  }
  return 1;
}

static int put_kernel_reply(lp_buf *out, lp_kcall *c, int ok) {
  if (ok) {
    if (luapool__put_u8(out, LP_REPLY_OK) || luapool__put_u32(out, (uint32_t)c->nout)) return -1;
    for (int i = 0; i < c->nout; i++)
      if (luapool__put_value(out, &c->out[i])) return -1;
    return 0;
  }
  return put_error_text(out, c->err);
}

/* {====== per-call deadlines and stops */

/* Before call number `call` of the message (0-based). */
static void begin_call(lp_wstate *ws, uint32_t call) {
  if (ws->call_timeout <= 0) return;
  /* a new number: a deadline aimed at the call before misses this one */
  luapool__stop_renumber(ws->intr);
  if (!ws->deadline_by_kill) ws->deadline = luapool__now() + ws->call_timeout;
  if (ws->call_start) ws->call_start(ws, call);
}

void luapool__deadline_message(char *m, size_t sz, uint64_t task_no, int64_t item_lo, uint32_t call,
                               double timeout, const char *worker) {
  char label[48];
  if (task_no)
    snprintf(label, sizeof label, "task #%llu", (unsigned long long)task_no);
  else if (item_lo)
    snprintf(label, sizeof label, "item #%lld", (long long)item_lo + (long long)call);
  if (task_no || item_lo)
    snprintf(m, sz, "%s exceeded its deadline of %g seconds in worker %s", label, timeout, worker);
  else /* neither: the pool's initializer */
    snprintf(m, sz, "it exceeded its deadline of %g seconds", timeout);
}

/* Replaces the reply of call `call`, which starts at out->len == mark,
** with LP_REPLY_TIMEOUT naming it.  -1 when out of memory. */
static int put_timeout(lp_wstate *ws, uint32_t call, lp_buf *out, size_t mark) {
  char m[256];
  luapool__deadline_message(m, sizeof m, ws->task_no, ws->item_lo, call, ws->call_timeout,
                            ws->name);
  out->len = mark;
  return luapool__put_u8(out, LP_REPLY_TIMEOUT) || luapool__put_string(out, m, strlen(m)) ? -1 : 0;
}

/* After a call whose reply starts at out->len == mark (nerr counted its
** failure, if any): a call stopped by its deadline, or that ended past it,
** replies TIMEOUT instead.  Returns -1 when out of memory. */
static int end_call(lp_wstate *ws, uint32_t call, lp_buf *out, size_t mark, uint32_t nerr_before,
                    uint32_t *nerr) {
  if (ws->call_timeout <= 0 || ws->deadline_by_kill) return 0;
  lp_interrupt *i = ws->intr;
  int stopped = atomic_load(&i->kill_seq) == atomic_load(&i->seq);
  if (stopped && atomic_load(&i->reason) == LP_STOP_SIGNAL) return 0; /* not a deadline */
  if (!stopped && luapool__now() < ws->deadline) return 0;
  *nerr = nerr_before + 1;
  return put_timeout(ws, call, out, mark);
}

/* Was the message stopped as a whole (Ctrl-C, a closing pool)?  Then the
** calls after the one that ran are not run. */
static int stopped_short(lp_wstate *ws) {
  lp_interrupt *i = ws->intr;
  if (luapool__stopped_whole(i)) ws->aborted = 1;
  return ws->aborted;
}

/* }====== */

/* Tries to run one kernel call natively.  1 done (reply appended), 0 the
** arguments need Lua (reader restored), -1 out of memory / malformed. */
static int run_kernel_call(lp_wstate *ws, int k, uint32_t call, lp_reader *r, uint32_t nargs,
                           lp_buf *out, uint32_t *nerr) {
  lp_value args[LP_KERNEL_MAXARGS];
  lp_reader save = *r;
  if (nargs > LP_KERNEL_MAXARGS) return 0;
  int s = read_kargs(r, nargs, args);
  if (s <= 0) {
    *r = save;
    return s;
  }
  lp_kcall c;
  memset(&c, 0, sizeof c);
  c.args = args;
  c.nargs = (int)nargs;
  c.interrupt = ws->intr;
  size_t mark = out->len;
  uint32_t nerr_before = *nerr;
  begin_call(ws, call);
  c.deadline = ws->deadline;
  int ok = luapool__kernels[k].run(&c) == 0;
  if (!ok) (*nerr)++;
  if (put_kernel_reply(out, &c, ok)) return -1;
  return end_call(ws, call, out, mark, nerr_before, nerr) ? -1 : 1;
}

/* }====================================================== */

/* {======================================================
** Lua calls
** ======================================================= */

/* Where the next early collection starts, from what the last full one
** kept: halfway to the cap, but no later than an eighth below it, and no
** sooner than a 32nd of the cap later (so that live memory near the cap
** does not collect at every allocation: closer than that, only refusals
** collect, and the next one that fits starts over from here). */
static void set_gc_at(lp_wstate *ws) {
  size_t cap = ws->mem_cap, used = ws->mem_used;
  size_t step = used < cap ? (cap - used) / 2 : 0;
  if (step < cap / 32) step = cap / 32;
  size_t at = used < cap && step < cap - used ? used + step : cap;
  ws->gc_at = at < cap - cap / 8 ? cap - cap / 8 : at;
}

static void cap_gc_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  void *ud;
  lua_getallocf(L, &ud);
  lp_wstate *ws = ud;
  ws->gc_hooked = 0;
  lua_sethook(L, ws->saved_hook, ws->saved_mask, ws->saved_count);
  ws->gc_at = SIZE_MAX; /* what finalizers allocate meanwhile asks for no other */
  lua_gc(L, LUA_GCCOLLECT);
  set_gc_at(ws);
}

/* Called from the allocator: lua_sethook is safe anywhere (lua.c calls it
** from a signal handler).  Only the main thread gets it, where tasks run;
** code inside a coroutine collects when it is back there. */
static void want_gc(lp_wstate *ws) {
  lua_State *L = ws->L;
  if (L == NULL) return; /* still being created */
  if (ws->gc_hooked && lua_gethook(L) == cap_gc_hook) return;
  ws->saved_hook = lua_gethook(L); /* a hook of the task's, or none */
  ws->saved_mask = lua_gethookmask(L);
  ws->saved_count = lua_gethookcount(L);
  if (ws->saved_hook == cap_gc_hook) ws->saved_hook = NULL, ws->saved_mask = 0;
  ws->gc_hooked = 1;
  lua_sethook(L, cap_gc_hook, LUA_MASKCOUNT, 1);
}

/* The Lua allocator of a process worker with max_memory_mb.  Only memory a
** task still holds after a full collection counts against the cap: a
** growth that would pass it is refused once (NULL), and Lua answers a
** refusal by running an emergency full collection and asking again for the
** very same block.  If that retry still does not fit, the memory is live:
** ws->on_oom reports it and exits (unwinding through Lua from here is not
** an option).  A request other than the retry while a refusal is pending
** means Lua could not collect (it raised "not enough memory" instead, as
** during a collection step): that is the cap too, and it is reported at
** once, so that no pcall of the task can swallow it; check_cap catches a
** refusal the task never followed with another allocation.
**   Some growths get no retry at all: a luaL_Buffer (string.rep,
** table.concat, string.format...) calls the allocator itself and raises
** on NULL.  So that garbage is gone before one of them meets the cap, a
** state past gc_at collects in full at its next instruction (want_gc). */
static void *capped_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  lp_wstate *ws = ud;
  size_t old = ptr ? osize : 0;
  if (nsize == 0) { /* (Lua's own allocations: not through the C hook, base/alloc.h) */
    free(ptr);
    ws->mem_used -= old;
    return NULL;
  }
  int retry;
  if (nsize > old) { /* a growth (frees and shrinks during the collection pass freely) */
    retry =
        ws->oom_refused && ws->oom_ptr == ptr && ws->oom_osize == osize && ws->oom_nsize == nsize;
    if (ws->oom_refused && !retry) ws->on_oom(ws);
    ws->oom_refused = 0;
    if (ws->mem_used - old + nsize > ws->mem_cap) {
      if (retry) ws->on_oom(ws);
      ws->oom_refused = 1;
      ws->oom_ptr = ptr;
      ws->oom_osize = osize;
      ws->oom_nsize = nsize;
      return NULL;
    }
  } else {
    retry = 0;
  }
  void *np = realloc(ptr, nsize); /* (a shrink must not fail: Lua relies on it) */
  if (np) ws->mem_used = ws->mem_used - old + nsize;
  if (retry && np)
    set_gc_at(ws); /* Lua has just collected in full: start over from what it kept */
  else if (ws->mem_used > ws->gc_at)
    want_gc(ws);
  return np;
}

/* A memory error Lua raised for a refusal it could not retry, which the
** failing code then caught (a task's pcall, the task's own call, the
** decoding of a message): it is the cap, reported as such. */
static void check_cap(lp_wstate *ws) {
  if (ws->mem_cap && ws->oom_refused) ws->on_oom(ws);
}

static const char *const TB_KEY = "luapool.traceback";

/* Message handler: keeps the error value, files the traceback aside. */
static int msgh(lua_State *L) {
  luaL_traceback(L, L, NULL, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, TB_KEY);
  return 1;
}

typedef struct run_ctx {
  lp_wstate *ws;
  lp_reader rd; /* the message being run */
  lp_reader *r; /* &rd */
  lp_buf *out;
  int kind;
  int kernel; /* >= 0: batch of this kernel resumed after native calls */
  uint32_t ncalls;
  uint32_t done;      /* calls replied so far */
  uint32_t nerr;      /* of which failed */
  int named;          /* a reply value went by name or as a function */
  size_t mark;        /* out->len where the reply of call `done` starts */
  uint32_t nerr_mark; /* nerr at that point */
} run_ctx;

/* {====== a thread worker state's big blocks (worker.h) */

/* Is p (of a small size) a big block Lua shrank?  Unlinks it if so. */
static int unlink_shrunk(lp_wbig *b, void *p) {
  for (void **pp = &b->shrunk; *pp; pp = luapool__big_link(*pp))
    if (*pp == p) {
      *pp = *luapool__big_link(p);
      return 1;
    }
  return 0;
}

/* The Lua allocator of a thread worker's state (ud: its lp_wbig). */
static void *thread_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  lp_wbig *b = ud;
  size_t old = ptr ? osize : 0;
  if (old < LP_BIG_MIN && !(b->shrunk && ptr && unlink_shrunk(b, ptr))) { /* a small block */
    if (nsize == 0) {
      free(ptr);
      return NULL;
    }
    if (nsize < LP_BIG_MIN) return realloc(ptr, nsize);
    void *np = luapool__big_alloc(&b->heap, nsize);
    if (np && ptr) {
      memcpy(np, ptr, old);
      free(ptr);
    }
    return np;
  }
  if (nsize == 0) {
    luapool__big_free(ptr);
    return NULL;
  }
  if (nsize >= LP_BIG_MIN)
    return luapool__big_realloc(&b->heap, ptr, nsize); /* (NULL: ptr stays) */
  void *np = malloc(nsize);                            /* a big block shrinks to a small one */
  if (np == NULL) { /* a shrink must not fail: the big block stays, marked */
    *luapool__big_link(ptr) = b->shrunk;
    b->shrunk = ptr;
    return ptr;
  }
  memcpy(np, ptr, nsize);
  luapool__big_free(ptr);
  return np;
}

/* }====== */

/* {====== pinned strings (worker.h) */

static const char PINS_KEY = 0; /* registry: the anchors, address -> string */

/* The encoder's pin (lp_encode_ctx.pin): anchors the string at idx and
** adds its lp_pinned to the reply being built, with a reference.  One
** lp_pinned per string: a string several replies return is found by its
** address (which Lua never moves), so the state's close finds one owner
** for its memory. */
static int pin_string(void *ud, lua_State *L, int idx, const char *s, size_t len) {
  lp_wpins *w = ((lp_wstate *)ud)->pins;
  lp_pinned *p;
  idx = lua_absindex(L, idx);
  if (luapool__buf_reserve(&w->cur, sizeof(lp_pinref))) return -1;
  for (p = w->live; p && p->s != s; p = p->next)
    ;
  if (p == NULL) {
    luaL_checkstack(L, 3, "pinning a string");
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &PINS_KEY) != LUA_TTABLE) {
      lua_pop(L, 1);
      lua_newtable(L);
      lua_pushvalue(L, -1);
      lua_rawsetp(L, LUA_REGISTRYINDEX, &PINS_KEY);
    }
    lua_pushvalue(L, idx);
    lua_rawsetp(L, -2, s); /* (may raise: nothing is held yet) */
    if ((p = lp_malloc(sizeof *p)) == NULL) {
      lua_pushnil(L); /* (clearing a key never allocates) */
      lua_rawsetp(L, -2, s);
      lua_pop(L, 1);
      return -1;
    }
    lua_pop(L, 1);
    atomic_init(&p->refs, 1); /* the state's */
    atomic_init(&p->unread, 0);
    p->s = s;
    p->len = len;
    p->block = NULL;
    p->big = 0;
    p->reads = w->reads;
    p->next = w->live;
    w->live = p;
  }
  atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed); /* the reply's */
  atomic_fetch_add_explicit(&p->unread, 1, memory_order_relaxed);
  lp_pinref r = {p};
  memcpy(w->cur.p + w->cur.len, &r, sizeof r);
  w->cur.len += sizeof r;
  return 0;
}

static void set_pin(lp_encode_ctx *ctx, lp_wstate *ws) {
  if (ws->pins == NULL) return;
  ctx->pin = pin_string;
  ctx->pin_ud = ws;
}

size_t luapool__pins_sweep(lp_wstate *ws) {
  lp_wpins *w = ws->pins;
  if (w == NULL || w->live == NULL) return 0;
  lua_State *L = ws->L; /* (live strings: the state exists) */
  /* (between tasks the stack is empty: the two slots are there) */
  size_t freed = 0, held = 0;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &PINS_KEY);
  for (lp_pinned **pp = &w->live; *pp;) {
    lp_pinned *p = *pp;
    /* only the state holds it: the owner has dropped every reply that
    ** referred to it (acquire: after all it read of the string) */
    if (atomic_load_explicit(&p->refs, memory_order_acquire) == 1) {
      lua_pushnil(L);
      lua_rawsetp(L, -2, p->s);
      freed += p->len;
      *pp = p->next;
      lp_free(p);
    } else {
      if (atomic_load_explicit(&p->unread, memory_order_relaxed) > 0) held += p->len;
      pp = &p->next;
    }
  }
  lua_pop(L, 1);
  /* The collector paced itself by what it found alive, pinned strings
  ** included (the results the owner had not read yet): left alone, the
  ** state would gather that much garbage again before its next cycle
  ** (a backlog of 30 results of 1 MiB: 60 MiB of heap instead of 2).
  ** So what was just let go counts as allocated now: the collector gets
  ** that much work to do (a step, never a collection the script
  ** stopped). */
  if (freed >= LP_PIN_MIN && lua_gc(L, LUA_GCISRUNNING))
    lua_gc(L, LUA_GCSTEP, freed >> 10 < (size_t)INT_MAX ? (int)(freed >> 10) : INT_MAX);
  return held;
}

int luapool__pins_seal(lp_wstate *ws, lp_buf *out) {
  lp_wpins *w = ws->pins;
  if (w == NULL || w->cur.len == 0) return 0;
  uint64_t n = w->cur.len / sizeof(lp_pinref);
  if (luapool__buf_add(out, w->cur.p, w->cur.len) || luapool__buf_add(out, &n, 8)) {
    luapool__pins_drop(ws);
    return -1;
  }
  w->cur.len = 0; /* the reply holds them now */
  return 1;
}

void luapool__pins_drop(lp_wstate *ws) {
  lp_wpins *w = ws->pins;
  if (w == NULL) return;
  for (size_t i = 0; i < w->cur.len; i += sizeof(lp_pinref)) {
    lp_pinref r;
    memcpy(&r, w->cur.p + i, sizeof r);
    atomic_fetch_sub_explicit(&r.p->unread, 1, memory_order_relaxed);
    luapool__pinned_unref(r.p); /* (never the last: the state holds one) */
  }
  w->cur.len = 0;
}

/* The state's allocator while it closes with strings replies still hold:
** their memory is kept (each string's block is the one its bytes lie in,
** found without knowing Lua's layout), everything else goes as the
** state's own allocator would have it (thread_alloc, or Lua's realloc and
** free). */
static void *keep_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  lp_wstate *ws = ud;
  lp_wbig *b = ws->big;
  if (ptr && nsize == 0 && osize >= LP_PIN_MIN)
    for (lp_pinned *p = ws->pins->live; p; p = p->next)
      if (p->block == NULL && (const char *)ptr <= p->s && p->s < (const char *)ptr + osize) {
        p->block = ptr;
        p->big = b && (osize >= LP_BIG_MIN || unlink_shrunk(b, ptr));
        return NULL;
      }
  if (b == NULL) {
    if (nsize) return realloc(ptr, nsize);
    free(ptr);
    return NULL;
  }
  return thread_alloc(b, ptr, osize, nsize);
}

void luapool__pins_close(lp_wstate *ws) {
  lp_wpins *w = ws->pins;
  if (w == NULL || ws->L == NULL) {
    luapool__wstate_close(ws);
    if (ws->big) luapool__big_close(&ws->big->heap);
    return;
  }
  luapool__pins_drop(ws);
  luapool__pins_sweep(ws);
  if (w->live) lua_setallocf(ws->L, keep_alloc, ws);
  luapool__wstate_close(ws);
  if (ws->big) luapool__big_close(&ws->big->heap); /* (the kept blocks: mappings of their own) */
  while (w->live) {
    lp_pinned *p = w->live;
    w->live = p->next;
    if (p->block == NULL) { /* its memory went with the state: a reader would crash */
      fprintf(stderr, "luapool: a pinned string of worker %s was not kept\n", ws->name);
      abort();
    }
    luapool__pinned_unref(p); /* the state's reference: the last reply frees it */
  }
  luapool__buf_free(&w->cur);
}

/* }====== */

/* Appends the reply of the call whose outcome is on the stack. */
static int tostring_of(lua_State *L) {
  luaL_tolstring(L, 1, NULL);
  return 1;
}

/* Pushes the text of the error value at idx.  Its __tostring may raise:
** the task still failed as a task (its value travels as it is), with a
** text that says what its __tostring did. */
static const char *error_text(lua_State *L, int idx, size_t *len) {
  lua_pushcfunction(L, tostring_of);
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    const char *why = lua_tostring(L, -1);
    lua_pushfstring(L, "(error object is a %s value whose __tostring raised: %s)",
                    luaL_typename(L, idx), why ? why : "an error object that is not a string");
    lua_remove(L, -2);
  }
  return lua_tolstring(L, -1, len);
}

static void reply_call(lua_State *L, run_ctx *rc, int ok, int base) {
  lp_buf *out = rc->out;
  size_t mark = out->len;
  if (ok) {
    int n = lua_gettop(L) - base;
    lp_encode_ctx ctx = {.root = "result", .root_base = 1};
    set_pin(&ctx, rc->ws);
    if (luapool__put_u8(out, LP_REPLY_OK) || luapool__put_u32(out, (uint32_t)n))
      luaL_error(L, "not enough memory");
    int r = luapool__encode(L, out, base + 1, n, &ctx);
    rc->named |= ctx.named;
    if (r != 0) {
      out->len = mark;
      rc->nerr++;
      if (luapool__put_u8(out, LP_REPLY_TRANSFER) ||
          luapool__put_string(out, ctx.err, strlen(ctx.err)))
        luaL_error(L, "not enough memory");
    }
    lua_settop(L, base);
    return;
  }
  /* error value at base+1 */
  rc->nerr++;
  size_t ml, tl = 0;
  const char *m = error_text(L, base + 1, &ml); /* base+2 */
  lua_getfield(L, LUA_REGISTRYINDEX, TB_KEY);   /* base+3 */
  const char *tb = lua_tolstring(L, -1, &tl);
  if (tb == NULL) tb = "", tl = 0;
  lp_encode_ctx ctx = {.root = "error value", .root_base = 1};
  set_pin(&ctx, rc->ws);
  if (luapool__put_u8(out, LP_REPLY_ERROR) || luapool__put_string(out, m, ml) ||
      luapool__put_string(out, tb, tl))
    luaL_error(L, "not enough memory");
  size_t vmark = out->len;
  int r = luapool__encode(L, out, base + 1, 1, &ctx);
  rc->named |= ctx.named;
  if (r != 0) {
    out->len = vmark; /* the value cannot travel: its text still does */
    lua_pushnil(L);
    if (luapool__encode(L, out, lua_gettop(L), 1, &ctx) != 0) luaL_error(L, "not enough memory");
  }
  lua_pushnil(L);
  lua_setfield(L, LUA_REGISTRYINDEX, TB_KEY);
  lua_settop(L, base);
}

/* Before the call whose function is at base+1 with its arguments above
** it: the message handler goes below the function, the call's deadline
** starts.  Returns the argument count. */
static int call_begin(lua_State *L, run_ctx *rc, int base) {
  int nargs = lua_gettop(L) - base - 1;
  rc->mark = rc->out->len;
  rc->nerr_mark = rc->nerr;
  begin_call(rc->ws, rc->done);
  luapool__arm_hook_of(L, rc->ws); /* (an earlier stop may have left one on) */
  lua_pushcfunction(L, msgh);
  lua_insert(L, base + 1);
  rc->ws->in_call = 1;
  return nargs;
}

/* After it, with the pcall status st: its reply. */
static void call_end(lua_State *L, run_ctx *rc, int st, int base) {
  rc->ws->in_call = 0;
  check_cap(rc->ws);
  lua_remove(L, base + 1);
  reply_call(L, rc, st == LUA_OK, base);
  if (end_call(rc->ws, rc->done, rc->out, rc->mark, rc->nerr_mark, &rc->nerr))
    luaL_error(L, "not enough memory");
  rc->done++;
  rc->mark = rc->out->len; /* this call's reply is whole: a later failure keeps it */
  rc->nerr_mark = rc->nerr;
}

/* Decodes the next call not yet done onto the stack (the function at
** base+1, its arguments above): 1, or 0 when none is left (or the message
** was stopped short).  A batch's function is decoded once, at 1. */
static int next_call(lua_State *L, run_ctx *rc) {
  uint32_t n;
  if (rc->kind == LP_MSG_SINGLE) {
    if (rc->done > 0) return 0;
    if (luapool__get_u32(rc->r, &n) || n < 1 || n > (size_t)(rc->r->end - rc->r->p))
      return luaL_error(L, "malformed message: bad value count");
    luapool__decode_task(L, rc->r, (int)n);
    return 1;
  }
  if (lua_gettop(L) == 0) {
    if (rc->kernel >= 0)
      lua_pushcfunction(L, luapool__kernels[rc->kernel].lua_fn);
    else
      luapool__decode_task(L, rc->r, 1); /* fn at 1 */
  }
  if (rc->done >= rc->ncalls || stopped_short(rc->ws)) return 0;
  if (luapool__get_u32(rc->r, &n) || n > (size_t)(rc->r->end - rc->r->p))
    return luaL_error(L, "malformed message: bad argument count");
  lua_pushvalue(L, 1);
  luapool__decode_task(L, rc->r, (int)n);
  return 1;
}

static int call_base(const run_ctx *rc) { return rc->kind == LP_MSG_SINGLE ? 0 : 1; }

/* Protected body: decodes and runs the calls of the message not yet done. */
static int run_calls(lua_State *L) {
  run_ctx *rc = lua_touserdata(L, 1);
  lua_settop(L, 0);
  while (next_call(L, rc)) {
    int base = call_base(rc);
    int nargs = call_begin(L, rc, base);
    call_end(L, rc, lua_pcall(L, nargs, LUA_MULTRET, base + 1), base);
  }
  return 0;
}

/* }====================================================== */

static lua_State *ensure_state(lp_wstate *ws) {
  if (ws->L) return ws->L;
  lua_State *L = ws->mem_cap ? lua_newstate(capped_alloc, ws) : luaL_newstate();
  if (L == NULL) return NULL;
  /* (luaL_newstate's panic and warning functions; no block of it is big.
  ** A capped state keeps its capped allocator: no engine sets both.) */
  if (ws->big && !ws->mem_cap) lua_setallocf(L, thread_alloc, ws->big);
  if (luapool__worker_state_init(L, ws) != 0) {
    lua_close(L);
    if (ws->big) luapool__big_close(&ws->big->heap);
    return NULL;
  }
  ws->L = L;
  if (ws->mem_cap) set_gc_at(ws);
  if (strcmp(ws->kind, "thread") == 0) luapool__set_task_state(L); /* for STOP_SIGNAL */
  return L;
}

/* Native path: runs kernel calls from the bytes while their arguments are
** scalars.  Returns -1 on no memory, else leaves rc->done at the first call
** that needs Lua (== ncalls when all ran). */
static int run_native(run_ctx *rc, int k) {
  while (rc->done < rc->ncalls && !stopped_short(rc->ws)) {
    lp_reader call_r = *rc->r;
    uint32_t nargs;
    if (rc->kind == LP_MSG_SINGLE) {
      if (luapool__get_u32(rc->r, &nargs) || nargs < 1) break;
      nargs--;
      if (luapool__peek_kernel(rc->r) < 0) break;
    } else if (luapool__get_u32(rc->r, &nargs)) {
      break;
    }
    int s = run_kernel_call(rc->ws, k, rc->done, rc->r, nargs, rc->out, &rc->nerr);
    if (s < 0) return -1;
    if (s == 0) {
      *rc->r = call_r;
      break;
    }
    rc->done++;
  }
  return 0;
}

/* Runs the calls of msg, filling in rc (the reply goes to rc->out). */
static int run_calls_of(run_ctx *rc, const char *msg, size_t len) {
  lp_wstate *ws = rc->ws;
  lp_buf *out = rc->out;
  unsigned kind;
  rc->rd = (lp_reader){msg, msg + len};
  rc->r = &rc->rd;
  lp_reader *const r = rc->r;
  if (luapool__get_u8(r, &kind) || (kind != LP_MSG_SINGLE && kind != LP_MSG_BATCH)) {
    rc->nerr++;
    return put_error_text(out, "malformed message: bad kind");
  }
  rc->kind = (int)kind;
  if (kind == LP_MSG_BATCH) {
    if (luapool__get_u32(r, &rc->ncalls) || rc->ncalls > len) {
      rc->nerr++;
      return put_error_text(out, "malformed message: bad call count");
    }
    rc->kernel = luapool__peek_kernel(r);
    if (rc->kernel >= 0 && run_native(rc, rc->kernel)) return -1;
  } else {
    lp_reader peek = *r;
    uint32_t n;
    if (luapool__get_u32(&peek, &n) == 0 && n >= 1) {
      int k = luapool__peek_kernel(&peek);
      if (k >= 0 && run_native(rc, k)) return -1;
    }
  }
  if (rc->done == rc->ncalls || ws->aborted) return 0;
  /* Lua path, for the calls not done natively. */
  lua_State *L = ensure_state(ws);
  check_cap(ws); /* a state that could not be created within the cap */
  if (L == NULL) {
    for (; rc->done < rc->ncalls; rc->done++, rc->nerr++)
      if (put_error_text(out, "cannot create a Lua state: not enough memory")) return -1;
    return 0;
  }
  lua_settop(L, 0);
  rc->mark = out->len;
  rc->nerr_mark = rc->nerr;
  lua_pushcfunction(L, run_calls);
  lua_pushlightuserdata(L, rc);
  int st = lua_pcall(L, 1, 0, 0);
  check_cap(ws);
  if (st != LUA_OK) {
    /* A failure outside any task (the worker could not receive the task,
    ** or ran out of memory answering it): every call not yet replied to
    ** fails with it, kind "transfer", so none is lost. */
    char buf[600];
    const char *m = lua_tostring(L, -1);
    snprintf(buf, sizeof buf, "worker %s could not receive the task: %s", ws->name,
             m ? m : "error in worker");
    out->len = rc->mark; /* drop a reply cut short */
    rc->nerr = rc->nerr_mark;
    for (; rc->done < rc->ncalls && !ws->aborted; rc->done++, rc->nerr++)
      if (put_transfer(out, buf)) return -1;
  }
  lua_settop(L, 0);
  return 0;
}

int luapool__run_message(lp_wstate *ws, const char *msg, size_t len, lp_buf *out) {
  size_t head = out->len;
  if (luapool__put_u32(out, 0)) return -1;
  run_ctx rc = {.ws = ws, .out = out, .kernel = -1, .ncalls = 1};
  ws->aborted = 0;
  int r = run_calls_of(&rc, msg, len);
  uint32_t header = rc.nerr | (rc.named ? LP_REPLY_NAMED : 0);
  memcpy(out->p + head, &header, 4);
  return r;
}

/* {======================================================
** A task message as a coroutine (an event loop's tasks: engines/iopool.c)
** The same calls, decoded and answered by the same code as above, but
** run inside a coroutine of the loop thread's state through lua_pcallk,
** so a call may yield to the loop (a request, a sleep) and go on later.
** ======================================================= */

struct lp_cotask {
  lp_wstate *ws;
  lua_State *co; /* NULL before the first resume */
  int ref;       /* anchors co in the registry */
  lp_buf out;
  run_ctx rc;
  /* The task's part of ws, kept here while other tasks run. */
  double call_timeout, deadline;
  uint64_t task_no;
  int64_t item_lo;
  int aborted, in_call;
  /* Its own stop block: a call's number and a stop aimed at it (a request
  ** that met the deadline marks its task stopped) concern this task, not
  ** the others of the loop.  The loop's own block is kept aside. */
  lp_interrupt intr;
  lp_interrupt *loop_intr;
  int started; /* resumed once */
  int ended;   /* the reply is whole */
};

static int co_loop(lua_State *L, run_ctx *rc);

static int co_cont(lua_State *L, int status, lua_KContext ctx) {
  /* (Lua's continuation context is an intptr_t: co_loop passed rc) */
  run_ctx *rc = (run_ctx *)ctx; // NOLINT(performance-no-int-to-ptr)
  call_end(L, rc, status == LUA_YIELD ? LUA_OK : status, call_base(rc));
  return co_loop(L, rc);
}

/* Runs the calls not yet done; a yield inside one comes back through
** co_cont, which answers it and goes on with the next. */
static int co_loop(lua_State *L, run_ctx *rc) {
  while (next_call(L, rc)) {
    int base = call_base(rc);
    int nargs = call_begin(L, rc, base);
    call_end(L, rc, lua_pcallk(L, nargs, LUA_MULTRET, base + 1, (lua_KContext)rc, co_cont), base);
  }
  return 0;
}

static int co_body(lua_State *L) {
  run_ctx *rc = lua_touserdata(L, 1);
  lua_settop(L, 0);
  return co_loop(L, rc);
}

/* Protected: a new coroutine (anchored) with co_body and rc on it. */
static int co_create(lua_State *L) {
  lp_cotask *t = lua_touserdata(L, 1);
  t->co = lua_newthread(L);
  lua_pushcfunction(t->co, co_body);
  lua_pushlightuserdata(t->co, &t->rc);
  t->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static void co_finish(lp_cotask *t) {
  uint32_t header = t->rc.nerr | (t->rc.named ? LP_REPLY_NAMED : 0);
  memcpy(t->out.p, &header, 4);
  t->ended = 1;
}

lp_cotask *luapool__co_new(lp_wstate *ws, const char *msg, size_t len, double call_timeout,
                           uint64_t task_no, int64_t item_lo) {
  lp_cotask *t = lp_calloc(1, sizeof *t);
  if (t == NULL) return NULL;
  t->ws = ws;
  t->ref = LUA_NOREF;
  atomic_init(&t->intr.closing, 0);
  atomic_init(&t->intr.seq, 0);
  atomic_init(&t->intr.kill_seq, UINT64_MAX); /* matches no call */
  atomic_init(&t->intr.reason, 0);
  t->call_timeout = call_timeout;
  t->task_no = task_no;
  t->item_lo = item_lo;
  run_ctx *rc = &t->rc;
  *rc = (run_ctx){.ws = ws, .out = &t->out, .kernel = -1, .ncalls = 1};
  rc->rd = (lp_reader){msg, msg + len};
  rc->r = &rc->rd;
  unsigned kind;
  int bad = 0;
  if (luapool__put_u32(&t->out, 0)) {
    lp_free(t);
    return NULL;
  }
  if (luapool__get_u8(rc->r, &kind) || (kind != LP_MSG_SINGLE && kind != LP_MSG_BATCH))
    bad = put_error_text(&t->out, "malformed message: bad kind") ? -1 : 1;
  else if (kind == LP_MSG_BATCH && (luapool__get_u32(rc->r, &rc->ncalls) || rc->ncalls > len))
    bad = put_error_text(&t->out, "malformed message: bad call count") ? -1 : 1;
  if (bad < 0) {
    luapool__buf_free(&t->out);
    lp_free(t);
    return NULL;
  }
  rc->kind = (int)kind;
  if (bad) {
    rc->nerr = 1;
    co_finish(t);
  } else if (rc->kind == LP_MSG_BATCH) {
    rc->kernel = luapool__peek_kernel(rc->r); /* (its Lua face, in Lua) */
  }
  rc->mark = t->out.len;
  lua_State *L = luapool__worker_lua(ws);
  if (L == NULL) goto nomem;
  lua_pushcfunction(L, co_create);
  lua_pushlightuserdata(L, t);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    lua_pop(L, 1);
    goto nomem;
  }
  return t;
nomem:
  luapool__buf_free(&t->out);
  lp_free(t);
  return NULL;
}

/* Gives ws the task's part (in), or takes it back (out). */
static void co_swap(lp_cotask *t, int in) {
  lp_wstate *ws = t->ws;
  if (in) {
    t->loop_intr = ws->intr;
    ws->intr = &t->intr;
    ws->call_timeout = t->call_timeout;
    ws->deadline = t->deadline;
    ws->task_no = t->task_no;
    ws->item_lo = t->item_lo;
    ws->aborted = t->aborted;
    ws->in_call = t->in_call;
  } else {
    t->deadline = ws->deadline;
    t->aborted = ws->aborted;
    t->in_call = ws->in_call;
    ws->in_call = 0;
    ws->deadline = 0;
    ws->intr = t->loop_intr;
  }
}

/* Every call not yet replied to fails with m (kind "transfer"). */
static int co_fail_rest(lp_cotask *t, const char *m) {
  run_ctx *rc = &t->rc;
  t->out.len = rc->mark; /* drop a reply cut short */
  rc->nerr = rc->nerr_mark;
  for (; rc->done < rc->ncalls && !t->aborted; rc->done++, rc->nerr++)
    if (put_transfer(&t->out, m)) return -1;
  return 0;
}

int luapool__co_resume(lp_cotask *t, void *yielded[2]) {
  if (t->ended) return LP_CO_DONE;
  lp_wstate *ws = t->ws;
  int nargs = t->started ? 0 : 1; /* co_body's argument */
  t->started = 1;
  co_swap(t, 1);
  int nres, st = lua_resume(t->co, ws->L, nargs, &nres);
  co_swap(t, 0);
  if (st == LUA_YIELD) {
    yielded[0] = yielded[1] = NULL;
    if (nres == 2 && lua_islightuserdata(t->co, -2) && lua_islightuserdata(t->co, -1)) {
      yielded[0] = lua_touserdata(t->co, -2);
      yielded[1] = lua_touserdata(t->co, -1);
    }
    lua_pop(t->co, nres);
    return LP_CO_YIELD;
  }
  if (st != LUA_OK) {
    /* A failure outside any call (run_calls_of has the same). */
    char buf[600];
    const char *m = lua_tostring(t->co, -1);
    snprintf(buf, sizeof buf, "worker %s could not receive the task: %s", ws->name,
             m ? m : "error in worker");
    if (co_fail_rest(t, buf)) return -1;
  }
  co_finish(t);
  return LP_CO_DONE;
}

lua_State *luapool__co_thread(const lp_cotask *t) { return t->co; }

int luapool__co_end(lp_cotask *t, const char *m) {
  run_ctx *rc = &t->rc;
  if (t->ended) return 0;
  if (rc->done < rc->ncalls) {
    t->out.len = rc->mark;
    rc->nerr = rc->nerr_mark + 1;
    if (put_error_text(&t->out, m)) return -1;
    rc->done++;
  }
  co_finish(t); /* the calls after it are not run, as after a stop */
  return 0;
}

char *luapool__co_reply(lp_cotask *t, size_t *len) { return luapool__buf_take(&t->out, len); }

void luapool__co_free(lp_cotask *t) {
  if (t == NULL) return;
  lua_State *L = t->ws->L;
  if (t->co != NULL && L != NULL) {
    /* (runs the pending to-be-closed variables of a task stopped midway) */
    if (lua_status(t->co) == LUA_YIELD) lua_resetthread(t->co);
    luaL_unref(L, LUA_REGISTRYINDEX, t->ref);
  }
  luapool__buf_free(&t->out);
  lp_free(t);
}

lua_State *luapool__worker_lua(lp_wstate *ws) { return ensure_state(ws); }

/* }====================================================== */
