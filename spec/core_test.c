/*
** C tests of the core (ctest core_test): the future state machine, the
** completion queue and the pool core, driven through fake engines, with
** no Lua state.  Races are run thousands of times; either way a race is
** decided must be a valid outcome, so the result is deterministic even
** though the interleaving is not.
**
** Three fake engines:
**  - "manual": no thread at all; the test takes futures off the pool's
**    queue itself (luapool__pool_take) and settles them from threads it
**    starts, to race start/cancel/finish/fail exactly;
**  - "loop": one thread of its own that runs every task (as an event loop
**    or an MPI progress thread would), with a cancel entry that stops a
**    running task (luapool__future_cancel -> hook -> engine ->
**    luapool__future_cancel_running);
**  - "fake": a worker set (core/workers.c) whose run() settles each future
**    as its message says.
** In a LUAPOOL_TEST_ALLOC build, the out-of-memory scenarios fail each C
** allocation of a scenario in turn (base/alloc.h): each must end cleanly,
** and ASan (the oom gate's build) finds any leak.
**
** A failed check prints file:line, what was expected and what was got,
** and the program exits 1.
**   core_test [ROUNDS]    (default 5000: the rounds of each race)
*/
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/alloc.h"
#include "base/stop.h"
#include "base/util.h"
#include "core/engine.h"
#include "core/future.h"
#include "core/pool.h"
#include "core/workers.h"

/* {====== checks */
static int nchecks;

static void fail_at(const char *file, int line, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "%s:%d: ", file, line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

#define CHECK_INT(got, want)                                                                       \
  do {                                                                                             \
    long long got_ = (long long)(got), want_ = (long long)(want);                                  \
    nchecks++;                                                                                     \
    if (got_ != want_)                                                                             \
      fail_at(__FILE__, __LINE__, "%s: expected %lld, got %lld", #got, want_, got_);               \
  } while (0)

#define CHECK_STR(got, want)                                                                       \
  do {                                                                                             \
    const char *got_ = (got), *want_ = (want);                                                     \
    nchecks++;                                                                                     \
    if (got_ == NULL || strcmp(got_, want_) != 0)                                                  \
      fail_at(__FILE__, __LINE__, "%s: expected \"%s\", got %s%s%s", #got, want_,                  \
              got_ ? "\"" : "", got_ ? got_ : "NULL", got_ ? "\"" : "");                           \
  } while (0)

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    nchecks++;                                                                                     \
    if (!(cond)) fail_at(__FILE__, __LINE__, "expected %s, it is false", #cond);                   \
  } while (0)
/* }====== */

/* {====== helpers */
static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Busy-waits us microseconds (a sleep would be far longer). */
static void spin_us(int us) {
  double until = luapool__now() + us * 1e-6;
  while (us > 0 && luapool__now() < until)
    ;
}

/* A pending future whose message is op followed by pad bytes (pad > 23:
** a message of its own allocation, not inline). */
static lp_future *new_future(char op, size_t pad, int ncalls) {
  lp_buf b = {0};
  char m[8192];
  if (pad + 1 > sizeof m) abort();
  m[0] = op;
  memset(m + 1, 'x', pad);
  if (luapool__buf_add(&b, m, pad + 1) != 0) return NULL;
  lp_future *f = luapool__future_new(&b, ncalls);
  luapool__buf_free(&b);
  return f;
}

/* A reply of len bytes (len >= 4) whose header says nerr calls failed. */
static char *make_reply(uint32_t nerr, size_t len) {
  char *r = malloc(len);
  if (r == NULL) abort();
  memset(r, 'r', len);
  memcpy(r, &nerr, 4);
  return r;
}

static const char *state_name(lp_fstate s) {
  static const char *const names[] = {"pending", "running", "finished", "failed", "cancelled"};
  return names[s];
}

#define CHECK_STATE(f, want)                                                                       \
  do {                                                                                             \
    lp_fstate got_ = luapool__future_state(f);                                                     \
    nchecks++;                                                                                     \
    if (got_ != (want))                                                                            \
      fail_at(__FILE__, __LINE__, "state of %s: expected %s, got %s", #f, state_name(want),        \
              state_name(got_));                                                                   \
  } while (0)

typedef struct counts {
  size_t pending, running, done, failed, cancelled;
} counts;

static counts counters(lp_pool *p) {
  return (counts){atomic_load(&p->c_pending), atomic_load(&p->c_running), atomic_load(&p->c_done),
                  atomic_load(&p->c_failed), atomic_load(&p->c_cancelled)};
}

/* The pool's counters are exactly these, and add up to submitted. */
#define CHECK_COUNTS(p, pe, ru, dn, fa, ca, submitted)                                             \
  do {                                                                                             \
    counts c_ = counters(p);                                                                       \
    nchecks++;                                                                                     \
    if (c_.pending != (size_t)(pe) || c_.running != (size_t)(ru) || c_.done != (size_t)(dn) ||     \
        c_.failed != (size_t)(fa) || c_.cancelled != (size_t)(ca))                                 \
      fail_at(__FILE__, __LINE__,                                                                  \
              "counters: expected pending %zu running %zu done %zu failed %zu cancelled %zu, "     \
              "got %zu %zu %zu %zu %zu",                                                           \
              (size_t)(pe), (size_t)(ru), (size_t)(dn), (size_t)(fa), (size_t)(ca), c_.pending,    \
              c_.running, c_.done, c_.failed, c_.cancelled);                                       \
    CHECK_INT(c_.pending + c_.running + c_.done + c_.failed + c_.cancelled, submitted);            \
  } while (0)

/* Waits (polling) until cond holds, at most 20 s (a loaded machine). */
#define WAIT_UNTIL(cond)                                                                           \
  do {                                                                                             \
    double until_ = luapool__now() + 20;                                                           \
    while (!(cond)) {                                                                              \
      if (luapool__now() > until_) fail_at(__FILE__, __LINE__, "timed out waiting for %s", #cond); \
      sleep_ms(1);                                                                                 \
    }                                                                                              \
  } while (0)

static const char *emsg(lp_future *f) { return f->state == LP_FAILED ? f->emsg : NULL; }

static lp_future *take(lp_pool *p) {
  pthread_mutex_lock(&p->mu);
  lp_future *f = luapool__pool_take(p);
  pthread_mutex_unlock(&p->mu);
  return f;
}

static int default_one(int ncpu) {
  (void)ncpu;
  return 1;
}
/* }====== */

/* {====== the manual engine: no thread; the test drives every future */
static atomic_int manual_cancel_mode;  /* 1: its cancel entry stops a running future */
static atomic_int manual_cancel_calls; /* how often the core called it */
static atomic_int manual_refuse;       /* queued() says nothing could run it */

static int manual_open(lp_pool *p, char *err, size_t errsz) {
  (void)err, (void)errsz;
  p->es = NULL;
  return 0;
}
static int manual_queued(lp_pool *p, char *err, size_t errsz) {
  (void)p;
  if (!atomic_load(&manual_refuse)) return 0;
  snprintf(err, errsz, "no worker could start");
  return -1;
}
static int manual_cancel(lp_pool *p, lp_future *f) {
  (void)p;
  atomic_fetch_add(&manual_cancel_calls, 1);
  return atomic_load(&manual_cancel_mode) ? luapool__future_cancel_running(f) : 0;
}
static void manual_interrupt(lp_pool *p) { (void)p; }
static int manual_stop(lp_pool *p, int interrupt, int wait) {
  (void)p, (void)interrupt, (void)wait;
  return 0;
}
static void manual_free(lp_pool *p) { (void)p; }
static void manual_stats(lp_pool *p, int *workers, int *idle) {
  (void)p;
  *workers = *idle = 0;
}

static const lp_engine manual_engine = {
    .kind = "manual",
    .default_workers = default_one,
    .open = manual_open,
    .queued = manual_queued,
    .cancel = manual_cancel,
    .interrupt = manual_interrupt,
    .stop = manual_stop,
    .free = manual_free,
    .stats = manual_stats,
};

static lp_pool *new_pool(const lp_engine *e, int max_workers) {
  lp_pool_config c = {.max_workers = max_workers};
  char err[256];
  lp_pool *p = luapool__pool_create(e, &c, NULL, NULL, 0, NULL, err, sizeof err);
  if (p == NULL) fail_at(__FILE__, __LINE__, "pool_create: %s", err);
  return p;
}

static void end_pool(lp_pool *p) {
  lp_stop_counts sc;
  CHECK_INT(luapool__pool_stop(p, 1, 1, 1, &sc), 0);
  luapool__pool_destroy(p);
}

static void submit_ok(lp_pool *p, lp_future *f) {
  char err[256];
  if (luapool__pool_submit(p, f, err, sizeof err) != 0)
    fail_at(__FILE__, __LINE__, "submit: expected 0, got -1 (%s)", err);
}
/* }====== */

/* {====== the state machine, one thread */
static void test_states(void) {
  lp_pool *p = new_pool(&manual_engine, 1);
  char label[48];
  size_t submitted = 0;

  /* pending -> running -> finished (an inline reply, copied) */
  lp_future *f = new_future('a', 3, 1);
  CHECK(f != NULL);
  CHECK(f->msg == f->inline_buf);
  submit_ok(p, f), submitted++;
  CHECK_COUNTS(p, 1, 0, 0, 0, 0, submitted);
  CHECK(take(p) == f);
  CHECK(take(p) == NULL);
  CHECK_INT(luapool__future_start(f, "w-1"), 1);
  CHECK_STR(f->worker, "w-1");
  CHECK_COUNTS(p, 0, 1, 0, 0, 0, submitted);
  CHECK_INT(luapool__future_start(f, "w-2"), 0); /* once */
  char *r = make_reply(0, 10);
  luapool__future_finish(f, r, 10, 1);
  free(r);
  CHECK_STATE(f, LP_FINISHED);
  CHECK(f->reply == f->inline_buf);
  CHECK_INT(f->replylen, 10);
  CHECK(f->msg == NULL); /* dropped once the task ran */
  CHECK_INT(luapool__future_nerr(f), 0);
  CHECK_COUNTS(p, 0, 0, 1, 0, 0, submitted);
  /* every later transition is refused */
  CHECK_INT(luapool__future_cancel(f), 0);
  CHECK_INT(luapool__future_fail(f, LP_EK_CRASHED, "late"), 0);
  CHECK_INT(luapool__future_cancel_running(f), 0);
  r = make_reply(0, 100);
  luapool__future_finish(f, r, 100, 0); /* taken and freed: it lost */
  CHECK_INT(f->replylen, 10);
  CHECK_COUNTS(p, 0, 0, 1, 0, 0, submitted);
  CHECK_INT(luapool__future_wait(f, 0), 1);
  CHECK_INT(luapool__future_wait(f, -1), 1);
  luapool__future_unref(f); /* the queue's, taken */
  luapool__future_unref(f); /* ours */

  /* a large message and a large reply taken over; 2 of 3 calls failed */
  f = new_future('b', 500, 3);
  CHECK(f->msg != f->inline_buf);
  f->item_lo = 7;
  CHECK_STR(luapool__future_label(f, label, sizeof label), "items #7-#9");
  submit_ok(p, f), submitted += 3;
  CHECK_COUNTS(p, 3, 0, 1, 0, 0, submitted);
  CHECK(take(p) == f);
  CHECK_INT(luapool__future_start(f, "w-1"), 1);
  CHECK_COUNTS(p, 0, 3, 1, 0, 0, submitted);
  r = make_reply(2, 1000);
  luapool__future_finish(f, r, 1000, 0);
  CHECK(f->reply == r);
  CHECK_INT(luapool__future_nerr(f), 2);
  CHECK_INT(luapool__future_flagged(f), 0);
  CHECK_COUNTS(p, 0, 0, 2, 2, 0, submitted);
  luapool__future_unref(f);
  luapool__future_unref(f);

  /* a reply that says more calls failed than the future holds counts
  ** them all failed, never more */
  f = new_future('c', 0, 1);
  submit_ok(p, f), submitted++;
  CHECK(take(p) == f);
  CHECK_INT(luapool__future_start(f, "w-1"), 1);
  r = make_reply(5, 8);
  luapool__future_finish(f, r, 8, 1);
  free(r);
  CHECK_COUNTS(p, 0, 0, 2, 3, 0, submitted);
  luapool__future_unref(f);
  luapool__future_unref(f);

  /* pending -> cancelled: start refuses it, the message goes at once */
  f = new_future('d', 300, 1);
  f->task_no = 12;
  CHECK_STR(luapool__future_label(f, label, sizeof label), "task #12");
  submit_ok(p, f), submitted++;
  CHECK_INT(luapool__future_cancel(f), 1);
  CHECK_STATE(f, LP_CANCELLED);
  CHECK(f->msg == NULL);
  CHECK_INT(luapool__future_cancel(f), 0);
  CHECK(take(p) == f); /* still queued: an engine takes it and skips it */
  CHECK_INT(luapool__future_start(f, "w-1"), 0);
  CHECK(f->worker == NULL);
  CHECK_COUNTS(p, 0, 0, 2, 3, 1, submitted);
  luapool__future_unref(f);
  luapool__future_unref(f);

  /* pending -> failed (a broken pool's queue) */
  f = new_future('e', 0, 2);
  submit_ok(p, f), submitted += 2;
  CHECK_INT(luapool__future_fail(f, LP_EK_BROKEN, "pool %s", "gone"), 1);
  CHECK_STATE(f, LP_FAILED);
  CHECK_INT(f->ekind, LP_EK_BROKEN);
  CHECK_STR(emsg(f), "pool gone");
  CHECK_INT(luapool__future_nerr(f), 0);
  CHECK_COUNTS(p, 0, 0, 2, 5, 1, submitted);
  CHECK(take(p) == f);
  luapool__future_unref(f);
  luapool__future_unref(f);

  /* running -> cancelled through the engine's cancel entry */
  atomic_store(&manual_cancel_mode, 1);
  atomic_store(&manual_cancel_calls, 0);
  f = new_future('f', 100, 1);
  submit_ok(p, f), submitted++;
  CHECK(take(p) == f);
  CHECK_INT(luapool__future_cancel_running(f), 0); /* not running yet */
  CHECK_INT(luapool__future_start(f, "w-1"), 1);
  CHECK_INT(luapool__future_cancel(f), 1);
  CHECK_INT(atomic_load(&manual_cancel_calls), 1);
  CHECK_STATE(f, LP_CANCELLED);
  CHECK(f->msg != NULL); /* the engine may still read it */
  CHECK_COUNTS(p, 0, 0, 2, 5, 2, submitted);
  luapool__future_finish(f, "\0\0\0\0", 4, 1); /* the engine's late finish: ignored */
  CHECK_STATE(f, LP_CANCELLED);
  CHECK_COUNTS(p, 0, 0, 2, 5, 2, submitted);
  luapool__future_unref(f);
  luapool__future_unref(f);
  /* an engine that cannot stop a running task: cancel says so */
  atomic_store(&manual_cancel_mode, 0);
  f = new_future('g', 0, 1);
  submit_ok(p, f), submitted++;
  CHECK(take(p) == f);
  CHECK_INT(luapool__future_start(f, "w-1"), 1);
  CHECK_INT(luapool__future_cancel(f), 0);
  CHECK_INT(atomic_load(&manual_cancel_calls), 2);
  CHECK_STATE(f, LP_RUNNING);
  CHECK_INT(luapool__future_fail(f, LP_EK_CRASHED, "worker %d died", 3), 1);
  CHECK_STR(emsg(f), "worker 3 died");
  CHECK_COUNTS(p, 0, 0, 2, 6, 2, submitted);
  luapool__future_unref(f);
  luapool__future_unref(f);

  /* a submit the engine cannot run: not queued, not counted, -1 with why */
  atomic_store(&manual_refuse, 1);
  f = new_future('h', 0, 1);
  char err[256] = "";
  CHECK_INT(luapool__pool_submit(p, f, err, sizeof err), -1);
  CHECK_STR(err, "no worker could start");
  CHECK_INT(atomic_load(&f->refs), 1);
  CHECK(f->pool == NULL);
  CHECK_INT(p->npending, 0);
  CHECK(p->head == NULL && p->tail == NULL);
  atomic_store(&manual_refuse, 0);
  luapool__future_unref(f);
  CHECK_COUNTS(p, 0, 0, 2, 6, 2, submitted);

  /* a future of no pool moves no counter */
  f = new_future('i', 0, 1);
  CHECK_INT(luapool__future_cancel(f), 1);
  luapool__future_unref(f);
  CHECK_COUNTS(p, 0, 0, 2, 6, 2, submitted);

  /* shut down: submits refused */
  lp_stop_counts sc = {9, 9};
  CHECK_INT(luapool__pool_stop(p, 1, 1, 0, &sc), 0);
  CHECK_INT(sc.cancelled, 0);
  CHECK_INT(sc.interrupted, 0);
  f = new_future('j', 0, 1);
  CHECK_INT(luapool__pool_submit(p, f, err, sizeof err), -1);
  CHECK_STR(err, "cannot submit after shutdown");
  luapool__future_unref(f);
  luapool__pool_destroy(p);
}
/* }====== */

/* {====== races, on the manual engine
** A racer thread meets the main thread at a barrier for each round, so
** both act on the same future at the same moment. */
typedef struct race {
  pthread_barrier_t go, done; /* the main thread and every racer */
  lp_future *f;
  int op[2]; /* what each racer does this round */
  int result[2];
  int nracers;
  int spin; /* R_START_FINISH: busy-waits this many µs between the two */
  atomic_int quit;
} race;

typedef struct racer {
  race *r;
  int i;
} racer;

enum { R_START_FINISH, R_FINISH_INLINE, R_FINISH_TAKEN, R_FINISH_COPY, R_FAIL };

static int racer_act(lp_future *f, int op, int spin) {
  char *rep;
  int result = 0;
  switch (op) {
    case R_START_FINISH:
      result = luapool__future_start(f, "racer");
      spin_us(spin);
      if (result) luapool__future_finish(f, "\0\0\0\0ok", 6, 1);
      break;
    case R_FINISH_INLINE: luapool__future_finish(f, "\0\0\0\0ok", 6, 1); break;
    case R_FINISH_TAKEN:
      rep = make_reply(0, 200);
      luapool__future_finish(f, rep, 200, 0);
      break;
    case R_FINISH_COPY:
      rep = make_reply(0, 200);
      luapool__future_finish(f, rep, 200, 1);
      free(rep);
      break;
    case R_FAIL: result = luapool__future_fail(f, LP_EK_CRASHED, "lost"); break;
  }
  return result;
}

static void *racer_main(void *arg) {
  racer *me = arg;
  race *r = me->r;
  for (;;) {
    pthread_barrier_wait(&r->go);
    if (atomic_load(&r->quit)) return NULL;
    r->result[me->i] = racer_act(r->f, r->op[me->i], r->spin);
    pthread_barrier_wait(&r->done);
  }
}

static void race_init(race *r, racer *rs, pthread_t *t, int nracers) {
  memset(r, 0, sizeof *r);
  r->nracers = nracers;
  pthread_barrier_init(&r->go, NULL, (unsigned)nracers + 1);
  pthread_barrier_init(&r->done, NULL, (unsigned)nracers + 1);
  for (int i = 0; i < nracers; i++) {
    rs[i] = (racer){r, i};
    if (pthread_create(&t[i], NULL, racer_main, &rs[i]) != 0) abort();
  }
}

static void race_end(race *r, pthread_t *t) {
  atomic_store(&r->quit, 1);
  pthread_barrier_wait(&r->go);
  for (int i = 0; i < r->nracers; i++)
    pthread_join(t[i], NULL);
  pthread_barrier_destroy(&r->go);
  pthread_barrier_destroy(&r->done);
}

/* The racer starts (then finishes) a queued future while the owner
** cancels it: the cancel wins (the start fails) or the start does (the
** cancel fails, or, when the engine can stop a running task, the cancel
** ends it cancelled and the racer's finish is refused). */
static void test_race_cancel_start(int rounds) {
  lp_pool *p = new_pool(&manual_engine, 1);
  race r;
  racer rs[1];
  pthread_t t[1];
  race_init(&r, rs, t, 1);
  size_t ncancelled = 0, nfinished = 0, via_engine = 0;
  atomic_store(&manual_cancel_calls, 0);
  for (int i = 0; i < rounds; i++) {
    int stops_running = i % 2;
    atomic_store(&manual_cancel_mode, stops_running);
    lp_future *f = new_future('c', i % 3 == 0 ? 100 : 0, 1);
    submit_ok(p, f);
    CHECK(take(p) == f);
    r.f = f;
    r.op[0] = R_START_FINISH;
    r.spin = (i / 8 % 4) * 20; /* µs: a window for the cancel to find it running */
    pthread_barrier_wait(&r.go);
    spin_us((i % 8) * 10); /* the cancel comes later or sooner */
    int c = luapool__future_cancel(f);
    pthread_barrier_wait(&r.done);
    lp_fstate end = luapool__future_state(f);
    if (c) {
      CHECK_INT(end, LP_CANCELLED);
      ncancelled++;
      /* the start lost, or won and the engine stopped the task */
      if (r.result[0]) {
        CHECK_INT(stops_running, 1);
        via_engine++;
      }
    } else {
      CHECK_INT(r.result[0], 1);
      CHECK_INT(end, LP_FINISHED);
      CHECK_INT(f->replylen, 6);
      nfinished++;
    }
    luapool__future_unref(f);
    luapool__future_unref(f);
  }
  race_end(&r, t);
  printf("    %zu cancelled (%zu through the engine), %zu finished\n", ncancelled, via_engine,
         nfinished);
  CHECK_INT(ncancelled + nfinished, rounds);
  /* every cancel through the engine was a call of its cancel entry */
  CHECK(atomic_load(&manual_cancel_calls) >= (int)via_engine);
  CHECK_COUNTS(p, 0, 0, nfinished, 0, ncancelled, rounds);
  atomic_store(&manual_cancel_mode, 0);
  end_pool(p);
}

/* A running future is finished by one racer, failed by another and, one
** round in four, cancelled by its engine (the owner) at once: exactly one
** of them wins, and the future holds that one's outcome. */
static void test_race_fail_finish(int rounds) {
  lp_pool *p = new_pool(&manual_engine, 1);
  race r;
  racer rs[2];
  pthread_t t[2];
  race_init(&r, rs, t, 2);
  size_t wins[3] = {0, 0, 0}; /* calls finished, failed, cancelled */
  for (int i = 0; i < rounds; i++) {
    lp_future *f = new_future('f', i % 2 ? 100 : 0, 1 + i % 3);
    submit_ok(p, f);
    CHECK(take(p) == f);
    CHECK_INT(luapool__future_start(f, "w"), 1);
    r.f = f;
    r.op[0] = R_FINISH_INLINE + i % 3;
    r.op[1] = R_FAIL;
    pthread_barrier_wait(&r.go);
    int c = i % 4 == 0 ? luapool__future_cancel_running(f) : 0;
    pthread_barrier_wait(&r.done);
    lp_fstate end = luapool__future_state(f);
    int finished = end == LP_FINISHED;
    CHECK_INT(finished + r.result[1] + c, 1);
    if (finished) {
      CHECK_INT(f->replylen, r.op[0] == R_FINISH_INLINE ? 6 : 200);
      wins[0] += (size_t)f->ncalls;
    } else if (r.result[1]) {
      CHECK_INT(end, LP_FAILED);
      CHECK_INT(f->ekind, LP_EK_CRASHED);
      CHECK_STR(emsg(f), "lost");
      wins[1] += (size_t)f->ncalls;
    } else {
      CHECK_INT(end, LP_CANCELLED);
      wins[2] += (size_t)f->ncalls;
    }
    luapool__future_unref(f);
    luapool__future_unref(f);
  }
  race_end(&r, t);
  printf("    calls won by finish %zu, fail %zu, cancel %zu\n", wins[0], wins[1], wins[2]);
  CHECK_COUNTS(p, 0, 0, wins[0], wins[1], wins[2], wins[0] + wins[1] + wins[2]);
  end_pool(p);
}
/* }====== */

/* {====== waits with timeouts, completion queues */
typedef struct later {
  lp_future *f;
  int ms;
} later;

static void *finish_later(void *arg) {
  later *l = arg;
  sleep_ms(l->ms);
  luapool__future_finish(l->f, "\0\0\0\0", 4, 1);
  return NULL;
}

static lp_wnode *watch(lp_cq *q, lp_future *f, int id) {
  lp_wnode *n = calloc(1, sizeof *n);
  if (n == NULL) abort();
  luapool__future_ref(f);
  n->f = f;
  n->q = q;
  n->id = id;
  n->anext = q->all;
  if (n->anext) n->anext->aprev = n;
  q->all = n;
  q->waiting++;
  luapool__cq_watch(n);
  return n;
}

/* As lfuture.c's pop: the node leaves the queue's list and is freed. */
static int pop(lp_cq *q, double timeout) {
  lp_wnode *n = NULL;
  double t0 = luapool__now();
  int r = luapool__cq_wait(q, timeout, t0, &n);
  if (r == 0) {
    CHECK(n == NULL);
    return 0;
  }
  CHECK_INT(r, 1);
  q->waiting--;
  if (n->aprev)
    n->aprev->anext = n->anext;
  else
    q->all = n->anext;
  if (n->anext) n->anext->aprev = n->aprev;
  int id = n->id;
  luapool__future_unref(n->f);
  free(n);
  return id;
}

static void test_waits(void) {
  /* a future wait that times out returns 0, after the timeout, promptly */
  lp_future *f = new_future('w', 0, 1);
  double t0 = luapool__now();
  CHECK_INT(luapool__future_wait(f, 0), 0);
  CHECK_INT(luapool__future_wait(f, 0.05), 0);
  double dt = luapool__now() - t0;
  CHECK(dt >= 0.045);
  CHECK(dt < 5);
  /* one satisfied meanwhile returns 1, long before its timeout */
  later l = {f, 20};
  pthread_t t;
  CHECK_INT(pthread_create(&t, NULL, finish_later, &l), 0);
  t0 = luapool__now();
  CHECK_INT(luapool__future_wait(f, 30), 1);
  CHECK(luapool__now() - t0 < 10);
  pthread_join(t, NULL);
  CHECK_INT(luapool__future_wait(f, 0), 1);
  luapool__future_unref(f);

  /* completion queue: out in the order they finish */
  lp_cq *q = luapool__cq_alloc();
  CHECK(q != NULL);
  lp_future *fs[4];
  for (int i = 0; i < 4; i++)
    fs[i] = new_future('q', 0, 1);
  for (int i = 0; i < 3; i++)
    watch(q, fs[i], i + 1);
  CHECK_INT(q->waiting, 3);
  t0 = luapool__now();
  CHECK_INT(pop(q, 0), 0);
  CHECK_INT(pop(q, 0.05), 0); /* times out: 0, no node */
  dt = luapool__now() - t0;
  CHECK(dt >= 0.045);
  CHECK(dt < 5);
  CHECK_INT(luapool__future_cancel(fs[1]), 1);
  CHECK_INT(luapool__future_fail(fs[2], LP_EK_CRASHED, "x"), 1);
  luapool__future_finish(fs[0], "\0\0\0\0", 4, 1);
  CHECK_INT(pop(q, 1), 2);
  CHECK_INT(pop(q, 1), 3);
  CHECK_INT(pop(q, 1), 1);
  CHECK_INT(q->waiting, 0);
  CHECK(q->all == NULL);
  /* a future done already fires at once */
  watch(q, fs[1], 9);
  CHECK_INT(pop(q, 0), 9);
  /* a wait satisfied by another thread returns its node */
  watch(q, fs[3], 4);
  l = (later){fs[3], 20};
  CHECK_INT(pthread_create(&t, NULL, finish_later, &l), 0);
  t0 = luapool__now();
  CHECK_INT(pop(q, 30), 4);
  CHECK(luapool__now() - t0 < 10);
  pthread_join(t, NULL);
  luapool__cq_free(q);
  for (int i = 0; i < 4; i++)
    luapool__future_unref(fs[i]);

  /* a queue freed with nodes still waiting detaches them: the futures
  ** settle later and touch no freed node (ASan), and their references go */
  q = luapool__cq_alloc();
  f = new_future('z', 0, 1);
  lp_future *g = new_future('z', 0, 1);
  watch(q, f, 1);
  watch(q, g, 2);
  luapool__future_finish(g, "\0\0\0\0", 4, 1); /* fired, not popped */
  luapool__cq_free(q);
  CHECK_INT(atomic_load(&f->refs), 1);
  CHECK_INT(atomic_load(&g->refs), 1);
  CHECK(f->wnodes == NULL);
  luapool__future_finish(f, "\0\0\0\0", 4, 1);
  luapool__future_unref(f);
  luapool__future_unref(g);
}

/* Done callbacks: a future watched by its pool is queued for the owner as
** it settles, oldest first, each with a reference. */
static void test_callbacks(void) {
  lp_pool *p = new_pool(&manual_engine, 1);
  lp_future *fs[3];
  int notified;
  CHECK_INT(luapool__pool_owes(p), 0);
  for (int i = 0; i < 3; i++) {
    fs[i] = new_future('n', 0, 1);
    submit_ok(p, fs[i]);
    CHECK_INT(luapool__future_notify_on(fs[i], p, &notified), 0);
    CHECK_INT(notified, 0);
  }
  CHECK_INT(luapool__future_notify_on(fs[0], p, &notified), 0);
  CHECK_INT(notified, 1); /* already to be told */
  CHECK(luapool__pool_take_callbacks(p) == NULL);
  for (int i = 0; i < 3; i++)
    CHECK(take(p) == fs[i]);
  CHECK_INT(luapool__future_cancel(fs[2]), 1);
  CHECK_INT(luapool__future_start(fs[0], "w"), 1);
  luapool__future_finish(fs[0], "\0\0\0\0", 4, 1);
  CHECK_INT(luapool__future_fail(fs[1], LP_EK_CRASHED, "x"), 1);
  CHECK(luapool__pool_owes(p) != 0);
  lp_future *list = luapool__pool_take_callbacks(p);
  CHECK_INT(luapool__pool_owes(p), 0);
  for (int i = 0; i < 3; i++) { /* in the order they settled: 2, 0, 1 */
    static const int order[] = {2, 0, 1};
    CHECK(list == fs[order[i]]);
    lp_future *next = list->cbnext;
    CHECK_INT(atomic_load(&list->refs), 3); /* ours, the queue's, the callback's */
    luapool__future_unref(list);
    list = next;
  }
  CHECK(list == NULL);
  CHECK_INT(luapool__future_notify_on(fs[0], p, &notified), 1); /* done: nothing owed */
  CHECK(luapool__pool_take_callbacks(p) == NULL);
  for (int i = 0; i < 3; i++) {
    luapool__future_unref(fs[i]);
    luapool__future_unref(fs[i]);
  }
  /* owed at destroy: dropped with the pool (ASan: no leak) */
  lp_future *f = new_future('n', 0, 1);
  submit_ok(p, f);
  CHECK_INT(luapool__future_notify_on(f, p, &notified), 0);
  CHECK_INT(luapool__future_cancel(f), 1);
  CHECK(take(p) == f);
  luapool__future_unref(f);
  luapool__future_unref(f);
  end_pool(p);
}

/* A wait inside a thread task (a nested pool) ends when its task is told
** to stop (-2), or when the task's deadline passes, which marks the task
** stopped by it. */
static void test_task_stops(void) {
  lp_interrupt intr;
  atomic_init(&intr.closing, 0);
  atomic_init(&intr.seq, 1);
  atomic_init(&intr.kill_seq, UINT64_MAX);
  atomic_init(&intr.reason, 0);
  double deadline = 0;
  luapool__set_thread_stop(&intr, &deadline);
  lp_future *f = new_future('t', 0, 1);
  lp_cq *q = luapool__cq_alloc();
  CHECK(q != NULL);
  watch(q, f, 1);
  lp_wnode *n = NULL;
  CHECK_INT(luapool__future_wait(f, 0.02), 0); /* not stopped: a plain timeout */
  CHECK_INT(luapool__cq_wait(q, 0.02, luapool__now(), &n), 0);
  atomic_store(&intr.closing, 1);
  CHECK_INT(luapool__future_wait(f, 10), -2);
  CHECK_INT(luapool__cq_wait(q, 10, luapool__now(), &n), -2);
  atomic_store(&intr.closing, 0);
  deadline = luapool__now() + 0.03; /* passes during the wait */
  double t0 = luapool__now();
  CHECK_INT(luapool__future_wait(f, 10), -2);
  CHECK(luapool__now() - t0 < 5);
  CHECK_INT(atomic_load(&intr.reason), LP_STOP_DEADLINE);
  CHECK_INT(atomic_load(&intr.kill_seq), 1);
  luapool__set_thread_stop(NULL, NULL);
  CHECK_INT(luapool__future_cancel(f), 1);
  CHECK_INT(luapool__future_wait(f, 10), 1);
  CHECK_INT(pop(q, 0), 1);
  luapool__cq_free(q);
  luapool__future_unref(f);
}

/* Many threads settle many futures while the owner pops them: each comes
** out exactly once. */
#define CQ_THREADS 3
typedef struct settler {
  lp_future **fs;
  int from, n;
} settler;

static void *settle_all(void *arg) {
  settler *s = arg;
  for (int i = s->from; i < s->from + s->n; i++) {
    switch (i % 3) {
      case 0: luapool__future_finish(s->fs[i], "\0\0\0\0", 4, 1); break;
      case 1: luapool__future_fail(s->fs[i], LP_EK_CRASHED, "x"); break;
      default: luapool__future_cancel(s->fs[i]);
    }
  }
  return NULL;
}

static void test_cq_stress(int n) {
  lp_cq *q = luapool__cq_alloc();
  lp_future **fs = calloc((size_t)n, sizeof *fs);
  char *seen = calloc((size_t)n + 1, 1);
  CHECK(q && fs && seen);
  for (int i = 0; i < n; i++) {
    fs[i] = new_future('s', 0, 1);
    watch(q, fs[i], i + 1);
  }
  pthread_t t[CQ_THREADS];
  settler s[CQ_THREADS];
  int per = n / CQ_THREADS;
  for (int k = 0; k < CQ_THREADS; k++) {
    s[k] = (settler){fs, k * per, k == CQ_THREADS - 1 ? n - k * per : per};
    CHECK_INT(pthread_create(&t[k], NULL, settle_all, &s[k]), 0);
  }
  for (int i = 0; i < n; i++) {
    int id = pop(q, 30);
    CHECK(id >= 1 && id <= n);
    CHECK_INT(seen[id], 0);
    seen[id] = 1;
  }
  CHECK_INT(pop(q, 0), 0);
  for (int k = 0; k < CQ_THREADS; k++)
    pthread_join(t[k], NULL);
  luapool__cq_free(q);
  for (int i = 0; i < n; i++) {
    CHECK(luapool__future_state(fs[i]) >= LP_FINISHED);
    luapool__future_unref(fs[i]);
  }
  free(fs);
  free(seen);
}
/* }====== */

/* {====== the loop engine: one thread of its own runs every task
** Its state is under p->mu (an engine may guard its state with it).  A
** task 'F' finishes at once; a task 'W' runs until it is cancelled,
** interrupted or the pool stops with interrupt. */
typedef struct loop_state {
  pthread_t thread;
  pthread_cond_t cv;
  lp_future *cur; /* the running task */
  int abort_cur;  /* cancel or interrupt reached it */
  int quit_now;   /* stop with interrupt */
  int started;
  int interrupts, cancels;
} loop_state;

static void *loop_main(void *arg) {
  lp_pool *p = arg;
  loop_state *s = p->es;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (p->head == NULL && !p->closing)
      pthread_cond_wait(&s->cv, &p->mu);
    lp_future *f = luapool__pool_take(p);
    if (f == NULL) break;
    s->cur = f; /* before it runs: a cancel then finds it here */
    s->abort_cur = 0;
    pthread_mutex_unlock(&p->mu);
    int run = luapool__future_start(f, "loop");
    char op = run ? f->msg[0] : 0;
    pthread_mutex_lock(&p->mu);
    if (op == 'W') {
      while (!s->abort_cur && !s->quit_now)
        pthread_cond_wait(&s->cv, &p->mu);
      pthread_mutex_unlock(&p->mu);
      /* refused when the cancel got there first */
      luapool__future_fail(f, LP_EK_INTERRUPTED, "interrupted in loop");
      pthread_mutex_lock(&p->mu);
    }
    s->cur = NULL;
    pthread_mutex_unlock(&p->mu);
    if (op == 'F') luapool__future_finish(f, "\0\0\0\0", 4, 1);
    luapool__future_unref(f);
    pthread_mutex_lock(&p->mu);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

static int loop_open(lp_pool *p, char *err, size_t errsz) {
  loop_state *s = calloc(1, sizeof *s);
  if (s == NULL || pthread_cond_init(&s->cv, NULL) != 0) {
    free(s);
    snprintf(err, errsz, "no memory");
    return -1;
  }
  p->es = s;
  return 0;
}
static int loop_queued(lp_pool *p, char *err, size_t errsz) {
  loop_state *s = p->es;
  if (!s->started) {
    int r = luapool__pool_thread(&s->thread, loop_main, p);
    if (r != 0) {
      snprintf(err, errsz, "cannot start the loop: %s", strerror(r));
      return -1;
    }
    s->started = 1;
  }
  pthread_cond_broadcast(&s->cv);
  return 0;
}
static int loop_cancel(lp_pool *p, lp_future *f) {
  loop_state *s = p->es;
  int r = 0;
  pthread_mutex_lock(&p->mu);
  if (s->cur == f) { /* still ours: stop it */
    r = luapool__future_cancel_running(f);
    s->abort_cur = 1;
    s->cancels++;
    pthread_cond_broadcast(&s->cv);
  }
  pthread_mutex_unlock(&p->mu);
  return r;
}
static void loop_interrupt(lp_pool *p) { /* under p->mu: signals only */
  loop_state *s = p->es;
  s->interrupts++;
  s->abort_cur = 1;
  pthread_cond_broadcast(&s->cv);
}
static int loop_stop(lp_pool *p, int interrupt, int wait) {
  loop_state *s = p->es;
  pthread_mutex_lock(&p->mu);
  if (interrupt) s->quit_now = 1;
  pthread_cond_broadcast(&s->cv);
  int started = s->started;
  pthread_mutex_unlock(&p->mu);
  if (wait && started) {
    pthread_join(s->thread, NULL);
    s->started = 0;
  }
  return 0;
}
static void loop_free(lp_pool *p) {
  loop_state *s = p->es;
  pthread_cond_destroy(&s->cv);
  free(s);
  p->es = NULL;
}
static void loop_stats(lp_pool *p, int *workers, int *idle) {
  loop_state *s = p->es;
  *workers = s->started;
  *idle = s->cur == NULL;
}

static const lp_engine loop_engine = {
    .kind = "loop",
    .default_workers = default_one,
    .open = loop_open,
    .queued = loop_queued,
    .cancel = loop_cancel,
    .interrupt = loop_interrupt,
    .stop = loop_stop,
    .free = loop_free,
    .stats = loop_stats,
};

static void test_loop_engine(int rounds) {
  lp_pool *p = new_pool(&loop_engine, 1);
  loop_state *s = p->es;
  size_t submitted = 0;
  /* a running task cancelled through the engine */
  lp_future *f = new_future('W', 0, 1);
  submit_ok(p, f), submitted++;
  WAIT_UNTIL(luapool__future_state(f) == LP_RUNNING);
  CHECK_INT(luapool__future_cancel(f), 1);
  CHECK_INT(luapool__future_wait(f, 10), 1);
  CHECK_STATE(f, LP_CANCELLED);
  CHECK_INT(luapool__future_cancel(f), 0);
  luapool__future_unref(f);
  WAIT_UNTIL(atomic_load(&p->c_running) == 0);
  CHECK_COUNTS(p, 0, 0, 0, 0, 1, submitted);
  /* cancel racing the loop's start: every round ends cancelled, either
  ** while queued or through the engine */
  for (int i = 0; i < rounds; i++) {
    f = new_future('W', i % 2 ? 50 : 0, 1);
    submit_ok(p, f), submitted++;
    if (i % 3 == 1) sleep_ms(0);
    CHECK_INT(luapool__future_cancel(f), 1);
    CHECK_STATE(f, LP_CANCELLED);
    luapool__future_unref(f);
  }
  f = new_future('F', 0, 1); /* the loop has moved past them all */
  submit_ok(p, f), submitted++;
  CHECK_INT(luapool__future_wait(f, 20), 1);
  CHECK_STATE(f, LP_FINISHED);
  luapool__future_unref(f);
  WAIT_UNTIL(atomic_load(&p->c_running) == 0);
  CHECK_COUNTS(p, 0, 0, 1, 0, rounds + 1, submitted);
  pthread_mutex_lock(&p->mu);
  CHECK(s->cancels >= 1);
  pthread_mutex_unlock(&p->mu);

  /* interrupt: the queued are cancelled, the running one fails, and the
  ** pool goes on */
  lp_future *w = new_future('W', 0, 1), *q[3];
  submit_ok(p, w), submitted++;
  WAIT_UNTIL(luapool__future_state(w) == LP_RUNNING);
  for (int i = 0; i < 3; i++) {
    q[i] = new_future('F', 0, 1);
    submit_ok(p, q[i]), submitted++;
  }
  /* the loop is held by w: they stay queued */
  pthread_mutex_lock(&p->mu);
  CHECK_INT(p->npending, 3);
  pthread_mutex_unlock(&p->mu);
  luapool__pool_interrupt(p);
  CHECK_INT(luapool__future_wait(w, 20), 1);
  CHECK_STATE(w, LP_FAILED);
  CHECK_INT(w->ekind, LP_EK_INTERRUPTED);
  CHECK_STR(emsg(w), "interrupted in loop");
  for (int i = 0; i < 3; i++) {
    CHECK_STATE(q[i], LP_CANCELLED);
    luapool__future_unref(q[i]);
  }
  luapool__future_unref(w);
  f = new_future('F', 0, 1);
  submit_ok(p, f), submitted++;
  CHECK_INT(luapool__future_wait(f, 20), 1);
  CHECK_STATE(f, LP_FINISHED);
  luapool__future_unref(f);
  WAIT_UNTIL(atomic_load(&p->c_running) == 0);
  CHECK_COUNTS(p, 0, 0, 2, 1, rounds + 4, submitted);

  /* stop with cancel and interrupt: what is queued is cancelled and
  ** counted, the running task is told to stop and counted */
  w = new_future('W', 0, 2);
  submit_ok(p, w), submitted += 2;
  WAIT_UNTIL(luapool__future_state(w) == LP_RUNNING);
  for (int i = 0; i < 3; i++) {
    q[i] = new_future('F', 0, 1);
    submit_ok(p, q[i]), submitted++;
  }
  lp_stop_counts sc;
  CHECK_INT(luapool__pool_stop(p, 1, 1, 1, &sc), 0);
  CHECK_INT(sc.cancelled, 3);
  CHECK_INT(sc.interrupted, 2);
  CHECK_STATE(w, LP_FAILED);
  CHECK_INT(w->ekind, LP_EK_INTERRUPTED);
  for (int i = 0; i < 3; i++) {
    CHECK_STATE(q[i], LP_CANCELLED);
    luapool__future_unref(q[i]);
  }
  luapool__future_unref(w);
  CHECK_COUNTS(p, 0, 0, 2, 3, rounds + 7, submitted);
  luapool__pool_destroy(p);
}
/* }====== */

/* {====== the fake worker set
** run() reads its future's message: 'F' finishes, 'E' finishes with every
** call failed in the reply, 'X' fails (crashed), 'B' blocks until its
** worker is told to stop (interrupt, stop) and fails interrupted. */
typedef struct fworker {
  lp_worker w;
  int ran;
} fworker;

static atomic_int fake_started, fake_stopped, fake_blocked, fake_interrupts;

static int fake_start(lp_worker *w) {
  (void)w;
  atomic_fetch_add(&fake_started, 1);
  return 0;
}
static void fake_run(lp_worker *w, lp_future *f) {
  char op = f->msg[0];
  int ncalls = f->ncalls;
  ((fworker *)w)->ran++;
  switch (op) {
    case 'F': luapool__future_finish(f, "\0\0\0\0done", 8, 1); break;
    case 'E': {
      char *r = make_reply((uint32_t)ncalls, 64);
      luapool__future_finish(f, r, 64, 0);
      break;
    }
    case 'X': luapool__future_fail(f, LP_EK_CRASHED, "worker %s crashed", w->name); break;
    case 'B': {
      atomic_fetch_add(&fake_blocked, 1);
      double give_up = luapool__now() + 30;
      while (!luapool__interrupted(&w->intr) && luapool__now() < give_up)
        sleep_ms(1);
      atomic_fetch_sub(&fake_blocked, 1);
      luapool__future_fail(f, LP_EK_INTERRUPTED, "interrupted in %s", w->name);
      break;
    }
    default: fail_at(__FILE__, __LINE__, "fake_run: unknown op '%c'", op);
  }
}
static void fake_stop(lp_worker *w) {
  (void)w;
  atomic_fetch_add(&fake_stopped, 1);
}
static void fake_wint(lp_worker *w) { /* under p->mu: only a signal */
  (void)w;
  atomic_fetch_add(&fake_interrupts, 1);
}

static const lp_worker_ops fake_ops = {
    .worker_size = sizeof(fworker),
    .start = fake_start,
    .run = fake_run,
    .stop = fake_stop,
    .interrupt = fake_wint,
};

static const lp_engine fake_engine = {
    .kind = "fake",
    .default_workers = default_one,
    LP_WORKER_SET(&fake_ops),
};

/* Thousands of mixed tasks on two workers, a third of them cancelled by
** the owner while the workers start them: every future ends in a state
** its task allows, and the counters agree with them. */
static void test_worker_set_mixed(int n) {
  lp_pool *p = new_pool(&fake_engine, 2);
  lp_future **fs = calloc((size_t)n, sizeof *fs);
  int *cancelled = calloc((size_t)n, sizeof *cancelled);
  CHECK(fs && cancelled);
  static const char ops[] = "FEXF";
  size_t submitted = 0;
  for (int i = 0; i < n; i++) {
    fs[i] = new_future(ops[i % 4], i % 5 == 0 ? 200 : 0, 1 + i % 3);
    submit_ok(p, fs[i]);
    submitted += (size_t)fs[i]->ncalls;
    if (i % 3 == 0) cancelled[i] = luapool__future_cancel(fs[i]);
  }
  size_t done = 0, failed = 0, ncancel = 0;
  for (int i = 0; i < n; i++) {
    lp_future *f = fs[i];
    CHECK_INT(luapool__future_wait(f, 30), 1);
    lp_fstate st = luapool__future_state(f);
    size_t calls = (size_t)f->ncalls;
    if (cancelled[i]) {
      CHECK_INT(st, LP_CANCELLED);
      ncancel += calls;
      CHECK(f->worker == NULL);
    } else if (ops[i % 4] == 'F') {
      CHECK_INT(st, LP_FINISHED);
      CHECK_INT(f->replylen, 8);
      CHECK(memcmp(f->reply + 4, "done", 4) == 0);
      done += calls;
    } else if (ops[i % 4] == 'E') {
      CHECK_INT(st, LP_FINISHED);
      CHECK_INT(luapool__future_nerr(f), calls);
      failed += calls;
    } else {
      CHECK_INT(st, LP_FAILED);
      CHECK_INT(f->ekind, LP_EK_CRASHED);
      CHECK(strncmp(emsg(f), "worker fake-", 12) == 0);
      failed += calls;
    }
  }
  WAIT_UNTIL(atomic_load(&p->c_running) == 0);
  CHECK_COUNTS(p, 0, 0, done, failed, ncancel, submitted);
  int workers, idle;
  pthread_mutex_lock(&p->mu);
  p->eng->stats(p, &workers, &idle);
  pthread_mutex_unlock(&p->mu);
  CHECK(workers >= 1 && workers <= 2);
  lp_stop_counts sc;
  CHECK_INT(luapool__pool_stop(p, 1, 0, 0, &sc), 0);
  CHECK_INT(sc.cancelled, 0);
  pthread_mutex_lock(&p->mu);
  p->eng->stats(p, &workers, &idle);
  pthread_mutex_unlock(&p->mu);
  CHECK_INT(workers, 0);
  luapool__pool_destroy(p);
  for (int i = 0; i < n; i++)
    luapool__future_unref(fs[i]);
  free(fs);
  free(cancelled);
}

/* Two blocking tasks hold both workers; then the queued ones are hit by
** an interrupt, a break, a stop. */
static void submit_blockers(lp_pool *p, lp_future **b, lp_future **q, int nq) {
  for (int i = 0; i < 2; i++) {
    b[i] = new_future('B', 0, 1);
    submit_ok(p, b[i]);
  }
  WAIT_UNTIL(atomic_load(&fake_blocked) == 2);
  for (int i = 0; i < nq; i++) {
    q[i] = new_future('F', 0, 1);
    submit_ok(p, q[i]);
  }
}

/* An interrupt that comes as a worker takes a task: the task is cancelled
** (still queued) or interrupted (started), never left running.  A task
** the interrupt missed would block (its 'B' gives up after 30 s). */
static void test_worker_set_interrupt_race(int rounds) {
  lp_pool *p = new_pool(&fake_engine, 1);
  size_t ncancelled = 0, ninterrupted = 0;
  for (int i = 0; i < rounds; i++) {
    lp_future *f = new_future('B', 0, 1);
    submit_ok(p, f);
    spin_us(i % 40);
    luapool__pool_interrupt(p);
    if (luapool__future_wait(f, 10) != 1)
      fail_at(__FILE__, __LINE__, "round %d: the interrupt missed a task that was starting", i);
    lp_fstate st = luapool__future_state(f);
    if (st == LP_CANCELLED) {
      ncancelled++;
    } else {
      CHECK_INT(st, LP_FAILED);
      CHECK_INT(f->ekind, LP_EK_INTERRUPTED);
      ninterrupted++;
    }
    luapool__future_unref(f);
  }
  printf("    %zu cancelled queued, %zu interrupted running\n", ncancelled, ninterrupted);
  WAIT_UNTIL(atomic_load(&p->c_running) == 0);
  CHECK_COUNTS(p, 0, 0, 0, ninterrupted, ncancelled, rounds);
  end_pool(p);
}

static void test_worker_set_stops(void) {
  lp_future *b[2], *q[5], *f;
  size_t submitted = 0;

  /* interrupt: queued cancelled, running interrupted; the pool goes on */
  lp_pool *p = new_pool(&fake_engine, 2);
  atomic_store(&fake_interrupts, 0);
  submit_blockers(p, b, q, 5), submitted += 7;
  luapool__pool_interrupt(p);
  CHECK_INT(atomic_load(&fake_interrupts), 2);
  for (int i = 0; i < 2; i++) {
    CHECK_INT(luapool__future_wait(b[i], 30), 1);
    CHECK_STATE(b[i], LP_FAILED);
    CHECK_INT(b[i]->ekind, LP_EK_INTERRUPTED);
    CHECK(strncmp(emsg(b[i]), "interrupted in fake-", 20) == 0);
    luapool__future_unref(b[i]);
  }
  for (int i = 0; i < 5; i++) {
    CHECK_STATE(q[i], LP_CANCELLED);
    luapool__future_unref(q[i]);
  }
  f = new_future('F', 0, 1);
  submit_ok(p, f), submitted++;
  CHECK_INT(luapool__future_wait(f, 30), 1);
  CHECK_STATE(f, LP_FINISHED);
  luapool__future_unref(f);
  WAIT_UNTIL(atomic_load(&p->c_running) == 0);
  CHECK_COUNTS(p, 0, 0, 1, 2, 5, submitted);

  /* break: the queued fail "broken" with the reason, a later submit too;
  ** the running ones are not touched (their stop, below, ends them) */
  submit_blockers(p, b, q, 4), submitted += 6;
  luapool__pool_break(p, "a worker crashed");
  luapool__pool_break(p, "a second reason"); /* the first one stays */
  CHECK_STR(p->broken, "a worker crashed");
  for (int i = 0; i < 4; i++) {
    CHECK_STATE(q[i], LP_FAILED);
    CHECK_INT(q[i]->ekind, LP_EK_BROKEN);
    CHECK_STR(emsg(q[i]), "a worker crashed");
    luapool__future_unref(q[i]);
  }
  CHECK_STATE(b[0], LP_RUNNING);
  CHECK_STATE(b[1], LP_RUNNING);
  f = new_future('F', 0, 3);
  submit_ok(p, f), submitted += 3; /* 0: it fails at once */
  CHECK_STATE(f, LP_FAILED);
  CHECK_INT(f->ekind, LP_EK_BROKEN);
  CHECK_STR(emsg(f), "a worker crashed");
  luapool__future_unref(f);
  CHECK_COUNTS(p, 0, 2, 1, 2 + 4 + 3, 5, submitted);
  lp_stop_counts sc;
  CHECK_INT(luapool__pool_stop(p, 1, 1, 1, &sc), 0);
  CHECK_INT(sc.cancelled, 0);
  CHECK_INT(sc.interrupted, 2);
  for (int i = 0; i < 2; i++) {
    CHECK_STATE(b[i], LP_FAILED);
    CHECK_INT(b[i]->ekind, LP_EK_INTERRUPTED);
    luapool__future_unref(b[i]);
  }
  CHECK_COUNTS(p, 0, 0, 1, 2 + 4 + 3 + 2, 5, submitted);
  luapool__pool_destroy(p);

  /* stop with cancel and interrupt, on a healthy pool */
  submitted = 0;
  p = new_pool(&fake_engine, 2);
  submit_blockers(p, b, q, 3), submitted += 5;
  CHECK_INT(luapool__pool_stop(p, 1, 1, 1, &sc), 0);
  CHECK_INT(sc.cancelled, 3);
  CHECK_INT(sc.interrupted, 2);
  for (int i = 0; i < 2; i++) {
    CHECK_STATE(b[i], LP_FAILED);
    luapool__future_unref(b[i]);
  }
  for (int i = 0; i < 3; i++) {
    CHECK_STATE(q[i], LP_CANCELLED);
    luapool__future_unref(q[i]);
  }
  CHECK_COUNTS(p, 0, 0, 0, 2, 3, submitted);
  char err[256];
  f = new_future('F', 0, 1);
  CHECK_INT(luapool__pool_submit(p, f, err, sizeof err), -1);
  CHECK_STR(err, "cannot submit after shutdown");
  luapool__future_unref(f);
  luapool__pool_destroy(p);

  /* stop that waits without cancelling: everything queued still runs */
  p = new_pool(&fake_engine, 2);
  lp_future *fs[50];
  for (int i = 0; i < 50; i++) {
    fs[i] = new_future('F', 0, 1);
    submit_ok(p, fs[i]);
  }
  CHECK_INT(luapool__pool_stop(p, 1, 0, 0, &sc), 0);
  for (int i = 0; i < 50; i++) {
    CHECK_STATE(fs[i], LP_FINISHED);
    luapool__future_unref(fs[i]);
  }
  CHECK_COUNTS(p, 0, 0, 50, 0, 0, 50);
  luapool__pool_destroy(p);
  CHECK_INT(atomic_load(&fake_started), atomic_load(&fake_stopped));
}
/* }====== */

#ifdef LUAPOOL_TEST_ALLOC
/* {====== out of memory
** Each scenario runs with this thread's C allocations failing from the
** n-th on (luapool__test_fail_c_alloc), for n = 0, 1, 2... until it
** succeeds three times running.  A scenario returns 1 when it got
** through, 0 when it stopped on a clean failure; it must free what it
** made either way (the oom gate's ASan build finds leaks at exit). */
static int oom_future(void) {
  int ok = 1;
  for (size_t pad = 0; pad <= 5000; pad += 2500) {
    lp_future *f = new_future('o', pad, 1);
    if (f == NULL) {
      ok = 0;
      continue;
    }
    luapool__future_start(f, "w");
    char *r = make_reply(0, 300);
    luapool__future_finish(f, r, 300, 1); /* a copy: may fail the future */
    free(r);
    lp_fstate st = luapool__future_state(f);
    CHECK(st == LP_FINISHED || st == LP_FAILED);
    if (st == LP_FAILED) {
      CHECK_INT(f->ekind, LP_EK_TRANSFER);
      CHECK(f->emsg == NULL || strcmp(f->emsg, "no memory for the reply (300 bytes)") == 0);
      ok = 0;
    }
    luapool__future_unref(f);
  }
  lp_paths *ps = luapool__paths_new("a", 1, "b", 1, 1);
  if (ps)
    luapool__paths_unref(ps);
  else
    ok = 0;
  return ok;
}

static int oom_cq(void) {
  lp_cq *q = luapool__cq_alloc();
  if (q == NULL) return 0;
  lp_future *f = new_future('o', 0, 1);
  if (f == NULL) {
    luapool__cq_free(q);
    return 0;
  }
  watch(q, f, 1);
  luapool__future_fail(f, LP_EK_CRASHED, "gone"); /* its message may be NULL */
  CHECK_INT(pop(q, 0), 1);
  luapool__future_unref(f);
  luapool__cq_free(q);
  return 1;
}

/* A pool of each engine made, used, broken and stopped. */
static int oom_pool(const lp_engine *e) {
  lp_pool_config c = {.max_workers = 2};
  char err[256] = "";
  lp_pool *p = luapool__pool_create(e, &c, NULL, NULL, 0, NULL, err, sizeof err);
  if (p == NULL) {
    CHECK_STR(err, "cannot create a pool: not enough memory");
    return 0;
  }
  int ok = 1;
  lp_future *fs[3] = {NULL, NULL, NULL};
  for (int i = 0; i < 3; i++) {
    fs[i] = new_future('F', 0, 1);
    if (fs[i] == NULL) {
      ok = 0;
      break;
    }
    if (luapool__pool_submit(p, fs[i], err, sizeof err) != 0) {
      CHECK_STR(err, "cannot start a worker: not enough memory");
      luapool__future_unref(fs[i]);
      fs[i] = NULL;
      ok = 0;
      break;
    }
  }
  for (int i = 0; i < 3 && fs[i]; i++) {
    CHECK_INT(luapool__future_wait(fs[i], 30), 1);
    CHECK_STATE(fs[i], LP_FINISHED);
    luapool__future_unref(fs[i]);
  }
  lp_future *f = new_future('F', 0, 1);
  luapool__pool_break(p, "broken on purpose"); /* its copy may fail */
  if (f) {                                     /* broken all the same */
    CHECK_INT(luapool__pool_submit(p, f, err, sizeof err), 0);
    CHECK_STATE(f, LP_FAILED);
    CHECK_INT(f->ekind, LP_EK_BROKEN);
    luapool__future_unref(f);
  }
  end_pool(p);
  return ok;
}

static int oom_pool_fake(void) { return oom_pool(&fake_engine); }
static int oom_pool_loop(void) { return oom_pool(&loop_engine); }

/* once: only the n-th allocation fails (the code must recover from it),
** else every one from the n-th on (its cleanup must need none).  Until n
** is past what the scenario allocates (no failure injected, three times
** running: how many a pool allocates depends a little on its threads). */
static void run_oom(const char *name, int (*scenario)(void), int once) {
  int n = 0, clean = 0, injected = 0;
  while (clean < 3) {
    luapool__test_fail_c_alloc(n, once);
    int ok = scenario();
    long failed = luapool__test_fail_c_alloc(-1, 0);
    if (failed) {
      injected++;
      clean = 0;
    } else {
      CHECK_INT(ok, 1); /* nothing failed: it must have got through */
      clean++;
    }
    if (++n > 10000) fail_at(__FILE__, __LINE__, "%s: never got through", name);
  }
  CHECK(injected > 0); /* the scenario does allocate through the hook */
  printf("  oom %-12s %-5s %4d allocation points, %4d failures injected\n", name,
         once ? "once" : "on", n, injected);
}

static void test_oom(void) {
  for (int once = 0; once <= 1; once++) {
    run_oom("future", oom_future, once);
    run_oom("cq", oom_cq, once);
    run_oom("pool (wset)", oom_pool_fake, once);
    run_oom("pool (loop)", oom_pool_loop, once);
  }
}
/* }====== */
#endif

static double t_start;
static void ran(const char *name) {
  printf("ok  %-28s %6.2f s\n", name, luapool__now() - t_start);
  fflush(stdout);
  t_start = luapool__now();
}

/* {====== a Ctrl-C stop racing a task's next call taking its number */

typedef struct renumber_arg {
  lp_interrupt *i;
  atomic_int go, done;
  int calls; /* renumberings made */
} renumber_arg;

static void *renumber_main(void *arg) {
  renumber_arg *a = arg;
  while (!atomic_load(&a->go)) {
  }
  /* a task's calls, one after the other, until the stop is seen */
  for (int k = 0; k < 1000000 && !luapool__interrupted(a->i); k++) {
    luapool__stop_renumber(a->i);
    a->calls++;
  }
  atomic_store(&a->done, 1);
  return NULL;
}

/* However the stop and the renumbering interleave, the task ends stopped
** (before, a call that took its number as the stop came ran on). */
static void test_stop_renumber_race(int rounds) {
  for (int r = 0; r < rounds; r++) {
    lp_interrupt intr;
    atomic_init(&intr.closing, 0);
    atomic_init(&intr.seq, 1);
    atomic_init(&intr.kill_seq, UINT64_MAX);
    atomic_init(&intr.reason, 0);
    renumber_arg a = {.i = &intr};
    atomic_init(&a.go, 0);
    atomic_init(&a.done, 0);
    pthread_t t;
    CHECK_INT(pthread_create(&t, NULL, renumber_main, &a), 0);
    atomic_store(&a.go, 1);
    for (int spin = r % 64; spin > 0; spin--) /* a stop at a different moment each round */
      atomic_load(&intr.seq);
    luapool__stop_task(&intr);
    pthread_join(t, NULL);
    CHECK(luapool__interrupted(&intr));
    CHECK(a.calls < 1000000);
  }
}
/* }====== */

int main(int argc, char **argv) {
  /* rounds: a sanitizer build (slower) may ask for fewer */
  int rounds = argc > 1 ? atoi(argv[1]) : 5000;
  if (rounds < 10) rounds = 10;
  t_start = luapool__now();
  test_states(), ran("states");
  test_race_cancel_start(rounds), ran("race cancel/start");
  test_race_fail_finish(rounds), ran("race fail/finish/cancel");
  test_waits(), ran("waits and timeouts");
  test_callbacks(), ran("done callbacks");
  test_task_stops(), ran("waits in a stopped task");
  test_cq_stress(rounds), ran("cq stress");
  test_loop_engine(rounds / 5), ran("loop engine");
  test_worker_set_mixed(rounds), ran("worker set, mixed");
  test_worker_set_stops(), ran("worker set, stops");
  test_worker_set_interrupt_race(rounds / 5), ran("worker set, interrupt race");
  test_stop_renumber_race(rounds / 5), ran("stop racing a call's renumbering");
#ifdef LUAPOOL_TEST_ALLOC
  test_oom(), ran("out of memory");
#endif
  printf("core_test: %d checks passed\n", nchecks);
  return 0;
}
