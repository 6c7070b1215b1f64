/*
** mpipool on rank 0 (mpipool.h): the engine behind mpipool.new in the
** script of `mpiexec -n N luapool --mpi script.lua`.
**
** open() greets the serving ranks it uses (max_workers of them, default
** all: ranks 1..k) with M_OPEN, which carries this build's wire hello
** (codec/wire.c): a rank of another build refuses with its own, and the
** pool is not made, the error naming both.  Each rank that takes it makes
** a local processpool of `slots` workers for the pool.
**
** Then one progress thread per pool does all its MPI talk (mpi_proto.h:
** SERIALIZED, every call under luapool__mpi_mu, none blocking).  It takes
** queued futures while a rank has a free slot and starts them as it takes
** them, under p->mu (so a task counts as running from the moment it is
** taken for a rank: a rank holds at most `slots` tasks of the pool, cancel
** works on every task still queued here, and an interrupt or a stop finds
** each task queued or running, never between), sends them, and settles
** each with the reply bytes or the failure a rank sends back.  A task's
** error names the rank as its worker ("rank 2 of 3 on host").  With
** nothing sent and nothing to wait for it sleeps on its condition variable
** (queued() and interrupt() wake it), so an idle owner costs nothing;
** while tasks are out it polls, sleeping between polls on the same
** condition variable (luapool__mpi_pause: yields, then up to 50 us for
** 10 ms after the last message, then up to 1 ms; with nothing queued only
** an eighth of the quiet time, up to 1 ms: poll_pause), which a submit a
** rank has room for, an interrupt and a cancel cut short.  A map's chunks
** go ahead to a rank up to two per slot even on a short queue
** (progress_main), so that its worker does not idle a round trip between
** two chunks.
**
** interrupt() and a stop that interrupts set a flag the thread turns into
** M_INTERRUPT to each rank, behind every task it sent before and ahead of
** those it takes after (submitted after the interrupt: they run); the
** rank's local pool then kills its workers, and their futures come back
** failed with kind "interrupted" (in the pool's initializer too: the
** rank's processpool is not broken, and its next task runs the
** initializer again).  A closing pool ends its thread once the queue is
** empty and every rank answered, then tells each rank M_CLOSE.
*/
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/util.h"
#include "codec/codec.h"
#include "codec/wire.h"
#include "core/future.h"
#include "core/pool.h"
#include "engines/mpi_proto.h"
#include "engines/mpipool.h"

/* How long open waits for the ranks' answers. */
#define OPEN_TIMEOUT 30.0
/* Futures sent in one round of the loop at most. */
#define BATCH 256
/* Tasks are sent ahead (prefetch) only while more than this many, and
** more than every slot could take, are queued: a short queue stays here,
** where shutdown{cancel_futures = true} cancels it. */
#define PREFETCH_QUEUE 64
/* A rank is sent ahead about this much work (by its recent pace): enough
** to cover a round trip, little enough that a rank holding work while
** another one idles costs at most that at the end of a map. */
#define AHEAD_SECONDS 0.002
/* A map's chunks on a short queue go ahead at most this many per slot (by
** the pace, as above): two, so that a short map is on its ranks at once
** (five chunks on two ranks: three and two, as a processpool's two workers
** take them), and none waits on rank 0 for an answer that, on a host with
** fewer cores than processes, comes only when a worker ends its task
** (session 21: the fifth chunk of the CPU job waited 1.1-1.5 ms so). */
#define CHUNKS_AHEAD 2
/* How long a cancel waits for the rank's answer. */
#define CANCEL_TIMEOUT 5.0
/* A task with a deadline (task_timeout) that its rank has not answered
** this long after rank 0's bound for it (answer_bound) is given up, and
** the rank with it (give_up_rank): a rank that stops answering (SIGSTOP,
** a hung host) would otherwise leave it pending for good, and <close>
** waiting for it (helper-55).  The serving rank enforces the deadline
** itself (its local processpool kills the worker, which takes up to a
** second, and answers): the grace lets that report win whenever the rank
** runs at all. */
#define ANSWER_GRACE 5.0
/* What a task may take on its rank beyond its calls' deadlines: its
** worker's start (a new process after a kill, a crash or a recycle). */
#define TASK_SLACK 1.0
/* How often the progress thread compares the tasks out with their bounds. */
#define CHECK_EVERY 0.1

typedef struct orank {
  int rank;
  char name[300]; /* "rank 2 of 3 on host": the tasks' worker */
  /* The tasks taken for it (started) and not yet answered (mutex: p->mu,
  ** which cancel needs to find one; only the progress thread changes
  ** them). */
  int inflight;
  lp_future **run; /* [cap] (NULL: free) */
  uint64_t *ids;   /* [cap] */
  double *sent;    /* [cap]: when (progress thread only) */
  /* [cap]: sent ahead, beyond the rank's free slots (mutex: p->mu): only
  ** such a task may still be cancelled while it reads as running; one sent
  ** to a free slot is running, as on any pool (cancel() says false). */
  unsigned char *ahead;
  uint64_t paths_gen;
  /* It did not answer a task by rank 0's bound (mutex: p->mu; set by the
  ** progress thread only): given up for the pool's life, sent nothing
  ** more.  lost_what names the task (progress thread, then the owner once
  ** the thread is joined). */
  int lost;
  char lost_what[48];
  /* Its pace (progress thread only): the mean time from the later of a
  ** task's sending and the previous answer to the task's answer, that is,
  ** how often it can take a new task, for how far ahead to send. */
  double last_answer, gap;
} orank;

/* A future taken from the queue for a rank, to start and send. */
typedef struct assigned {
  lp_future *f;
  orank *rk;
  int slot;
} assigned;

typedef struct ostate {
  uint32_t id;
  int tag, nranks, slots;
  int cap; /* tasks a rank may hold: slots, and prefetch more while the queue is long */
  orank *ranks;
  pthread_t thread;
  int started;       /* owner only */
  int joined;        /* owner only */
  pthread_cond_t cv; /* the thread's sleeps (mutex: p->mu) */
  /* mutex: p->mu.  kicked: a submit came since the thread last read the
  ** pool; wake_on_submit: the thread sleeps and a rank has room for a
  ** submitted task (poll_pause). */
  int kicked, wake_on_submit;
  int intr_req;         /* mutex: p->mu: send M_INTERRUPT */
  atomic_int ninflight; /* read by stats */
  atomic_int ended;     /* the thread is done: no workers */
  atomic_int nlost;     /* ranks given up (orank.lost), read by stats */
  lp_future **given;    /* [cap]: a lost rank's tasks, being failed (thread only) */
  double next_check;    /* when to compare the tasks out with their bounds (thread only) */
  /* LUAPOOL_TEST_MPI_PACE: every rank's pace, fixed (seconds a task; 0:
  ** measured), so that a spec sees how far ahead the pace sends whatever
  ** the load of its machine makes of the measured one. */
  double fixed_pace;
  /* LUAPOOL_TEST_MPI_SEND_DELAY: seconds the thread waits after a round
  ** that took tasks lets go of p->mu, before it sends them (0: none), so
  ** that a spec lands a stop or a submit between the two. */
  double send_delay;
  int next_rank;      /* round robin (thread only) */
  uint64_t next_task; /* thread only */
  mpi_sends sends;    /* thread only, then the owner once it ended */
  assigned *batch;    /* [BATCH]: the futures of one round (thread only) */
  /* One cancel of a task sent to a rank at a time (the owner's; mutex:
  ** p->mu): c_state 1 asked, 2 sent to the rank, 3 answered (c_ok). */
  int c_state, c_ok, c_rank;
  uint64_t c_id;
  pthread_cond_t ccv;
  lp_pool *pool;
  struct ostate *live_next; /* in live (mutex: live_mu) while its thread runs */
} ostate;

static atomic_uint next_pool_id;
atomic_int luapool__mpi_gave_up;

/* The pools whose progress thread runs (each takes itself out as its last
** act), so that the host's exit can make every one leave its loop and wait
** for that before MPI_Finalize (luapool__mpi_owner_quit).  A pool's state
** is freed only once its thread was joined, so every entry is alive. */
static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t live_cv = PTHREAD_COND_INITIALIZER;
static ostate *live;
static atomic_int quit; /* the host is ending: every progress thread leaves now */

static void live_remove(ostate *ms) {
  pthread_mutex_lock(&live_mu);
  for (ostate **pp = &live; *pp; pp = &(*pp)->live_next)
    if (*pp == ms) {
      *pp = ms->live_next;
      break;
    }
  pthread_cond_broadcast(&live_cv);
  pthread_mutex_unlock(&live_mu);
}

static ostate *state_of(lp_pool *p) { return (ostate *)p->es; }
static const mpi_config *config_of(const lp_pool *p) { return (const mpi_config *)p->config; }

static int put_u64(lp_buf *b, uint64_t v) { return luapool__buf_add(b, &v, 8); }

/* M_PATHS to a rank when f was submitted with other paths than it has. */
static int send_paths(ostate *ms, orank *rk, const lp_future *f) {
  if (f->paths == NULL || f->paths->gen == rk->paths_gen) return 0;
  lp_buf b = {0};
  int bad = luapool__put_u8(&b, M_PATHS) || luapool__put_u32(&b, ms->id) ||
            put_u64(&b, f->paths->gen) ||
            luapool__put_string(&b, f->paths->path, strlen(f->paths->path)) ||
            luapool__put_string(&b, f->paths->cpath, strlen(f->paths->cpath));
  if (bad) {
    luapool__buf_free(&b);
    return -1;
  }
  size_t len;
  char *m = luapool__buf_take(&b, &len);
  if (luapool__mpi_send(&ms->sends, rk->rank, TAG_RANK, m, len) != 0) return -1;
  rk->paths_gen = f->paths->gen;
  return 0;
}

static int send_task(ostate *ms, orank *rk, lp_future *f, uint64_t tid) {
  if (send_paths(ms, rk, f) != 0) return -1;
  size_t hdr = 1 + 4 + 8 + 8 + 8 + 8 + 4 + 8;
  char *m = lp_malloc(hdr + f->msglen);
  if (m == NULL) return -1;
  uint32_t nc = (uint32_t)f->ncalls;
  uint64_t gen = f->paths ? f->paths->gen : 0;
  m[0] = M_TASK;
  memcpy(m + 1, &ms->id, 4);
  memcpy(m + 5, &tid, 8);
  memcpy(m + 13, &f->timeout, 8);
  memcpy(m + 21, &f->task_no, 8);
  memcpy(m + 29, &f->item_lo, 8);
  memcpy(m + 37, &nc, 4);
  memcpy(m + 41, &gen, 8);
  memcpy(m + hdr, f->msg, f->msglen);
  return luapool__mpi_send(&ms->sends, rk->rank, TAG_RANK, m, hdr + f->msglen);
}

/* A one-byte-type message with the pool id, to every rank. */
static void tell_ranks(ostate *ms, unsigned type) {
  for (int i = 0; i < ms->nranks; i++) {
    char *m = lp_malloc(5);
    if (m == NULL) continue;
    m[0] = (char)type;
    memcpy(m + 1, &ms->id, 4);
    luapool__mpi_send(&ms->sends, ms->ranks[i].rank, TAG_RANK, m, 5);
  }
}

/* The answer to the cancel the owner waits for (p->mu held). */
static void cancel_answered(ostate *ms, uint64_t tid, int ok) {
  if (ms->c_state != 2 || ms->c_id != tid) return; /* (late: its wait gave up) */
  ms->c_state = 3;
  ms->c_ok = ok;
  pthread_cond_broadcast(&ms->ccv);
}

/* An R_DONE (or R_KEPT: a cancel came too late) from rank `from`:
** settles its future. */
static void on_done(lp_pool *p, ostate *ms, int from, char *m, size_t len) {
  if (len < 10 || from < 1 || from > ms->nranks) {
    lp_free(m);
    return;
  }
  orank *rk = &ms->ranks[from - 1];
  uint64_t tid;
  memcpy(&tid, m + 1, 8);
  unsigned st = (unsigned char)m[9];
  pthread_mutex_lock(&p->mu);
  if (m[0] == R_KEPT) {
    cancel_answered(ms, tid, 0);
    pthread_mutex_unlock(&p->mu);
    lp_free(m);
    return;
  }
  int k;
  for (k = 0; k < ms->cap; k++)
    if (rk->run[k] && rk->ids[k] == tid) break;
  lp_future *f = k < ms->cap ? rk->run[k] : NULL;
  if (f) {
    rk->run[k] = NULL;
    rk->inflight--;
    atomic_fetch_sub(&ms->ninflight, 1);
  }
  if (f) {
    double now = luapool__now();
    double began = rk->sent[k] > rk->last_answer ? rk->sent[k] : rk->last_answer;
    if (ms->fixed_pace > 0)
      rk->gap = ms->fixed_pace;
    else
      rk->gap = rk->gap > 0 ? 0.875 * rk->gap + 0.125 * (now - began) : now - began;
    rk->last_answer = now;
  }
  int cancelled = st == 1u + LP_EK_CANCELLED;
  if (cancelled) cancel_answered(ms, tid, 1);
  pthread_mutex_unlock(&p->mu);
  if (f == NULL) {
    lp_free(m);
    return;
  }
  if (st == 0) {
    memmove(m, m + 10, len - 10); /* the reply bytes, taken as they are */
    luapool__future_finish(f, m, len - 10, 0);
  } else if (cancelled) { /* it had not started on the rank */
    luapool__future_cancel_running(f);
    lp_free(m);
  } else {
    lp_reader r = {m + 10, m + len};
    const char *t = "malformed reply";
    size_t tl = strlen(t);
    uint32_t call = 0; /* (the call that failed a chunk as a whole: err.item) */
    if (luapool__get_string(&r, &t, &tl) == 0) luapool__get_u32(&r, &call);
    if (call > (uint32_t)f->ncalls) call = 0;
    lp_ekind kind = st - 1 <= LP_EK_INTERRUPTED ? (lp_ekind)(st - 1) : LP_EK_CRASHED;
    luapool__future_fail_call(f, (int)call, kind, "%.*s", (int)tl, t);
    if (kind == LP_EK_BROKEN || (kind == LP_EK_CRASHED && config_of(p)->on_crash_break)) {
      char why[1200];
      snprintf(why, sizeof why, "%s%.*s", kind == LP_EK_CRASHED ? "the pool is broken: " : "",
               (int)tl, t);
      luapool__pool_break(p, why);
    }
    lp_free(m);
  }
  luapool__future_unref(f);
}

/* A map's chunk (bind/lpool.c numbers a submit's tasks, a chunk its first
** item): sent ahead on a short queue too (progress_main). */
static int is_chunk(const lp_future *f) { return f->task_no == 0 && f->item_lo > 0; }

/* {====== a rank that stops answering */

/* What f may take on its rank, by its deadlines: each call's, its
** worker's initializer's (run under the same deadline on a new worker)
** and TASK_SLACK; 0 for a task without a deadline (no bound). */
static double allowance(const lp_pool *p, const lp_future *f) {
  if (f->timeout <= 0) return 0;
  int calls = f->ncalls + (p->init_len > 0 ? 1 : 0);
  return f->timeout * calls + TASK_SLACK;
}

/* When rank 0 gives up on the task in slot k of rk if no answer came: 0
** for none.  A task sent to a free slot starts on the rank as it arrives:
** its bound is from its sending.  One sent ahead starts when the rank's
** slots free, which rank 0 does not see; a safe bound is the rank's last
** answer (or its sending, if later) plus the allowance of every task sent
** to the rank before it and not answered, as if they ran one after the
** other (each of them ends by its own deadline on a rank that runs),
** plus its own.  A task ahead of one without a deadline has no bound. */
static double answer_bound(const lp_pool *p, const ostate *ms, const orank *rk, int k) {
  double a = allowance(p, rk->run[k]);
  if (a == 0) return 0;
  double from = rk->sent[k];
  if (rk->ahead[k]) {
    if (rk->last_answer > from) from = rk->last_answer;
    for (int j = 0; j < ms->cap; j++) {
      if (rk->run[j] == NULL || rk->ids[j] >= rk->ids[k]) continue;
      double b = allowance(p, rk->run[j]);
      if (b == 0) return 0;
      a += b;
    }
  }
  return from + a + ANSWER_GRACE;
}

/* Rank rk did not answer the task in slot `late` by its bound (stopped,
** or its host hung): every task out to it fails now, the late one as
** `timeout`, the others as `crashed` (as a worker's death fails them), and
** the rank gets no more tasks of this pool (it may wake and run what it
** holds: its answers then find no task and are dropped, on_done).  With
** no rank left, or on_crash = "break", the pool breaks, so that nothing
** queued waits for ranks that cannot take it. */
static void give_up_rank(lp_pool *p, ostate *ms, orank *rk, int late) {
  lp_future *lf = rk->run[late];
  char what[48], why[600];
  luapool__future_label(lf, what, sizeof what);
  snprintf(rk->lost_what, sizeof rk->lost_what, "%s", what);
  int n = 0;
  pthread_mutex_lock(&p->mu);
  rk->lost = 1;
  atomic_store(&luapool__mpi_gave_up, 1);
  int all = atomic_fetch_add(&ms->nlost, 1) + 1 == ms->nranks;
  for (int k = 0; k < ms->cap; k++)
    if (rk->run[k] && k != late) {
      ms->given[n++] = rk->run[k];
      rk->run[k] = NULL;
    }
  rk->run[late] = NULL;
  atomic_fetch_sub(&ms->ninflight, rk->inflight);
  rk->inflight = 0;
  /* A cancel of one of them, asked or sent, gets no answer from it. */
  if (ms->c_rank == rk->rank && (ms->c_state == 1 || ms->c_state == 2)) {
    ms->c_state = 3;
    ms->c_ok = 0;
    pthread_cond_broadcast(&ms->ccv);
  }
  pthread_mutex_unlock(&p->mu);
  luapool__future_fail(lf, LP_EK_TIMEOUT,
                       "%s exceeded its deadline of %g seconds on %s, and the rank did not answer "
                       "within %g seconds after it (stopped, or its host hung): it gets no more "
                       "tasks of this pool",
                       what, lf->timeout, rk->name, ANSWER_GRACE);
  luapool__future_unref(lf);
  snprintf(why, sizeof why,
           "%s did not answer (%s was not reported within %g seconds of its deadline): it gets no "
           "more tasks of this pool",
           rk->name, what, ANSWER_GRACE);
  for (int i = 0; i < n; i++) {
    char label[48];
    luapool__future_fail(ms->given[i], LP_EK_CRASHED, "%s was given up: %s",
                         luapool__future_label(ms->given[i], label, sizeof label), why);
    luapool__future_unref(ms->given[i]);
  }
  if (all || config_of(p)->on_crash_break) {
    char broke[700];
    snprintf(broke, sizeof broke, "the pool is broken: %s%s", why,
             all ? " (no rank of the pool is left)" : "");
    luapool__pool_break(p, broke);
  }
}

/* Gives up each rank with a task out past its bound (answer_bound):
** every CHECK_EVERY seconds, after the loop took the answers that came. */
static void check_answers(lp_pool *p, ostate *ms) {
  double now = luapool__now();
  if (now < ms->next_check) return;
  ms->next_check = now + CHECK_EVERY;
  for (int i = 0; i < ms->nranks; i++) {
    orank *rk = &ms->ranks[i];
    if (rk->lost || rk->inflight == 0) continue; /* (both the thread's own to change) */
    for (int k = 0; k < ms->cap; k++) {
      if (rk->run[k] == NULL) continue;
      double b = answer_bound(p, ms, rk, k);
      if (b > 0 && now > b) {
        give_up_rank(p, ms, rk, k);
        break;
      }
    }
  }
}

/* }====== */

/* The progress thread's pause between polls while tasks are out
** (luapool__mpi_pause): on its condition variable, so that an interrupt,
** a cancel and, when a rank has room (`room`), a submit wake it at once
** instead of at its next poll.  A submit that came since the loop read the
** pool's state (ms->kicked) skips the pause when a rank has room for it
** (without room the thread would spin while the script submits).  With
** nothing queued (`queued` 0: an answer frees a slot nobody waits for)
** the pause has no hot window, only the backoff (mpi_proto.h): an answer
** then waits at most an eighth of the time since the last message, and the
** thread does not wake every 50 us on a core the ranks' workers need. */
static void poll_pause(lp_pool *p, ostate *ms, double quiet, int room, int queued) {
  double s = queued ? luapool__mpi_pause(quiet, 1000) : luapool__mpi_backoff(quiet, 1000);
  if (s == 0) {
    sched_yield();
    return;
  }
  struct timespec dl;
  clock_gettime(CLOCK_MONOTONIC, &dl); /* (ms->cv is of the monotonic clock) */
  long ns = dl.tv_nsec + (long)(s * 1e9);
  dl.tv_sec += ns / 1000000000L;
  dl.tv_nsec = ns % 1000000000L;
  pthread_mutex_lock(&p->mu);
  if (!(ms->kicked && room) && !ms->intr_req && ms->c_state != 1 && !atomic_load(&quit)) {
    ms->wake_on_submit = room;
    pthread_cond_timedwait(&ms->cv, &p->mu, &dl);
    ms->wake_on_submit = 0;
  }
  pthread_mutex_unlock(&p->mu);
}

static void *progress_main(void *arg) {
  lp_pool *p = arg;
  ostate *ms = state_of(p);
  prctl(PR_SET_TIMERSLACK, 1000UL); /* sleeps of microseconds mean it */
  assigned *batch = ms->batch;
  double last = luapool__now(); /* when the loop last found something */
  for (;;) {
    int n = 0, intr = 0, crank = 0;
    uint64_t cid = 0;
    if (atomic_load(&quit)) break;
    pthread_mutex_lock(&p->mu);
    intr = ms->intr_req;
    ms->intr_req = 0;
    if (ms->c_state == 1) { /* sent below, after this round's tasks */
      ms->c_state = 2;
      crank = ms->c_rank;
      cid = ms->c_id;
    }
    /* Free slots take queued futures, the rank with most room first
    ** (round robin among equals).  While more is queued than every slot
    ** could take, a rank is sent up to `prefetch` tasks more, as many as
    ** it answers in AHEAD_SECONDS at its recent pace, so a rank of short
    ** tasks never waits a round trip for its next one, and long tasks are
    ** not held by one rank while another idles.  A map's chunk (the map's
    ** own future: no script holds it to see it read as running, or to
    ** cancel it) goes ahead by the same pace on a short queue too, at most
    ** CHUNKS_AHEAD per slot: the rank's local processpool then hands it to
    ** its worker while the previous one runs (pipelining), where waiting
    ** for the previous answer would idle the worker a round trip per chunk
    ** (a map of five 1 ms chunks on one rank: 5.5 ms of work, 7-12 ms),
    ** and a short map is on its ranks at once. */
    size_t deep = (size_t)ms->nranks * (size_t)ms->slots;
    if (deep < PREFETCH_QUEUE) deep = PREFETCH_QUEUE;
    int full = 0; /* no rank could take the head: a submit need not wake us */
    while (n < BATCH && p->head) {
      int ahead = p->npending > deep;
      int room = ms->cap - ms->slots; /* tasks a rank may hold ahead */
      if (!ahead && is_chunk(p->head)) {
        ahead = 1;
        if (room > CHUNKS_AHEAD * ms->slots) room = CHUNKS_AHEAD * ms->slots;
      }
      orank *best = NULL;
      for (int i = 0; i < ms->nranks; i++) {
        orank *rk = &ms->ranks[(ms->next_rank + i) % ms->nranks];
        if (rk->lost) continue; /* (it gets nothing more: give_up_rank) */
        int lim = ms->slots;
        if (ahead && rk->gap > 0) {
          double more = AHEAD_SECONDS / rk->gap;
          lim += more >= room ? room : (int)more;
        }
        if (rk->inflight < lim && (best == NULL || rk->inflight < best->inflight)) best = rk;
      }
      if (best == NULL) {
        full = 1;
        break;
      }
      lp_future *f = luapool__pool_take(p);
      /* Started before p->mu goes, as a worker thread starts its task
      ** (engine.h): an interrupt or a stop, which hold p->mu, find each
      ** task either queued (they cancel it) or running (they stop it).
      ** Taken here and started only at its sending, a task was neither
      ** meanwhile: shutdown{cancel_futures = true} left it pending, and it
      ** ran after.  One cancelled while queued takes no slot (only its
      ** reference is given back, below). */
      if (!luapool__future_start(f, best->name)) {
        batch[n++] = (assigned){f, NULL, 0};
        continue;
      }
      ms->next_rank = (int)(best - ms->ranks + 1) % ms->nranks;
      int k = 0;
      while (best->run[k])
        k++;
      best->run[k] = f; /* running: sent below */
      best->ids[k] = ++ms->next_task;
      best->ahead[k] = best->inflight >= ms->slots;
      best->inflight++;
      atomic_fetch_add(&ms->ninflight, 1);
      batch[n++] = (assigned){f, best, k};
    }
    int queued = p->head != NULL; /* (for the pause: a freed slot has a task to take) */
    int out = atomic_load(&ms->ninflight);
    if (n == 0 && !intr && !crank && out == 0) {
      if (p->closing && p->head == NULL) {
        pthread_mutex_unlock(&p->mu);
        break;
      }
      ms->wake_on_submit = 1;
      if (!atomic_load(&quit)) pthread_cond_wait(&ms->cv, &p->mu);
      ms->wake_on_submit = 0;
      pthread_mutex_unlock(&p->mu);
      last = luapool__now();
      continue;
    }
    ms->kicked = 0; /* (what it says is taken from here on) */
    pthread_mutex_unlock(&p->mu);
    if (n > 0 && ms->send_delay > 0) luapool__sleep_through(ms->send_delay);
    /* An interrupt read in this round came after every task sent in the
    ** rounds before (each rank gets it behind them: MPI keeps the order of
    ** one sender's messages to one rank, so the tasks it found running are
    ** stopped there), and before this round's, which were queued after it
    ** took the queue: they go behind it and run.  (Sent after them, it
    ** stopped a task the script submitted once it caught its Ctrl-C.) */
    if (intr) tell_ranks(ms, M_INTERRUPT);
    for (int i = 0; i < n; i++) {
      assigned *a = &batch[i];
      if (a->rk == NULL) { /* cancelled while queued */
        luapool__future_unref(a->f);
        continue;
      }
      a->rk->sent[a->slot] = luapool__now();
      if (send_task(ms, a->rk, a->f, a->rk->ids[a->slot]) == 0) continue;
      luapool__future_fail(a->f, LP_EK_TRANSFER, "cannot send the task to %s: not enough memory",
                           a->rk->name);
      pthread_mutex_lock(&p->mu);
      a->rk->run[a->slot] = NULL; /* not sent */
      a->rk->inflight--;
      atomic_fetch_sub(&ms->ninflight, 1);
      pthread_mutex_unlock(&p->mu);
      luapool__future_unref(a->f);
    }
    if (crank) {
      char *cm = lp_malloc(13);
      if (cm) {
        cm[0] = M_CANCEL;
        memcpy(cm + 1, &ms->id, 4);
        memcpy(cm + 5, &cid, 8);
      }
      if (cm == NULL || luapool__mpi_send(&ms->sends, crank, TAG_RANK, cm, 13) != 0) {
        pthread_mutex_lock(&p->mu);
        cancel_answered(ms, cid, 0);
        pthread_mutex_unlock(&p->mu);
      }
    }
    int did = n > 0 || intr || crank;
    char *m;
    size_t len;
    int from;
    while (luapool__mpi_try_recv(MPI_ANY_SOURCE, ms->tag, &m, &len, &from) == 1) {
      did = 1;
      if (len && (m[0] == R_DONE || m[0] == R_KEPT))
        on_done(p, ms, from, m, len);
      else
        lp_free(m);
    }
    luapool__mpi_sends_test(&ms->sends);
    if (atomic_load(&ms->ninflight) > 0) check_answers(p, ms);
    if (did)
      last = luapool__now();
    else
      poll_pause(p, ms, luapool__now() - last, !full, queued);
  }
  atomic_store(&ms->ended, 1);
  /* A rank given up is told to close as the others are (should it wake),
  ** but nobody waits for it: said here, as a stop says what it left
  ** running. */
  for (int i = 0; i < ms->nranks; i++)
    if (ms->ranks[i].lost)
      fprintf(stderr,
              "luapool: mpipool '%s': %s did not answer (%s was not reported within %g seconds "
              "of its deadline); its tasks were failed, and it was left as it is\n",
              p->name, ms->ranks[i].name, ms->ranks[i].lost_what, ANSWER_GRACE);
  if (atomic_load(&quit)) { /* (M_STOP follows: each rank closes every pool) */
    luapool__mpi_sends_wait(&ms->sends, luapool__now() + 0.1);
  } else {
    tell_ranks(ms, M_CLOSE);
    luapool__mpi_sends_wait(&ms->sends, luapool__now() + 5.0);
  }
  live_remove(ms); /* its last MPI call is made */
  return NULL;
}

int luapool__mpi_owner_quit(double until) {
  atomic_store(&quit, 1);
  pthread_mutex_lock(&live_mu);
  for (ostate *ms = live; ms; ms = ms->live_next) {
    pthread_mutex_lock(
        &ms->pool->mu); /* (live_mu, then a pool's: nobody takes them the other way) */
    pthread_cond_signal(&ms->cv);
    pthread_mutex_unlock(&ms->pool->mu);
  }
  int left = 0;
  for (;;) {
    left = 0;
    for (ostate *ms = live; ms; ms = ms->live_next)
      left++;
    double now = luapool__now();
    if (left == 0 || now >= until) break;
    struct timespec dl; /* (live_cv is of the default clock) */
    clock_gettime(CLOCK_REALTIME, &dl);
    double t = (double)dl.tv_sec + dl.tv_nsec * 1e-9 + (until - now);
    dl.tv_sec = (time_t)t;
    dl.tv_nsec = (long)((t - (double)dl.tv_sec) * 1e9);
    pthread_cond_timedwait(&live_cv, &live_mu, &dl);
  }
  pthread_mutex_unlock(&live_mu);
  return left;
}

/* {====== engine entry points */

static int owner_default_workers(int ncpu) {
  (void)ncpu;
  return luapool__mpi_size > 1 ? luapool__mpi_size - 1 : 1;
}

static void free_state(ostate *ms) {
  for (int i = 0; ms->ranks && i < ms->nranks; i++) {
    lp_free(ms->ranks[i].run);
    lp_free(ms->ranks[i].ids);
    lp_free(ms->ranks[i].sent);
    lp_free(ms->ranks[i].ahead);
  }
  lp_free(ms->ranks);
  lp_free(ms->batch);
  lp_free(ms->given);
  pthread_cond_destroy(&ms->cv);
  pthread_cond_destroy(&ms->ccv);
  lp_free(ms);
}

/* Sends M_OPEN to every rank of the pool and takes their answers; 0, or
** -1 with err (the ranks that opened are told to close). */
static int greet(lp_pool *p, ostate *ms, char *err, size_t errsz) {
  const mpi_config *c = config_of(p);
  lp_buf b = {0}, hello = {0};
  const lp_paths *ps = p->paths;
  uint32_t mark = MPI_ORDER_MARK, id = ms->id;
#ifdef LUAPOOL_TEST_OTHER_ORDER
  /* (a rank 0 of the other byte order, for spec/mpi_spec.lua: the numbers
  ** a rank reads before it refuses are swapped) */
  mark = __builtin_bswap32(mark);
  id = __builtin_bswap32(id);
#endif
  int bad =
      luapool__wire_hello(&hello) || luapool__put_u8(&b, M_OPEN) || luapool__put_u32(&b, mark) ||
      luapool__put_u32(&b, id) || luapool__put_u32(&b, (uint32_t)ms->slots) ||
      luapool__put_u32(&b, (uint32_t)c->max_memory_mb) ||
      luapool__put_u32(&b, (uint32_t)c->max_tasks_per_child) ||
      luapool__put_u32(&b, (uint32_t)hello.len) || luapool__buf_add(&b, hello.p, hello.len) ||
      put_u64(&b, ps->gen) || luapool__put_string(&b, ps->path, strlen(ps->path)) ||
      luapool__put_string(&b, ps->cpath, strlen(ps->cpath)) ||
      luapool__put_string(&b, p->name, strlen(p->name)) ||
      luapool__put_u32(&b, (uint32_t)p->init_len) || luapool__buf_add(&b, p->init_msg, p->init_len);
  luapool__buf_free(&hello);
  for (int i = 0; !bad && i < ms->nranks; i++) {
    char *m = lp_malloc(b.len);
    if (m == NULL ||
        (memcpy(m, b.p, b.len), luapool__mpi_send(&ms->sends, i + 1, TAG_RANK, m, b.len)) != 0)
      bad = 1;
    ms->ranks[i].paths_gen = ps->gen;
  }
  luapool__buf_free(&b);
  if (bad) {
    luapool__mpi_sends_wait(&ms->sends, luapool__now() + 1.0);
    snprintf(err, errsz, "cannot create an mpipool: not enough memory");
    return -1; /* (a rank that got it answers on a tag nobody reads) */
  }
  /* Every answer is awaited, so none is left for a later pool. */
  int answered = 0, failed = 0;
  char *opened = lp_calloc((size_t)ms->nranks, 1);
  double start = luapool__now(), until = start + OPEN_TIMEOUT;
  err[0] = 0;
  while (opened && answered < ms->nranks && luapool__now() < until) {
    char *m;
    size_t len;
    int from;
    luapool__mpi_sends_test(&ms->sends);
    int r = luapool__mpi_try_recv(MPI_ANY_SOURCE, ms->tag, &m, &len, &from);
    if (r <= 0) {
      luapool__mpi_idle(luapool__now() - start, 1000);
      continue;
    }
    if (from < 1 || from > ms->nranks || opened[from - 1] || len == 0) {
      lp_free(m);
      continue;
    }
    answered++;
    orank *rk = &ms->ranks[from - 1];
    lp_reader rd = {m + 1, m + len};
    const char *t = "";
    size_t tl = 0;
    luapool__get_string(&rd, &t, &tl);
    if (m[0] == R_OPENED) {
      opened[from - 1] = 1;
      char host[256];
      snprintf(host, sizeof host, "%.*s", (int)tl, t);
      luapool__mpi_rank_name(rk->name, sizeof rk->name, from, host);
    } else if (!failed++) {
      opened[from - 1] = 2;
      char mine[300];
      luapool__wire_describe(mine, sizeof mine);
#ifdef LUAPOOL_TEST_OTHER_ORDER
      char *le = strstr(mine, "little-endian"); /* (as the other machine would say) */
      if (le) memmove(le, le + 3, strlen(le + 3) + 1), memcpy(le, "big", 3);
#endif
      if (m[0] == R_REFUSE)
        snprintf(err, errsz,
                 "cannot create an mpipool: rank %d of %d is %.*s, and rank 0 is %s: every rank "
                 "must run the same luapool build (the binary mpiexec starts on each host)",
                 from, luapool__mpi_size, (int)tl, t, mine);
      else
        snprintf(err, errsz, "cannot create an mpipool: %.*s", (int)tl, t);
    }
    lp_free(m);
  }
  if (opened && answered < ms->nranks && !failed) {
    failed = 1;
    snprintf(err, errsz,
             "cannot create an mpipool: %d of the %d serving ranks did not answer "
             "within %g seconds",
             ms->nranks - answered, ms->nranks, OPEN_TIMEOUT);
  }
  if (opened == NULL) {
    failed = 1;
    snprintf(err, errsz, "cannot create an mpipool: not enough memory");
  }
  if (failed) {
    for (int i = 0; opened && i < ms->nranks; i++) {
      if (opened[i] != 1) continue;
      char *m = lp_malloc(5);
      if (m == NULL) continue;
      m[0] = M_CLOSE;
      memcpy(m + 1, &ms->id, 4);
      luapool__mpi_send(&ms->sends, i + 1, TAG_RANK, m, 5);
    }
  }
  lp_free(opened);
  luapool__mpi_sends_wait(&ms->sends, luapool__now() + (failed ? 2.0 : 30.0));
  return failed ? -1 : 0;
}

static int owner_open(lp_pool *p, char *err, size_t errsz) {
  int serving = luapool__mpi_size - 1;
  if (serving < 1) {
    snprintf(err, errsz,
             "cannot create an mpipool: no rank serves tasks (this job has 1 rank); launch "
             "at least 2, as `%s`: rank 0 runs the script, ranks 1..N-1 serve its tasks",
             LUAPOOL_MPI_LAUNCH);
    return -1;
  }
  if (p->max_workers > serving) {
    snprintf(err, errsz,
             "cannot create an mpipool of max_workers = %d: %d rank%s serve%s tasks in this job "
             "(mpiexec -n %d)",
             p->max_workers, serving, serving == 1 ? "" : "s", serving == 1 ? "s" : "",
             luapool__mpi_size);
    return -1;
  }
  ostate *ms = lp_calloc(1, sizeof *ms);
  if (ms == NULL || luapool__cond_init(&ms->cv) != 0) {
    lp_free(ms);
    snprintf(err, errsz, "cannot create an mpipool: not enough memory");
    return -1;
  }
  if (luapool__cond_init(&ms->ccv) != 0) {
    pthread_cond_destroy(&ms->cv);
    lp_free(ms);
    snprintf(err, errsz, "cannot create an mpipool: not enough memory");
    return -1;
  }
  ms->id = atomic_fetch_add(&next_pool_id, 1) + 1;
  ms->tag = TAG_POOL(ms->id);
  ms->nranks = p->max_workers;
  ms->slots = config_of(p)->slots > 0 ? config_of(p)->slots : 1;
  ms->cap = ms->slots + config_of(p)->prefetch;
  ms->fixed_pace = luapool__test_seconds("LUAPOOL_TEST_MPI_PACE", 1e3);
  ms->send_delay = luapool__test_seconds("LUAPOOL_TEST_MPI_SEND_DELAY", 60);
  ms->ranks = lp_calloc((size_t)ms->nranks, sizeof *ms->ranks);
  ms->batch = lp_malloc(BATCH * sizeof *ms->batch);
  ms->given = lp_calloc((size_t)ms->cap, sizeof *ms->given); // NOLINT(bugprone-sizeof-expression)
  int ok = ms->ranks != NULL && ms->batch != NULL && ms->given != NULL;
  for (int i = 0; ok && i < ms->nranks; i++) {
    orank *rk = &ms->ranks[i];
    rk->rank = i + 1;
    rk->gap = ms->fixed_pace;
    rk->run = lp_calloc((size_t)ms->cap, sizeof *rk->run); // NOLINT(bugprone-sizeof-expression)
    rk->ids = lp_calloc((size_t)ms->cap, sizeof *rk->ids);
    rk->sent = lp_calloc((size_t)ms->cap, sizeof *rk->sent);
    rk->ahead = lp_calloc((size_t)ms->cap, 1);
    ok = rk->run && rk->ids && rk->sent && rk->ahead;
  }
  if (!ok) {
    free_state(ms);
    snprintf(err, errsz, "cannot create an mpipool: not enough memory");
    return -1;
  }
  if (greet(p, ms, err, errsz) != 0) {
    free_state(ms);
    return -1;
  }
  p->es = ms;
  ms->pool = p;
  pthread_mutex_lock(&live_mu);
  ms->live_next = live;
  live = ms;
  pthread_mutex_unlock(&live_mu);
  if (luapool__pool_thread(&ms->thread, progress_main, p) != 0) {
    live_remove(ms);
    tell_ranks(ms, M_CLOSE);
    luapool__mpi_sends_wait(&ms->sends, luapool__now() + 2.0);
    free_state(ms);
    p->es = NULL;
    snprintf(err, errsz, "cannot create an mpipool: cannot start its progress thread");
    return -1;
  }
  ms->started = 1;
  return 0;
}

static int owner_queued(lp_pool *p, char *err, size_t errsz) {
  (void)err;
  (void)errsz;
  ostate *ms = state_of(p);
  ms->kicked = 1;
  /* (a thread polling ranks that have no room for it would wake for
  ** nothing: it takes the task at its next poll) */
  if (ms->wake_on_submit) pthread_cond_signal(&ms->cv);
  return 0;
}

/* A task sent ahead to a rank (beyond its free slots) is cancelled there if
** it has not started yet: asks the rank through the progress thread and
** waits for the answer.  One sent to a free slot reads as running and is
** not cancelled (as on every pool), even when the rank has yet to start it. */
static int owner_cancel(lp_pool *p, lp_future *f) {
  ostate *ms = state_of(p);
  pthread_mutex_lock(&p->mu);
  int rank = 0;
  uint64_t tid = 0;
  for (int i = 0; i < ms->nranks && !rank; i++)
    for (int k = 0; k < ms->cap; k++)
      if (ms->ranks[i].run[k] == f && ms->ranks[i].ahead[k]) {
        rank = ms->ranks[i].rank;
        tid = ms->ranks[i].ids[k];
        break;
      }
  int ok = 0;
  if (rank && ms->c_state == 0 && !atomic_load(&ms->ended)) {
    ms->c_state = 1;
    ms->c_rank = rank;
    ms->c_id = tid;
    pthread_cond_signal(&ms->cv);
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += (time_t)CANCEL_TIMEOUT;
    while (ms->c_state != 3)
      if (pthread_cond_timedwait(&ms->ccv, &p->mu, &dl) == ETIMEDOUT) break;
    ok = ms->c_state == 3 && ms->c_ok;
    ms->c_state = 0;
  }
  pthread_mutex_unlock(&p->mu);
  /* (the progress thread may not have settled it yet: whoever is first) */
  if (ok) luapool__future_cancel_running(f);
  return ok && luapool__future_state(f) == LP_CANCELLED;
}

static void owner_interrupt(lp_pool *p) {
  ostate *ms = state_of(p);
  ms->intr_req = 1;
  pthread_cond_signal(&ms->cv);
}

static int owner_stop(lp_pool *p, int interrupt, int wait) {
  ostate *ms = state_of(p);
  pthread_mutex_lock(&p->mu);
  if (interrupt) ms->intr_req = 1;
  pthread_cond_signal(&ms->cv); /* closing: it ends once the work is done */
  pthread_mutex_unlock(&p->mu);
  if (!wait || ms->joined || !ms->started) return 0;
  lp_join j;
  luapool__join_begin(&j, interrupt);
  if (!luapool__pool_join(p, ms->thread, &j)) return 1;
  ms->joined = 1;
  return 0;
}

static void owner_free(lp_pool *p) {
  ostate *ms = state_of(p);
  if (ms == NULL) return;
  luapool__mpi_sends_wait(&ms->sends, luapool__now() + 1.0);
  free_state(ms);
  p->es = NULL;
}

static void owner_stats(lp_pool *p, int *workers, int *idle) {
  ostate *ms = state_of(p);
  /* (a rank given up has no slots for the pool: give_up_rank) */
  *workers = atomic_load(&ms->ended) ? 0 : (ms->nranks - atomic_load(&ms->nlost)) * ms->slots;
  *idle = *workers - atomic_load(&ms->ninflight);
  if (*idle < 0) *idle = 0; /* (tasks sent ahead) */
}

const lp_engine luapool__mpi_owner_engine = {
    .kind = "mpipool",
    .default_workers = owner_default_workers,
    .chunking = 1,
    .open = owner_open,
    .queued = owner_queued,
    .cancel = owner_cancel,
    .interrupt = owner_interrupt,
    .stop = owner_stop,
    .free = owner_free,
    .stats = owner_stats,
};

/* }====== */
