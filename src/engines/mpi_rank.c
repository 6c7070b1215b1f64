/*
** The host's MPI mode (mpipool.h): MPI's start and end, the helpers of
** mpi_proto.h, and the serve loop ranks 1..N-1 run instead of a script.
**
** A serving rank runs its tasks in local worker processes: for each pool
** rank 0 opens (M_OPEN) it makes a processpool from C (core/pool.h) of
** `slots` workers, which posix_spawn fresh `luapool --worker` processes:
** an exec, never a fork of a process that has MPI up.  Each task message
** (M_TASK) becomes a future of that pool; a completion queue (core/
** future.h) hands the loop each one that settles, whose reply bytes (or
** failure kind and message) go back to rank 0 as they are.  So a task
** that crashes, exits or passes its deadline or memory cap fails with the
** processpool's kind, and the rank goes on.
**
** The loop polls: MPI has no descriptor to wait on, and Open MPI
** busy-polls in a blocking call.  Between polls it sleeps (luapool__mpi_pause:
** a few yields, then an eighth of the time since the last message, up to
** 50 us for 10 ms after it, then up to 2 ms when idle), and while tasks run
** it sleeps so (up to 1 ms) on the completion queue, which wakes it as soon
** as one settles.  While every slot of every pool it serves is busy it
** polls MPI only every MPI_BUSY_POLL_US (mpi_proto.h): nothing rank 0 sends
** could start sooner, and a loop waking every 50 us on a core the workers
** need keeps them from spreading over the cores.
**
** SIGINT and SIGTERM (mpiexec forwards a Ctrl-C as SIGTERM to every rank)
** stay blocked in every thread and are taken here between polls: the
** local pools are interrupted (their worker processes killed) and the rank
** exits 128 + the signal; mpiexec ends the job.  Worker processes also die
** with the thread that started them (PR_SET_PDEATHSIG), so even a SIGKILL
** of the rank leaves none behind.
*/
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "base/ctrlc.h"
#include "base/util.h"
#include "codec/codec.h"
#include "codec/wire.h"
#include "core/future.h"
#include "core/pool.h"
#include "engines/engines.h"
#include "engines/mpi_proto.h"
#include "engines/mpipool.h"

/* clang-tidy's MPI checker wants each MPI_Isend's request waited for in the
** function that made it; here sends are kept in a list that MPI_Test
** empties (luapool__mpi_sends_test), which it cannot follow. */
// NOLINTBEGIN(clang-analyzer-optin.mpi.MPI-Checker)

pthread_mutex_t luapool__mpi_mu = PTHREAD_MUTEX_INITIALIZER;
int luapool__mpi_rank, luapool__mpi_size;
char luapool__mpi_host[256];

/* {====== helpers (mpi_proto.h) */

int luapool__mpi_send(mpi_sends *s, int dest, int tag, char *buf, size_t len) {
  mpi_send *m = lp_malloc(sizeof *m);
  if (m == NULL || len > (size_t)INT32_MAX) {
    lp_free(m);
    lp_free(buf);
    return -1;
  }
  m->buf = buf;
  pthread_mutex_lock(&luapool__mpi_mu);
  int r = MPI_Isend(buf, (int)len, MPI_BYTE, dest, tag, MPI_COMM_WORLD, &m->req);
  pthread_mutex_unlock(&luapool__mpi_mu);
  if (r != MPI_SUCCESS) {
    lp_free(buf);
    lp_free(m);
    return -1;
  }
  m->next = s->head;
  s->head = m;
  s->n++;
  return 0;
}

int luapool__mpi_sends_test(mpi_sends *s) {
  if (s->head == NULL) return 0;
  pthread_mutex_lock(&luapool__mpi_mu);
  for (mpi_send **pp = &s->head; *pp;) {
    mpi_send *m = *pp;
    int done = 0;
    if (MPI_Test(&m->req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) done = 1;
    if (done) {
      *pp = m->next;
      lp_free(m->buf);
      lp_free(m);
      s->n--;
    } else {
      pp = &m->next;
    }
  }
  pthread_mutex_unlock(&luapool__mpi_mu);
  return s->n;
}

int luapool__mpi_sends_wait(mpi_sends *s, double until) {
  double start = luapool__now();
  while (luapool__mpi_sends_test(s) > 0 && luapool__now() < until)
    luapool__mpi_idle(luapool__now() - start, 1000);
  int left = s->n;
  if (left) { /* (the peer is gone or stuck: the job is ending anyway) */
    pthread_mutex_lock(&luapool__mpi_mu);
    for (mpi_send *m = s->head, *next; m; m = next) {
      next = m->next;
      MPI_Cancel(&m->req);
      int done = 0;
      MPI_Test(&m->req, &done, MPI_STATUS_IGNORE);
      if (done) {
        lp_free(m->buf);
      } else {
        /* MPI may still read the buffer of a send that has not completed
        ** (a cancelled send completes when MPI says so): it is left to the
        ** process's end rather than freed under MPI */
        MPI_Request_free(&m->req);
      }
      lp_free(m);
    }
    pthread_mutex_unlock(&luapool__mpi_mu);
    s->head = NULL;
    s->n = 0;
  }
  return left;
}

int luapool__mpi_try_recv(int src, int tag, char **buf, size_t *len, int *from) {
  int flag = 0, count = 0, r = -1;
  MPI_Status st;
  pthread_mutex_lock(&luapool__mpi_mu);
  if (MPI_Iprobe(src, tag, MPI_COMM_WORLD, &flag, &st) != MPI_SUCCESS) goto out;
  r = 0;
  if (!flag) goto out;
  r = -1;
  if (MPI_Get_count(&st, MPI_BYTE, &count) != MPI_SUCCESS || count < 0) goto out;
  char *b = lp_malloc(count ? (size_t)count : 1);
  if (b == NULL) goto out; /* (the message stays: a later try may have memory) */
  if (MPI_Recv(b, count, MPI_BYTE, st.MPI_SOURCE, st.MPI_TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE) !=
      MPI_SUCCESS) {
    lp_free(b);
    goto out;
  }
  *buf = b;
  *len = (size_t)count;
  *from = st.MPI_SOURCE;
  r = 1;
out:
  pthread_mutex_unlock(&luapool__mpi_mu);
  return r;
}

double luapool__mpi_backoff(double quiet, unsigned cap_us) {
  double us = quiet * 1e6 / 8;
  if (us < 2) return 0; /* a reply is often microseconds away */
  return (us > cap_us ? cap_us : us) * 1e-6;
}

double luapool__mpi_pause(double quiet, unsigned cap_us) {
  if (quiet < MPI_HOT_WINDOW && cap_us > MPI_HOT_US) cap_us = MPI_HOT_US;
  return luapool__mpi_backoff(quiet, cap_us);
}

void luapool__mpi_idle(double quiet, unsigned cap_us) {
  double s = luapool__mpi_pause(quiet, cap_us);
  if (s == 0) {
    sched_yield();
    return;
  }
  struct timespec ts = {0, (long)(s * 1e9)};
  nanosleep(&ts, NULL);
}

void luapool__mpi_rank_name(char *buf, size_t n, int r, const char *host) {
  snprintf(buf, n, "rank %d of %d on %s", r, luapool__mpi_size, host ? host : luapool__mpi_host);
}

/* }====== */

/* {====== start and end */

int luapool__mpi_start(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  /* Open MPI's own blocking waits (MPI_Init, MPI_Finalize) yield the CPU
  ** with this; the loops here never block in MPI at all. */
  setenv("OMPI_MCA_mpi_yield_when_idle", "1", 0);
  int provided = MPI_THREAD_SINGLE;
  if (MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
    fprintf(stderr, "luapool: MPI_Init_thread failed\n");
    return -1;
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    fprintf(stderr,
            "luapool: this MPI library gives thread level %d, and luapool needs "
            "MPI_THREAD_SERIALIZED (%d): every pool talks MPI from its own thread\n",
            provided, MPI_THREAD_SERIALIZED);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return -1;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &luapool__mpi_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &luapool__mpi_size);
  if (gethostname(luapool__mpi_host, sizeof luapool__mpi_host - 1) != 0)
    snprintf(luapool__mpi_host, sizeof luapool__mpi_host, "?");
  /* Processes started from here (workers, commands tasks run) are no
  ** ranks: a luapool among them must not take the launcher's variables
  ** for its own launch (host/main.c). */
  setenv("LUAPOOL_MPI_CHILD", "1", 1);
  if (luapool__mpi_rank == 0) {
    luapool__mpi_owner = &luapool__mpi_owner_engine;
  } else {
    /* What a task's luapool.current_worker() says (processpool.c's worker
    ** reads it): set before any worker exists. */
    char id[320];
    snprintf(id, sizeof id, "%d %d %s", luapool__mpi_rank, luapool__mpi_size, luapool__mpi_host);
    setenv("LUAPOOL_MPI_WORKER", id, 1);
  }
  return luapool__mpi_rank;
}

/* Tells every serving rank the job ends (rank 0).  With `ask`, each is
** asked to answer R_STOPPED, and the ranks that did not within the grace
** are counted (the first one's number in *first): 0 when all did. */
static int stop_ranks(double grace, int ask, int *first) {
  mpi_sends s = {NULL, 0};
  for (int r = 1; r < luapool__mpi_size; r++) {
    char *b = lp_malloc(2);
    if (b == NULL) continue;
    b[0] = M_STOP;
    b[1] = (char)ask;
    luapool__mpi_send(&s, r, TAG_RANK, b, 2);
  }
  double start = luapool__now(), until = start + grace;
  int missing = 0;
  if (ask) {
    char *got = lp_calloc((size_t)luapool__mpi_size, 1);
    int n = 0;
    while (got && n < luapool__mpi_size - 1 && luapool__now() < until) {
      char *m;
      size_t len;
      int from;
      luapool__mpi_sends_test(&s);
      if (luapool__mpi_try_recv(MPI_ANY_SOURCE, TAG_END, &m, &len, &from) == 1) {
        if (from > 0 && from < luapool__mpi_size && !got[from]) got[from] = 1, n++;
        lp_free(m);
      } else {
        luapool__mpi_idle(luapool__now() - start, 1000);
      }
    }
    for (int r = 1; r < luapool__mpi_size; r++)
      if (got == NULL || !got[r]) {
        if (!missing++) *first = r;
      }
    lp_free(got);
  }
  luapool__mpi_sends_wait(&s, until);
  return missing;
}

/* How long the exit waits for pools' progress threads to leave MPI. */
#define QUIT_GRACE 5.0

void luapool__mpi_end(void) {
  /* No thread may be in MPI when it is finalized: every pool's progress
  ** thread (one left running by a stop that gave up on it, too) leaves its
  ** loop and is waited for.  One that does not within the grace is stuck
  ** (on a pool lock, or inside an MPI call): the job is aborted instead,
  ** holding the lock every MPI call is made under, so that it cannot enter
  ** MPI meanwhile; if even the lock stays taken, rank 0 leaves at once,
  ** and mpiexec ends the job (no MPI_Finalize, no undefined behaviour). */
  int sig = atomic_load(&luapool__ending_on_signal);
  double grace = sig ? 0.5 : QUIT_GRACE;
  int left = luapool__mpi_owner_quit(luapool__now() + grace);
  if (left) {
    fprintf(stderr,
            "luapool: %d mpipool progress thread%s did not stop within %g seconds: the MPI job is "
            "aborted\n",
            left, left == 1 ? "" : "s", grace);
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 1;
    if (pthread_mutex_timedlock(&luapool__mpi_mu, &dl) == 0) MPI_Abort(MPI_COMM_WORLD, 1);
    _exit(1);
  }
  if (sig) {
    /* mpiexec is ending the job (it forwarded the signal to every rank),
    ** or the user stopped rank 0 alone: the ranks are told, and rank 0
    ** leaves without MPI_Finalize, whose fence could wait for ranks that
    ** are gone; mpiexec reports rank 0's status (128 + the signal). */
    stop_ranks(0.2, 0, NULL);
    return;
  }
  /* A pool gave up a rank that stopped answering: MPI_Finalize would wait
  ** for it for good (the job never ended, helper-57), so each rank is
  ** asked to say it got the stop; one that does not is still stuck, and
  ** the job is aborted (mpiexec kills every rank, a stopped one too). */
  int gave_up = atomic_load(&luapool__mpi_gave_up), first = 0;
  if (stop_ranks(5.0, gave_up, &first)) {
    fprintf(stderr,
            "luapool: rank %d of %d did not answer the job's end within %g seconds (a pool "
            "gave it up): the MPI job is aborted, as MPI_Finalize would wait for it\n",
            first, luapool__mpi_size, 5.0);
    MPI_Abort(MPI_COMM_WORLD, 1);
    _exit(1);
  }
  MPI_Finalize();
}

/* }====== */

/* {====== the serve loop (ranks 1..N-1) */

typedef struct session {
  uint32_t id;
  int tag;
  lp_pool *lp;         /* the local processpool */
  lp_paths *paths;     /* for the next tasks (a reference) */
  int ntasks;          /* its futures not yet answered */
  int slots;           /* its local pool's workers */
  int closed;          /* out of the list: its futures are not answered */
  struct rtask *tasks; /* not yet answered, for M_CANCEL */
  struct session *next;
} session;

/* One M_TASK, from its arrival until rank 0 has its answer: every task
** rank 0 sent gets one R_DONE, whatever runs out (see answer_rtask). */
typedef struct rtask {
  lp_wnode node; /* first: the completion queue frees it as a node */
  uint64_t id;
  session *s;                  /* NULL: failed before it reached a pool */
  int tag;                     /* rank 0's, for the answer */
  struct rtask *snext, *sprev; /* in s->tasks, until settled */
  int cancel_asked;            /* rank 0 cancelled it (M_CANCEL) */
  /* Failed before its future existed (node.f NULL): the kind and why. */
  lp_ekind early_kind;
  char why[200];
  struct rtask *onext; /* in sv->owed: settled, no memory yet to answer */
} rtask;

typedef struct server {
  session *sessions;
  lp_cq *cq;
  int ntasks;
  mpi_sends sends;
  char name[300]; /* "rank 2 of 3 on host" */
  /* The next M_TASK's record, allocated before the message is taken: with
  ** no memory for it the messages wait in MPI, and a task that was taken
  ** always has its record to answer with. */
  rtask *spare;
  /* Settled tasks whose answer could not be sent yet (no memory): retried
  ** on every pass of the loop, so none is left unanswered. */
  rtask *owed;
#ifdef LUAPOOL_TEST_ALLOC
  long test_oom; /* LUAPOOL_TEST_MPI_REPLY_OOM: answers whose allocation fails */
#endif
} server;

static session *find_session(server *sv, uint32_t id) {
  for (session *s = sv->sessions; s; s = s->next)
    if (s->id == id) return s;
  return NULL;
}

/* Sends rank 0 a message of type t on the pool's tag: head, then body.
** 0, or -1 when there was no memory for it (or MPI refused it). */
static int answer(server *sv, int tag, unsigned t, const char *head, size_t hl, const char *body,
                  size_t blen) {
#ifdef LUAPOOL_TEST_ALLOC
  if (sv->test_oom > 0 && t == R_DONE) { /* this message's allocation fails */
    sv->test_oom--;
    luapool__test_fail_c_alloc(0, 1);
  }
#endif
  char *b = lp_malloc(1 + hl + blen);
  if (b == NULL) return -1;
  b[0] = (char)t;
  if (hl) memcpy(b + 1, head, hl);
  if (blen) memcpy(b + 1 + hl, body, blen);
  return luapool__mpi_send(&sv->sends, 0, tag, b, 1 + hl + blen);
}

/* A string of the codec (codec.h) is read by rank 0 whatever its byte
** order when it is short (a tag byte, a length byte): texts are cut to
** 255 bytes, so that a refusal reaches a rank 0 of the other order too. */
static void answer_text(server *sv, int tag, unsigned t, const char *text) {
  lp_buf h = {0};
  size_t n = strlen(text);
  if (luapool__put_string(&h, text, n > 255 ? 255 : n) == 0)
    answer(sv, tag, t, h.p, h.len, NULL, 0);
  luapool__buf_free(&h);
}

/* R_DONE of a failure: id, 1 + kind, the message "rank r of n on host: why"
** (built here, so that it costs one allocation: the message's).  0 or -1. */
static int answer_failure(server *sv, int tag, uint64_t id, lp_ekind k, const char *why) {
  char m[1400], h[1500];
  int ml = snprintf(m, sizeof m, "%s: %s", sv->name, why);
  lp_buf b = {h, 0, sizeof h}; /* (on the stack: put_string never grows it here) */
  if (ml < 0) return -1;
  if ((size_t)ml >= sizeof m) ml = (int)sizeof m - 1;
  memcpy(h, &id, 8);
  h[8] = (char)(1u + (unsigned)k);
  b.len = 9;
  if (luapool__put_string(&b, m, (size_t)ml) != 0) return -1;
  return answer(sv, tag, R_DONE, h, b.len, NULL, 0);
}

/* A task's outcome for rank 0: R_DONE, its id, the state.  0, or -1 when
** there was no memory for the message. */
static int answer_task(server *sv, int tag, uint64_t id, lp_future *f, int cancel_asked) {
  char m[1400], h[9];
  lp_fstate st = luapool__future_state(f); /* settled: stable from here */
  memcpy(h, &id, 8);
  if (st == LP_FINISHED) {
    h[8] = 0;
    return answer(sv, tag, R_DONE, h, 9, f->reply, f->replylen);
  } else {
    lp_ekind k = LP_EK_INTERRUPTED;
    if (st == LP_FAILED) {
      k = (lp_ekind)f->ekind;
      snprintf(m, sizeof m, "%s: %s", sv->name, f->emsg ? f->emsg : "(no memory for the message)");
    } else if (cancel_asked) { /* M_CANCEL found it in the local queue */
      k = LP_EK_CANCELLED;
      snprintf(m, sizeof m, "the task was cancelled");
    } else { /* cancelled in the local queue: an interrupt came first */
      snprintf(m, sizeof m, "%s: the task was interrupted before it started", sv->name);
    }
    lp_buf b = {0};
    int r = -1;
    /* (then the call that failed the chunk, for rank 0's err.item) */
    uint32_t call = st == LP_FAILED && f->fail_call > 0 ? (uint32_t)f->fail_call : 0;
    if (luapool__buf_add(&b, h, 8) == 0 && luapool__put_u8(&b, 1u + (unsigned)k) == 0 &&
        luapool__put_string(&b, m, strlen(m)) == 0 && luapool__put_u32(&b, call) == 0)
      r = answer(sv, tag, R_DONE, b.p, b.len, NULL, 0);
    luapool__buf_free(&b);
    return r;
  }
}

/* Answers t: its outcome, or when there is no memory for that (a large
** result, a long message), a failure that says so, which costs one small
** allocation: a task rank 0 sent never vanishes.  0 answered; -1 not even
** that (the caller keeps t owed and tries again on the next pass). */
static int answer_rtask(server *sv, rtask *t) {
  lp_future *f = t->node.f;
  if (f == NULL) return answer_failure(sv, t->tag, t->id, t->early_kind, t->why);
  if (answer_task(sv, t->tag, t->id, f, t->cancel_asked) == 0) return 0;
  char why[200];
  lp_fstate st = luapool__future_state(f);
  if (st == LP_FINISHED) {
    snprintf(why, sizeof why, "not enough memory to send the result of task #%llu back (%zu bytes)",
             (unsigned long long)f->task_no, f->replylen);
    return answer_failure(sv, t->tag, t->id, LP_EK_TRANSFER, why);
  }
  snprintf(why, sizeof why, "task #%llu failed, and there was not enough memory to send why",
           (unsigned long long)f->task_no);
  return answer_failure(sv, t->tag, t->id, st == LP_FAILED ? (lp_ekind)f->ekind : LP_EK_INTERRUPTED,
                        why);
}

/* Fills the processpool's options from ours, by their names in its option
** list (so the processpool keeps its config struct to itself). */
static void set_proc_option(char *cfg, const char *name, int v) {
  for (const lp_option *o = luapool__process_engine.options; o && o->name; o++)
    if (strcmp(o->name, name) == 0) memcpy(cfg + o->offset, &v, sizeof v);
}

static void on_open(server *sv, lp_reader *r) {
  uint32_t mark = 0, id = 0, slots = 1, mem = 0, mtpc = 0, hl = 0, il = 0;
  uint64_t gen = 0;
  const char *path, *cpath, *name;
  size_t pl, cl, nl;
  char peer[300], mine[300], err[400];
  if (luapool__get_u32(r, &mark) || luapool__get_u32(r, &id)) return; /* (malformed) */
  if (mark != MPI_ORDER_MARK) {
    /* Rank 0 is of the other byte order (or no luapool): nothing after the
    ** mark is read as a number; refused at once, on the tag its pool id
    ** names in its order, with this rank's build (which names its byte
    ** order; rank 0's message puts its own beside it). */
    if (mark != __builtin_bswap32(MPI_ORDER_MARK)) return; /* (cannot say on which tag) */
    luapool__wire_describe(mine, sizeof mine);
    answer_text(sv, TAG_POOL(__builtin_bswap32(id)), R_REFUSE, mine);
    return;
  }
  if (luapool__get_u32(r, &slots) || luapool__get_u32(r, &mem) || luapool__get_u32(r, &mtpc) ||
      luapool__get_u32(r, &hl) || (size_t)(r->end - r->p) < hl)
    return; /* (malformed) */
  const char *hello = r->p;
  r->p += hl;
  int tag = TAG_POOL(id);
  if (luapool__wire_check(hello, hl, peer, sizeof peer) != 0) {
    luapool__wire_describe(mine, sizeof mine);
    answer_text(sv, tag, R_REFUSE, mine);
    return;
  }
  if ((size_t)(r->end - r->p) < 8) return;
  memcpy(&gen, r->p, 8);
  r->p += 8;
  if (luapool__get_string(r, &path, &pl) || luapool__get_string(r, &cpath, &cl) ||
      luapool__get_string(r, &name, &nl) || luapool__get_u32(r, &il) ||
      (size_t)(r->end - r->p) < il) {
    answer_text(sv, tag, R_FAILED, "malformed open message");
    return;
  }
  session *s = lp_calloc(1, sizeof *s);
  lp_paths *ps = luapool__paths_new(path, pl, cpath, cl, gen);
  char *init = il ? lp_malloc(il) : NULL;
  if (s == NULL || ps == NULL || (il && init == NULL)) {
    lp_free(s);
    lp_free(init);
    luapool__paths_unref(ps);
    answer_text(sv, tag, R_FAILED, "not enough memory");
    return;
  }
  if (il) memcpy(init, r->p, il);
  _Alignas(max_align_t) char cfg[256] = {0}; /* (its config is a few ints) */
  if (luapool__process_engine.config_size > sizeof cfg) {
    lp_free(s);
    lp_free(init);
    luapool__paths_unref(ps);
    answer_text(sv, tag, R_FAILED, "processpool options too large");
    return;
  }
  if (luapool__process_engine.config_defaults) luapool__process_engine.config_defaults(cfg);
  if (mem) set_proc_option(cfg, "max_memory_mb", (int)mem);
  if (mtpc) set_proc_option(cfg, "max_tasks_per_child", (int)mtpc);
  lp_pool_config c = {.max_workers = (int)slots};
  snprintf(c.name, sizeof c.name, "%.*s", (int)nl, name); /* as rank 0's pool */
  luapool__paths_ref(ps); /* one for the pool, one for the tasks (s->paths) */
  s->lp = luapool__pool_create(&luapool__process_engine, &c, cfg, init, il, ps, err, sizeof err);
  if (s->lp == NULL) {
    lp_free(init);
    luapool__paths_unref(ps);
    luapool__paths_unref(ps);
    lp_free(s);
    char m[800];
    snprintf(m, sizeof m, "%s: %s", sv->name, err);
    answer_text(sv, tag, R_FAILED, m);
    return;
  }
  s->id = id;
  s->slots = (int)slots;
  s->tag = tag;
  s->paths = ps;
  s->next = sv->sessions;
  sv->sessions = s;
  lp_buf h = {0};
  uint32_t pid = (uint32_t)getpid();
  if (luapool__put_string(&h, luapool__mpi_host, strlen(luapool__mpi_host)) == 0 &&
      luapool__put_u32(&h, pid) == 0)
    answer(sv, tag, R_OPENED, h.p, h.len, NULL, 0);
  luapool__buf_free(&h);
}

/* Keeps t until its answer can be sent (no memory now). */
static void owe(server *sv, rtask *t) {
  t->onext = sv->owed;
  sv->owed = t;
}

/* A task that failed before it reached its pool: answered now, or owed. */
static void fail_task(server *sv, rtask *t, lp_ekind k, const char *why) {
  t->node.f = NULL;
  t->s = NULL;
  t->early_kind = k;
  snprintf(t->why, sizeof t->why, "%s", why);
  if (answer_rtask(sv, t) == 0)
    lp_free(t);
  else
    owe(sv, t);
}

/* M_TASK: msg is the whole message (malloc'd, taken). */
static void on_task(server *sv, char *msg, size_t len) {
  enum { HDR = 1 + 4 + 8 + 8 + 8 + 8 + 4 + 8 };
  if (len < HDR) {
    lp_free(msg);
    return;
  }
  uint32_t id, ncalls;
  uint64_t tid, task_no;
  int64_t item_lo;
  double timeout;
  memcpy(&id, msg + 1, 4);
  memcpy(&tid, msg + 5, 8);
  memcpy(&timeout, msg + 13, 8);
  memcpy(&task_no, msg + 21, 8);
  memcpy(&item_lo, msg + 29, 8);
  memcpy(&ncalls, msg + 37, 4);
  rtask *t = sv->spare; /* (the loop took the message only with one) */
  sv->spare = NULL;
  memset(t, 0, sizeof *t);
  t->id = tid;
  t->tag = TAG_POOL(id);
  session *s = find_session(sv, id);
  if (s == NULL) { /* (rank 0 sends none to a pool this rank refused or closed) */
    lp_free(msg);
    fail_task(sv, t, LP_EK_BROKEN, "no such pool on this rank");
    return;
  }
  /* The task message to the front: a large one is then taken as it is. */
  memmove(msg, msg + HDR, len - HDR);
  lp_buf b = {msg, len - HDR, len};
  lp_future *f = ncalls > 0 ? luapool__future_new(&b, (int)ncalls) : NULL;
  luapool__buf_free(&b);
  if (f == NULL) {
    fail_task(sv, t, LP_EK_TRANSFER, "not enough memory for the task");
    return;
  }
  f->timeout = timeout;
  f->task_no = task_no;
  f->item_lo = item_lo;
  luapool__paths_ref(s->paths);
  f->paths = s->paths;
  char err[200];
  if (luapool__pool_submit(s->lp, f, err, sizeof err) != 0) {
    luapool__future_unref(f);
    fail_task(sv, t, LP_EK_BROKEN, err);
    return;
  }
  t->s = s;
  t->snext = s->tasks;
  if (s->tasks) s->tasks->sprev = t;
  s->tasks = t;
  t->node.f = f; /* our reference passes to the node */
  t->node.q = sv->cq;
  s->ntasks++;
  sv->ntasks++;
  luapool__cq_watch(&t->node);
}

/* M_CANCEL: a task that has not started in the local pool is cancelled
** there (its R_DONE says so); else rank 0 hears R_KEPT. */
static void on_cancel(server *sv, session *s, lp_reader *r) {
  uint64_t tid;
  if ((size_t)(r->end - r->p) < 8) return;
  memcpy(&tid, r->p, 8);
  rtask *t = s->tasks;
  while (t && t->id != tid)
    t = t->snext;
  if (t) {
    t->cancel_asked = 1;
    if (luapool__future_cancel(t->node.f)) return; /* answered once it fires */
    t->cancel_asked = 0;
  }
  char h[9];
  memcpy(h, &tid, 8);
  h[8] = 0;
  answer(sv, s->tag, R_KEPT, h, 9, NULL, 0); /* (lost: rank 0's cancel gives up in 5 s) */
}

static void on_paths(session *s, lp_reader *r) {
  uint64_t gen;
  const char *path, *cpath;
  size_t pl, cl;
  if ((size_t)(r->end - r->p) < 8) return;
  memcpy(&gen, r->p, 8);
  r->p += 8;
  if (luapool__get_string(r, &path, &pl) || luapool__get_string(r, &cpath, &cl)) return;
  lp_paths *ps = luapool__paths_new(path, pl, cpath, cl, gen);
  if (ps == NULL) return; /* (the tasks keep the old paths) */
  luapool__paths_unref(s->paths);
  s->paths = ps;
}

static int take_settled(server *sv, double timeout);

/* A task answered (or whose pool is gone): its record goes. */
static void finish_rtask(server *sv, rtask *t) {
  if (t->node.f) {
    if (t->s) t->s->ntasks--; /* (always there: a future is made only in a pool) */
    sv->ntasks--;
    luapool__future_unref(t->node.f);
  }
  lp_free(t);
}

/* Tries the owed answers again (of session only, dropping them, when
** given: it closed).  1 when one went. */
static int retry_owed(server *sv, session *only) {
  int any = 0;
  for (rtask **pp = &sv->owed; *pp;) {
    rtask *t = *pp;
    if (only ? t->s == only : ((t->s && t->s->closed) || answer_rtask(sv, t) == 0)) {
      *pp = t->onext;
      finish_rtask(sv, t);
      any = 1;
    } else {
      pp = &t->onext;
    }
  }
  return any;
}

/* Ends a session: its pool interrupted when asked, its workers gone, its
** futures (all settled by the stop) taken from the queue unanswered. */
static void close_session(server *sv, session *s, int interrupt) {
  for (session **pp = &sv->sessions; *pp; pp = &(*pp)->next)
    if (*pp == s) {
      *pp = s->next;
      break;
    }
  s->closed = 1;
  int stuck = luapool__pool_stop(s->lp, 1, interrupt, interrupt, NULL);
  if (stuck == 0)
    luapool__pool_destroy(s->lp);
  else
    luapool__pool_forget(s->lp); /* (stuck threads still use it) */
  take_settled(sv, 0);
  retry_owed(sv, s);              /* (its owed answers are dropped: rank 0 closed it) */
  if (stuck || s->ntasks) return; /* (futures still to settle name it: kept) */
  luapool__paths_unref(s->paths);
  lp_free(s);
}

/* Answers every task that settled; 1 when there was one. */
static int take_settled(server *sv, double timeout) {
  lp_wnode *n;
  int any = 0;
  while (luapool__cq_wait(sv->cq, timeout, luapool__now(), &n) == 1) {
    rtask *t = (rtask *)n;
    if (t->sprev)
      t->sprev->snext = t->snext;
    else
      t->s->tasks = t->snext;
    if (t->snext) t->snext->sprev = t->sprev;
    if (!t->s->closed && answer_rtask(sv, t) != 0)
      owe(sv, t); /* (counted until answered) */
    else
      finish_rtask(sv, t);
    any = 1;
    timeout = 0;
  }
  return any;
}

/* The rank was told to stop, or signalled: every session ends. */
static void close_all(server *sv, int interrupt) {
  while (sv->sessions)
    close_session(sv, sv->sessions, interrupt);
}

/* Every pool's slots hold a task not yet answered (so its workers are
** busy, or about to be): a task rank 0 sends now would wait in the local
** queue anyway. */
static int slots_full(const server *sv) {
  if (sv->sessions == NULL) return 0;
  for (const session *s = sv->sessions; s; s = s->next)
    if (s->ntasks < s->slots) return 0;
  return 1;
}

static int pending_signal(void) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  struct timespec zero = {0, 0};
  int sig = sigtimedwait(&set, NULL, &zero);
  return sig > 0 ? sig : 0;
}

int luapool__mpi_serve(void) {
  server sv;
  memset(&sv, 0, sizeof sv);
  luapool__mpi_rank_name(sv.name, sizeof sv.name, luapool__mpi_rank, NULL);
  sv.cq = luapool__cq_alloc();
  if (sv.cq == NULL) {
    fprintf(stderr, "luapool: %s: not enough memory\n", sv.name);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
#ifdef LUAPOOL_TEST_ALLOC
  const char *oom = getenv("LUAPOOL_TEST_MPI_REPLY_OOM");
  sv.test_oom = oom ? atol(oom) : 0;
#endif
  prctl(PR_SET_TIMERSLACK, 1000UL); /* sleeps of microseconds mean it */
  double last = luapool__now();     /* when the loop last found something */
  int stop = 0, sig = 0;
  while (!stop) {
    if ((sig = pending_signal()) != 0) break;
    int did = sv.owed && retry_owed(&sv, NULL);
    char *m;
    size_t len;
    int from;
    for (int k = 0; k < 64 && !stop; k++) {
      if (sv.spare == NULL && (sv.spare = lp_malloc(sizeof *sv.spare)) == NULL)
        break; /* (the messages wait: a task taken now could not be answered) */
      int r = luapool__mpi_try_recv(0, TAG_RANK, &m, &len, &from);
      if (r <= 0) break;
      did = 1;
      lp_reader rd = {m + 1, m + len};
      unsigned type = len ? (unsigned char)m[0] : 0;
      uint32_t id = 0;
      session *s = NULL;
      if (type == M_PATHS || type == M_INTERRUPT || type == M_CLOSE || type == M_CANCEL) {
        if (luapool__get_u32(&rd, &id) == 0) s = find_session(&sv, id);
      }
      if (type == M_TASK) {
        on_task(&sv, m, len);
        continue; /* (taken) */
      }
      if (type == M_OPEN)
        on_open(&sv, &rd);
      else if (type == M_PATHS && s)
        on_paths(s, &rd);
      else if (type == M_CANCEL && s)
        on_cancel(&sv, s, &rd);
      else if (type == M_INTERRUPT && s)
        luapool__pool_interrupt(s->lp);
      else if (type == M_CLOSE && s)
        close_session(&sv, s, s->ntasks > 0); /* (all answered: idle workers leave on EOF) */
      else if (type == M_STOP) {
        stop = 1;
        if (len > 1 && m[1]) { /* (rank 0 checks that every rank still answers) */
          char *b = lp_malloc(1);
          if (b) b[0] = (char)R_STOPPED;
          if (b) luapool__mpi_send(&sv.sends, 0, TAG_END, b, 1);
        }
      }
      lp_free(m);
    }
    if (take_settled(&sv, 0)) did = 1;
    luapool__mpi_sends_test(&sv.sends);
    if (stop) break;
    double now = luapool__now();
    if (did) {
      last = now;
    } else if (sv.ntasks > 0) {
      /* A settling task wakes this at once; a message waits for the poll,
      ** hot as an idle loop's (mpi_proto.h) while a slot is free: the next
      ** task of a map, sent while this one runs, reaches the local queue
      ** before this one ends, and its worker takes it without a round trip
      ** to rank 0.  With every slot busy the poll is slow (a settle wakes
      ** the loop, and one that frees a slot makes it hot again): the
      ** workers need the cores more. */
      double pause =
          slots_full(&sv) ? MPI_BUSY_POLL_US * 1e-6 : luapool__mpi_pause(now - last, 1000);
      if (pause == 0)
        sched_yield();
      else if (take_settled(&sv, pause))
        last = luapool__now();
    } else {
      luapool__mpi_idle(now - last, 2000);
    }
  }
  if (sig) {
    atomic_store(&luapool__ending_on_signal, 1); /* short grace for stuck workers */
    close_all(&sv, 1);
    _exit(128 + sig); /* mpiexec is ending the job: no MPI_Finalize */
  }
  close_all(&sv, 1);
  while (sv.owed) { /* (only tasks that failed before reaching a pool are left) */
    rtask *t = sv.owed;
    sv.owed = t->onext;
    finish_rtask(&sv, t);
  }
  lp_free(sv.spare);
  luapool__mpi_sends_wait(&sv.sends, luapool__now() + 5.0);
  luapool__cq_free(sv.cq);
  MPI_Finalize();
  return 0;
}

/* }====== */

// NOLINTEND(clang-analyzer-optin.mpi.MPI-Checker)
