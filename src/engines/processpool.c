/*
** Process backend: each worker thread of the pool is the proxy of one
** worker process.  The process is a fresh exec of the luapool binary in
** worker mode (never a fork of a parent that may run threads), connected by
** a Unix socket pair on fd 3; its stdout/stderr are the parent's, so print
** in a task shows up as usual.
**
** Frames on the socket: u64 payload length, u8 type, payload.
**   parent -> worker: FR_HELLO (the handshake: wire.c), FR_INIT (path,
**                     cpath, memory cap), then per task
**                     FR_PATHS (path, cpath: only when the task was
**                     submitted with other paths than the worker has) and
**                     FR_CALL (f64 per-call deadline in seconds, 0: none;
**                     u64 task number; i64 first item; u32 slot: 0, or
**                     the slot of a task sent ahead (pipelining, below);
**                     u32 0; the task message)
**   worker -> parent: FR_REFUSE (its own build, when the handshake is not
**                     its own: then it exits), or FR_READY (it took
**                     FR_HELLO and FR_INIT: started, so a task's
**                     deadline does not count the exec), FR_TICK (u32: the
**                     call of the message that starts now; only for a
**                     task with a deadline, so each call has its own),
**                     FR_REPLY (the reply bytes, see worker.c), FR_SKIP
**                     (a task sent ahead that a cancel or a take-back
**                     claimed first: it did not run), or FR_OOM just
**                     before it exits for passing max_memory_mb
** A worker that dies is noticed at once: the proxy waits on the socket and
** on a pidfd of the process together, so a command the task started (which
** might hold a copy of the socket) cannot delay it; without pidfds (an old
** kernel) end-of-file on the socket says it.  What the socket holds is read
** first, so a reply or FR_OOM written just before the exit is never lost.
** The task it ran fails with kind "crashed" naming how it died, a task
** sent ahead that it had not started goes back to the queue, and the next
** task starts a new process.  The worker dies with its parent
** (PR_SET_PDEATHSIG) and leaves when the socket closes, so none outlives
** luapool.
**
** Descriptors: the worker starts with only fds 0, 1, 2, its socket on
** fd 3 and its slot page (pipelining) on fd 4, which it maps and closes
** before any task runs (posix_spawn closes the rest: a pipe the script holds open must not
** be held by workers too), and makes fd 3 close-on-exec at once, so no
** command a task runs inherits it.  Every descriptor created here is
** close-on-exec (the socket pair, the pidfd).
*/
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>

#include "base/alloc.h"
#include "base/buf.h"
#include "codec/codec.h"
#include "engines/engines.h"
#include "core/workers.h"
#include "core/future.h"
#include "kernels/kernel.h" /* luapool__http_thread_cleanup */
#include "base/stop.h"
#include "base/util.h"
#include "codec/wire.h"
#include "worker/worker.h"
#include "worker/wstate.h"

extern char **environ;

enum {
  FR_INIT = 1,
  FR_CALL = 2,
  FR_REPLY = 3,
  FR_OOM = 4,
  FR_READY = 5,
  FR_PATHS = 6,
  FR_TICK = 7,
  FR_HELLO = 8,
  FR_REFUSE = 9,
  FR_SKIP = 10
};

/* FR_CALL's header before the task message: f64 deadline, u64 task
** number, i64 first item, u32 slot (0: the worker was idle for it), u32 0. */
#define CALL_HEADER 32

/* {====== pipelining
** A worker process may hold PIPELINE_DEPTH tasks: the one it runs and the
** next, sent ahead while it runs the first, so it starts the next call
** without waiting for a round trip to its proxy.  A task sent ahead stays
** PENDING (it can be cancelled, running() is false, its deadline has not
** started) until the worker starts it.  Who wins between that start and a
** cancel is decided by one word per slot in a page of shared memory (a
** memfd the proxy maps and the worker maps as fd 4):
**
**   QUEUED --worker's CAS at the call's start--> RUNNING
**     |  \--proxy's CAS: "tell me when it starts"--> TELL --worker--> RUNNING (+ FR_TICK)
**     +--cancel's CAS (f:cancel(), Ctrl-C, shutdown{cancel_futures})--> CANCELLED
**     +--a proxy's CAS (its process died, or another worker went idle)--> TAKEN
**
** Every change out of QUEUED/TELL is a compare-and-swap, so exactly one of
** the worker's start, a cancel and a take-back wins, and the losers see the
** winner's state: a cancel that finds RUNNING returns false (the task runs),
** one that wins returns true, and the worker, finding CANCELLED or TAKEN,
** skips the task and answers FR_SKIP so the proxy frees the slot.  The
** cancel's CAS runs under the future's stripe lock, together with its
** PENDING -> CANCELLED (future.c), and the worker's start is only the CAS:
** nothing the proxy does (it learns of the start from the slot or FR_TICK,
** later) can come between.  A TAKEN task is given back to the queue by the
** proxy that took it (luapool__pool_requeue), or cancelled or failed by it;
** its own proxy only drops its reference.
** A slot word is reused only after its task's FR_REPLY or FR_SKIP came
** back (after the worker's last access) and once f is no longer held (a
** cancel's CAS can only aim at the slot of a held, PENDING future).
**
** Fairness: a proxy sends ahead only when every worker exists and is busy
** with a task (a task queued behind a long one must not wait while
** another worker could take it), and a proxy whose worker runs out of
** work takes back a task sent ahead to another one that has not started
** it (it goes to the head of the queue, and this worker takes it).  Only
** messages of at most AHEAD_MAX bytes go ahead, so the send never blocks
** (the socket holds them while the worker runs), which could otherwise
** deadlock with a big reply coming the other way. */
#define PIPELINE_DEPTH 2
#define AHEAD_MAX      ((size_t)32 << 10)
enum { SL_FREE, SL_QUEUED, SL_TELL, SL_RUNNING, SL_CANCELLED, SL_TAKEN };
/* }====== */

/* How long a new worker may take to answer its start message. */
#define START_TIMEOUT 30.0

/* posix_spawn_file_actions_addclosefrom_np: glibc 2.34 and later.  Without
** it, the worker closes what it inherited itself, first thing. */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
#define HAVE_ADDCLOSEFROM 1
#else
#define HAVE_ADDCLOSEFROM 0
#endif

char *luapool__host_exe = NULL;

/* {======================================================
** Framing
** ======================================================= */

/* Waits until fd is ready for `events` or the deadline (luapool__now; 0:
** none) passes, watching pidfd (>= 0) too: 1 ready (or closed), 0 deadline,
** -1 error or the process ended with fd not ready.  fd is tested first, so
** what a worker wrote before it ended is still read. */
static int wait_fd(int fd, short events, int pidfd, double deadline) {
  for (;;) {
    int ms = -1;
    if (deadline > 0) {
      double left = deadline - luapool__now();
      ms = left <= 0 ? 0 : (int)(left * 1000) + 1;
    }
    struct pollfd pfd[2] = {{fd, events, 0}, {pidfd, POLLIN, 0}};
    int r = poll(pfd, pidfd >= 0 ? 2 : 1, ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) return 0;
    if (pfd[0].revents) return 1;
    return -1; /* only the pidfd: the worker is gone, nothing more will come */
  }
}

/* Both take pidfd: -1 for plain blocking I/O (the worker side, or a kernel
** without pidfds), else the peer's pidfd, so that a dead peer ends the
** transfer even when another process still holds its end of the socket.
** A frame goes in one sendmsg (its header, the call header and the
** message as three pieces), not one send per piece: a no-op task's round
** trip was 12 system calls, 5 of them sends. */
static int write_iov(int fd, int pidfd, struct iovec *iov, int niov) {
  int flags = MSG_NOSIGNAL | (pidfd >= 0 ? MSG_DONTWAIT : 0); /* EPIPE, not a signal */
  while (niov > 0 && iov->iov_len == 0) {
    iov++;
    niov--;
  }
  while (niov > 0) {
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
    ssize_t w = sendmsg(fd, &mh, flags);
    if (w < 0) {
      if (errno == EINTR) continue;
      if ((errno == EAGAIN || errno == EWOULDBLOCK) && pidfd >= 0 &&
          wait_fd(fd, POLLOUT, pidfd, 0) == 1)
        continue;
      return -1;
    }
    size_t done = (size_t)w;
    while (niov > 0 && done >= iov->iov_len) { /* what went whole */
      done -= iov->iov_len;
      iov++;
      niov--;
    }
    if (niov > 0) { /* a piece that went in part */
      iov->iov_base = (char *)iov->iov_base + done;
      iov->iov_len -= done;
    }
  }
  return 0;
}

/* What was received and not yet taken: a read takes whatever the socket
** holds (up to RB_SIZE), so a frame's header and payload, or a tick and
** the reply after it, come in one system call.  Payloads larger than half
** the buffer are read straight into their own block (no second copy of a
** big value). */
#define RB_SIZE 65536

typedef struct rdbuf {
  char *p; /* RB_SIZE bytes, made with the first read; NULL until then */
  size_t beg, end;
} rdbuf;

static void rb_reset(rdbuf *rb) { rb->beg = rb->end = 0; }

static void rb_free(rdbuf *rb) {
  lp_free(rb->p);
  rb->p = NULL;
  rb->beg = rb->end = 0;
}

static int rb_pending(const rdbuf *rb) { return rb->end > rb->beg; }

/* One receive of up to n bytes into p, waiting for them (and watching
** pidfd, when there is one): how many came, or -1 on EOF or error. */
static ssize_t recv_some(int fd, int pidfd, char *p, size_t n) {
  for (;;) {
    ssize_t r = pidfd >= 0 ? recv(fd, p, n, MSG_DONTWAIT) : read(fd, p, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      if ((errno == EAGAIN || errno == EWOULDBLOCK) && pidfd >= 0 &&
          wait_fd(fd, POLLIN, pidfd, 0) == 1)
        continue;
      return -1;
    }
    return r == 0 ? -1 : r;
  }
}

/* One receive into rb (empty): 0 some bytes, -1 EOF, error, or no memory. */
static int rb_fill(int fd, int pidfd, rdbuf *rb) {
  if (rb->p == NULL && (rb->p = lp_malloc(RB_SIZE)) == NULL) return -1;
  rb->beg = rb->end = 0;
  ssize_t r = recv_some(fd, pidfd, rb->p, RB_SIZE);
  if (r < 0) return -1;
  rb->end = (size_t)r;
  return 0;
}

static int read_all(int fd, int pidfd, rdbuf *rb, char *p, size_t n) {
  while (n > 0) {
    if (rb_pending(rb)) {
      size_t k = rb->end - rb->beg < n ? rb->end - rb->beg : n;
      memcpy(p, rb->p + rb->beg, k);
      rb->beg += k;
      p += k;
      n -= k;
      continue;
    }
    if (n < RB_SIZE / 2) {
      if (rb_fill(fd, pidfd, rb)) return -1;
      continue;
    }
    ssize_t r = recv_some(fd, pidfd, p, n);
    if (r < 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

/* A frame whose payload is head (hn bytes, may be 0) then p (n bytes). */
static int write_frame2(int fd, int pidfd, unsigned type, const char *head, size_t hn,
                        const char *p, size_t n) {
  char h[9];
  uint64_t len = hn + n;
  memcpy(h, &len, 8);
  h[8] = (char)type;
  /* (iovec takes a void *: writev only reads through it) */
  union {
    const char *c;
    void *v;
  } hu = {head}, pu = {p};
  struct iovec iov[3] = {{h, 9}, {hu.v, hn}, {pu.v, n}};
  return write_iov(fd, pidfd, iov, 3);
}

static int write_frame(int fd, int pidfd, unsigned type, const char *p, size_t n) {
  return write_frame2(fd, pidfd, type, NULL, 0, p, n);
}

/* The payload of FR_INIT and FR_PATHS: path, cpath (and more after). */
static int put_paths(lp_buf *b, const lp_paths *ps) {
  return luapool__put_string(b, ps->path, strlen(ps->path)) ||
                 luapool__put_string(b, ps->cpath, strlen(ps->cpath))
             ? -1
             : 0;
}

/* Reads a frame into a malloc'd block.  -1 on EOF/error, -2 no memory. */
static int read_frame(int fd, int pidfd, rdbuf *rb, unsigned *type, char **p, size_t *n) {
  char h[9];
  uint64_t len;
  if (read_all(fd, pidfd, rb, h, 9)) return -1;
  memcpy(&len, h, 8);
  *type = (unsigned char)h[8];
  if (len > SIZE_MAX - 1) return -2;
  char *b = lp_malloc(len ? len : 1);
  if (b == NULL) return -2;
  if (read_all(fd, pidfd, rb, b, len)) {
    lp_free(b);
    return -1;
  }
  *p = b;
  *n = len;
  return 0;
}

/* }====================================================== */

/* {======================================================
** Parent side
** ======================================================= */

/* The process engine's own options (README): what happens on a crash,
** recycling, and the memory cap. */
typedef struct proc_config {
  int on_crash_break;                     /* on_crash = "break" */
  int max_tasks_per_child, max_memory_mb; /* 0: none */
} proc_config;

static const proc_config *config_of(const lp_pool *p) { return (const proc_config *)p->config; }

typedef struct pworker {
  lp_worker w; /* must be first */
  atomic_int pid;
  pthread_mutex_t pidmu; /* kill() and the reap's claim of pid exclude each other */
  pid_t killed;          /* the last pid proc_interrupt killed (pidmu): its death is no crash */
  int fd;
  int pidfd;          /* the process's pidfd (close-on-exec); -1: none (old kernel) */
  int need_init;      /* the pool's initializer has not run in this process */
  int ntasks;         /* tasks this process has run (max_tasks_per_child) */
  uint64_t paths_gen; /* of the paths this process has */
  rdbuf in;           /* what was received from the process and not yet read */
  /* Pipelining (above).  slots: PIPELINE_DEPTH words shared with the
  ** process (NULL: this worker does not pipeline); shmfd its memfd. */
  int shmfd;
  atomic_uint *slots;
  /* The task held in each slot, sent ahead (mutex: p->mu, so that other
  ** proxies and cancel_held_all can reach it); NULL: none. */
  lp_future *ahead[PIPELINE_DEPTH];
  /* The tasks sent and not yet answered, oldest first (its thread only):
  ** the first is the one the worker runs or starts next. */
  struct {
    lp_future *f; /* a reference */
    int slot;     /* 1-based slot it went ahead in; 0: started when sent */
    int started;  /* started (luapool__future_start) */
  } fl[PIPELINE_DEPTH];
  int nfl;
  /* ahead[k] was sent in full: another proxy may take it back, since
  ** nothing here reads its message any more (mutex: p->mu). */
  int ahead_sent[PIPELINE_DEPTH];
} pworker;

const char *luapool__worker_exe(void) {
  static char found[PATH_MAX];
  /* An explicit choice wins: an unusual install layout, or a test. */
  const char *env = getenv("LUAPOOL_WORKER_EXE");
  if (env && *env) return env;
  if (luapool__host_exe) return luapool__host_exe;
  if (found[0]) return found;
  /* Loaded as a module by another Lua: the luapool binary sits next to
  ** luapool.so in the build tree; installed, it is in the bin directory. */
  Dl_info info;
  if (dladdr((void *)luapool__worker_exe, &info) && info.dli_fname) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", info.dli_fname);
    char *slash = strrchr(buf, '/');
    if (slash) {
      *slash = 0;
      char cand[2 * PATH_MAX + 16];
      /* beside it (a build tree), then the bindir as installed relative to
      ** it (an installed tree that moved keeps working) */
      const char *rels[] = {"", "/" LUAPOOL_MODULE_TO_BINDIR};
      for (size_t k = 0; k < sizeof rels / sizeof rels[0]; k++) {
        snprintf(cand, sizeof cand, "%s%s/luapool", buf, rels[k]);
        size_t n = strlen(cand);
        if (access(cand, X_OK) != 0 || n >= sizeof found) continue;
        /* (named without its "lib/.../../../bin" in messages and ps) */
        if (realpath(cand, found) == NULL) memcpy(found, cand, n + 1);
        return found;
      }
    }
  }
  snprintf(found, sizeof found, "%s", LUAPOOL_INSTALL_BINDIR "/luapool");
  return found;
}

static void describe_status(int status, char *buf, size_t sz) {
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    snprintf(buf, sz, "killed by signal %d (%s)", sig, sigabbrev_np(sig) ? sigabbrev_np(sig) : "?");
  } else if (WIFEXITED(status)) {
    snprintf(buf, sz, "exited with status %d", WEXITSTATUS(status));
  } else {
    snprintf(buf, sz, "ended (status %#x)", status);
  }
}

/* Waits for the worker process to end, killing it after `grace` seconds. */
static int reap(pid_t pid, int pidfd, double grace) {
  int status = 0;
  double end = luapool__now() + grace;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno != EINTR)) return status;
    double left = end - luapool__now();
    if (left <= 0) {
      kill(pid, SIGKILL);
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return status;
    }
    /* The pidfd is readable once the process ended: the reap follows
    ** its exit at once.  A 1 ms nap instead was most of the close of a
    ** pool whose worker leaves within a fraction of it after the EOF. */
    struct pollfd pfd = {pidfd, POLLIN, 0};
    if (pidfd < 0 || poll(&pfd, 1, (int)(left * 1000) + 1) < 0) {
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, NULL);
    }
  }
}

/* Closes the socket (an idle worker leaves on EOF) and reaps the process.
** Returns its wait status, or -1 when there was none. */
static int close_worker(pworker *pw, double grace) {
  /* Claimed under pidmu before waitpid: until then the pid cannot be
  ** reused (the child is at worst a zombie), so a concurrent
  ** proc_interrupt kills our child or nothing. */
  pthread_mutex_lock(&pw->pidmu);
  pid_t pid = atomic_exchange(&pw->pid, 0);
  pthread_mutex_unlock(&pw->pidmu);
  if (pw->fd >= 0) close(pw->fd);
  pw->fd = -1;
  rb_reset(&pw->in); /* what the next process sends starts afresh */
  int status = pid > 0 ? reap(pid, pw->pidfd, grace) : -1;
  if (pw->pidfd >= 0) close(pw->pidfd); /* after the reap: it names that process */
  pw->pidfd = -1;
  return status;
}

/* A pidfd for our child pid (close-on-exec, as pidfd_open makes them all),
** or -1 when the kernel has none: then the socket alone tells. */
static int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  return (int)syscall(SYS_pidfd_open, pid, 0);
#else
  (void)pid;
  return -1;
#endif
}

/* Waits for the worker's next frame (or its end): 1 something to read
** (already received, or on the socket), 0 the deadline (0: none) passed,
** -1 the worker is gone or the socket failed. */
static int wait_worker(pworker *pw, double deadline) {
  if (rb_pending(&pw->in)) return 1;
  return wait_fd(pw->fd, POLLIN, pw->pidfd, deadline);
}

/* Children the kernel reaps itself (SIGCHLD ignored, or SA_NOCLDWAIT,
** inherited from whatever started luapool) leave nothing to wait for: a
** worker's death would go unseen and its pid could be reused under a kill.
** The pool needs its children's deaths: the default comes back. */
static void own_reaping(void) {
  struct sigaction sa;
  if (sigaction(SIGCHLD, NULL, &sa) == 0 &&
      (sa.sa_handler == SIG_IGN || (sa.sa_flags & SA_NOCLDWAIT))) {
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGCHLD, &dfl, NULL);
  }
}

/* fd moved above the standard descriptors (close-on-exec): a host started
** with stdin, stdout or stderr closed (`luapool job.lua >&-`, a daemon)
** would otherwise get the worker's socket as fd 0, 1 or 2, and the script's
** print (or io.read) would write into (or read from) the worker's stream. */
static int above_stdio(int fd) {
  if (fd < 0 || fd > 2) return fd;
  int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  close(fd);
  return nfd;
}

static int spawn_worker(pworker *pw, const lp_paths *paths, char *err, size_t errsz) {
  own_reaping();
  lp_pool *p = pw->w.pool;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    snprintf(err, errsz, "socketpair: %s", strerror(errno));
    return -1;
  }
  sv[0] = above_stdio(sv[0]);
  sv[1] = above_stdio(sv[1]);
  if (sv[0] < 0 || sv[1] < 0) {
    if (sv[0] >= 0) close(sv[0]);
    if (sv[1] >= 0) close(sv[1]);
    snprintf(err, errsz, "cannot start a worker process: %s", strerror(errno));
    return -1;
  }
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&at);
  /* dup2 onto fd 3 clears close-on-exec for the child's copy only (the
  ** worker sets it again at once); everything above it is closed, so the
  ** worker holds no file of the script's (the write end of a pipe would
  ** keep its reader waiting for as long as the worker lives). */
  int fr = posix_spawn_file_actions_adddup2(&fa, sv[1], 3);
  /* The slot page on fd 4 (the worker maps it and closes it at once). */
  if (fr == 0 && pw->shmfd >= 0) fr = posix_spawn_file_actions_adddup2(&fa, pw->shmfd, 4);
#if HAVE_ADDCLOSEFROM
  if (fr == 0) fr = posix_spawn_file_actions_addclosefrom_np(&fa, pw->shmfd >= 0 ? 5 : 4);
#endif
  if (fr != 0) {
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    close(sv[0]);
    close(sv[1]);
    snprintf(err, errsz, "cannot start a worker process: %s", strerror(fr));
    return -1;
  }
  /* SIGINT and SIGTERM blocked until the worker's handlers are in (a
  ** group's signal in between would kill it: luapool__process_worker_main
  ** unblocks them); the rest as a fresh process has them. */
  sigset_t held, dfl;
  sigemptyset(&held);
  sigaddset(&held, SIGINT);
  sigaddset(&held, SIGTERM);
  sigemptyset(&dfl);
  sigaddset(&dfl, SIGPIPE);
  sigaddset(&dfl, SIGINT);
  sigaddset(&dfl, SIGTERM);
  posix_spawnattr_setsigmask(&at, &held);
  posix_spawnattr_setsigdefault(&at, &dfl);
  posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  /* LUAPOOL_TEST_SPAWN_PAUSE: seconds before each spawn, so that a spec
  ** can stop a task while its process is being started (below). */
  double pause = luapool__test_seconds("LUAPOOL_TEST_SPAWN_PAUSE", 60);
  if (pause > 0) luapool__sleep_through(pause);
  char idx[16], ppid[24];
  snprintf(idx, sizeof idx, "%d", pw->w.index);
  snprintf(ppid, sizeof ppid, "%ld", (long)getpid());
  const char *exe = luapool__worker_exe();
  char *argv[] = {(char *)exe, "--worker", pw->w.name, idx, ppid, NULL};
  pid_t pid;
  int r = posix_spawn(&pid, exe, &fa, &at, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&at);
  close(sv[1]);
  if (r != 0) {
    close(sv[0]);
    snprintf(err, errsz,
             "cannot start worker process %s: %s (LUAPOOL_WORKER_EXE names the luapool binary "
             "workers run)",
             exe, strerror(r));
    return -1;
  }
  pw->fd = sv[0];
  pw->pidfd = above_stdio(open_pidfd(pid)); /* a child not yet reaped: pid is still ours */
  /* The task is started before its process exists: a stop that came in
  ** between found no pid to kill (proc_interrupt), and the task ran on
  ** past the stop's grace ("left running", cli_spec under load).  Its
  ** flags are set before proc_interrupt takes pidmu: either it sees this
  ** pid, or this sees them. */
  pthread_mutex_lock(&pw->pidmu);
  atomic_store(&pw->pid, pid);
  pw->killed = 0; /* (a reused pid is not the one a stop killed) */
  if (luapool__interrupted(&pw->w.intr)) {
    kill(pid, SIGKILL);
    pw->killed = pid;
  }
  pthread_mutex_unlock(&pw->pidmu);
  pw->need_init = p->init_msg != NULL;
  pw->ntasks = 0;
  /* INIT: the script's package.path and cpath as the first task saw
  ** them, so require works alike. */
  lp_buf b = {0}, hb = {0};
  pw->paths_gen = paths->gen;
  int said =
      luapool__wire_hello(&hb) == 0 && write_frame(pw->fd, pw->pidfd, FR_HELLO, hb.p, hb.len) == 0;
  /* LUAPOOL_TEST_HELLO_PAUSE: seconds between HELLO and INIT, so that a
  ** spec sees a worker that refused at HELLO gone before INIT is sent. */
  double hello_pause = luapool__test_seconds("LUAPOOL_TEST_HELLO_PAUSE", 60);
  if (said && hello_pause > 0) luapool__sleep_through(hello_pause);
  int bad = !said || put_paths(&b, paths) ||
            luapool__put_u32(&b, (uint32_t)config_of(p)->max_memory_mb) ||
            luapool__put_u32(&b, pw->shmfd >= 0) ||
            write_frame(pw->fd, pw->pidfd, FR_INIT, b.p, b.len);
  luapool__buf_free(&b);
  luapool__buf_free(&hb);
  unsigned type = 0;
  char *ready = NULL;
  size_t len = 0;
  /* Read even when INIT could not be sent: a worker of another build
  ** answers HELLO with FR_REFUSE and exits, and when this thread was slow
  ** to send INIT (a loaded machine) its send fails, while the refusal
  ** waits on the socket (options_spec, once in CI). */
  if (said && wait_worker(pw, luapool__now() + START_TIMEOUT) == 1 &&
      read_frame(pw->fd, pw->pidfd, &pw->in, &type, &ready, &len) == 0) {
    bad = bad || type != FR_READY;
  } else {
    bad = 1;
  }
  if (bad) {
    int status = close_worker(pw, 0);
    char how[96], mine[256];
    describe_status(status, how, sizeof how);
    luapool__wire_describe(mine, sizeof mine);
    if (type == FR_REFUSE)
      snprintf(err, errsz,
               "cannot start worker process %s: it is %.*s, and this is %s: a worker must be "
               "the same luapool build (LUAPOOL_WORKER_EXE names the binary workers run)",
               exe, (int)(len > 300 ? 300 : len), ready ? ready : "", mine);
    else
      snprintf(err, errsz,
               "cannot start worker process %s: it did not take its start message (%s); "
               "a worker must be the same luapool build, %s",
               exe, how, mine);
    lp_free(ready);
    return -1;
  }
  lp_free(ready);
  return 0;
}

static void proc_init(lp_worker *w) {
  pworker *pw = (pworker *)w;
  atomic_init(&pw->pid, 0);
  pthread_mutex_init(&pw->pidmu, NULL);
  pw->killed = 0;
  pw->fd = -1; /* (again in proc_start): never a stray close of fd 0 */
  pw->pidfd = -1;
  pw->shmfd = -1;
  pw->slots = NULL;
  /* The slot page (pipelining); without it (no memfd, an old glibc whose
  ** posix_spawn cannot close the rest, a slot number that does not fit
  ** f->held) this worker runs one task at a time. */
#if HAVE_ADDCLOSEFROM
  if (w->index * PIPELINE_DEPTH > 255) return;
  int fd0 = memfd_create("luapool-slots", MFD_CLOEXEC);
  if (fd0 < 0) return;
  /* Above 4: the spawn's dup2 onto fd 3 (the socket) must not overwrite it
  ** before its own dup2 onto fd 4. */
  int fd = fcntl(fd0, F_DUPFD_CLOEXEC, 5);
  close(fd0);
  if (fd < 0) return;
  long pg = sysconf(_SC_PAGESIZE);
  void *m = MAP_FAILED;
  if (pg > 0 && ftruncate(fd, pg) == 0)
    m = mmap(NULL, (size_t)pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) {
    close(fd);
    return;
  }
  pw->shmfd = fd;
  pw->slots = m; /* zeros: SL_FREE */
#endif
}

static int proc_start(lp_worker *w) {
  pworker *pw = (pworker *)w;
  pw->fd = -1;
  pw->pidfd = -1;
  return 0; /* the process starts with the first task */
}

static void break_pool(lp_pool *p, const char *why);

/* Sends the initializer to a new process and waits for it, within the
** task's deadline when it has one (as a thread worker runs it within the
** deadline of its first task).  0, or -1 after failing f and breaking the
** pool (the stream is then out of step: the caller stops), or after
** failing f as interrupted when a stop killed the process meanwhile. */
static int run_initializer(pworker *pw, lp_future *f) {
  lp_worker *w = &pw->w;
  unsigned type = 0;
  char *reply = NULL;
  size_t len = 0;
  pw->need_init = 0;
  pid_t pid = atomic_load(&pw->pid);
  double deadline = f->timeout > 0 ? luapool__now() + f->timeout : 0;
  char hdr[CALL_HEADER] = {0}; /* no per-call deadline: the kill below is its stop */
  int r = write_frame2(pw->fd, pw->pidfd, FR_CALL, hdr, sizeof hdr, w->pool->init_msg,
                       w->pool->init_len);
  if (r == 0) r = wait_worker(pw, deadline);
  char why[768], msg[600];
  if (r == 0) { /* past the deadline: the kill is the only way to stop it */
    kill(pid, SIGKILL);
    close_worker(pw, 1.0);
    snprintf(msg, sizeof msg,
             "it exceeded its deadline of %g seconds; the worker (pid %d) was killed", f->timeout,
             (int)pid);
  } else {
    if (r == 1) r = read_frame(pw->fd, pw->pidfd, &pw->in, &type, &reply, &len);
    if (r == 0 && type == FR_REPLY && !luapool__reply_failed(reply, len, msg, sizeof msg)) {
      lp_free(reply);
      return 0;
    }
    lp_free(reply);
    int status = close_worker(pw, 1.0);
    pthread_mutex_lock(&pw->pidmu);
    int ours = pw->killed == pid;
    pthread_mutex_unlock(&pw->pidmu);
    if (ours && luapool__interrupted(&w->intr)) { /* a stop, not a failing initializer */
      char label[48];
      luapool__future_fail(f, LP_EK_INTERRUPTED,
                           "%s was interrupted: worker %s (pid %d) was stopped in the initializer",
                           luapool__future_label(f, label, sizeof label), w->name, (int)pid);
      return -1;
    }
    if (r != 0 || type != FR_REPLY) {
      char how[96];
      if (r == 0 && type == FR_OOM)
        snprintf(how, sizeof how, "ran out of memory (max_memory_mb = %d)",
                 config_of(w->pool)->max_memory_mb);
      else
        describe_status(status, how, sizeof how);
      snprintf(msg, sizeof msg, "its process (pid %d) %s", (int)pid, how);
    }
  }
  snprintf(why, sizeof why, "the initializer failed in worker %s: %s", w->name, msg);
  luapool__future_fail(f, LP_EK_BROKEN, "%s", why);
  break_pool(w->pool, why);
  return -1;
}

/* Sends FR_PATHS when f was submitted with other paths than the process has. */
static int send_paths(pworker *pw, const lp_future *f) {
  if (f->paths == NULL || f->paths->gen == pw->paths_gen) return 0;
  lp_buf b = {0};
  int r = put_paths(&b, f->paths) || write_frame(pw->fd, pw->pidfd, FR_PATHS, b.p, b.len);
  luapool__buf_free(&b);
  if (r == 0) pw->paths_gen = f->paths->gen;
  return r ? -1 : 0;
}

/* FR_PATHS when f needs them, then f's FR_CALL (slot: 1-based slot it
** goes ahead in, 0: the worker is idle for it and f is started). */
static int send_call(pworker *pw, const lp_future *f, int slot) {
  char hdr[CALL_HEADER] = {0};
  uint32_t sl = (uint32_t)slot;
  memcpy(hdr, &f->timeout, 8);
  memcpy(hdr + 8, &f->task_no, 8);
  memcpy(hdr + 16, &f->item_lo, 8);
  memcpy(hdr + 24, &sl, 4);
  int r = send_paths(pw, f);
  if (r == 0) r = write_frame2(pw->fd, pw->pidfd, FR_CALL, hdr, sizeof hdr, f->msg, f->msglen);
  return r;
}

static double deadline_of(const lp_future *f) {
  return f->timeout > 0 ? luapool__now() + f->timeout : 0;
}

/* f->held of slot k of worker w (1-based; proc_init made sure it fits). */
static unsigned char held_id(const lp_worker *w, int k) {
  return (unsigned char)((w->index - 1) * PIPELINE_DEPTH + k + 1);
}

/* Moves slot word *sw from QUEUED or TELL to `to`: 1 done (this caller
** decides the task's fate), 0 the word was something else (in *was). */
static int slot_claim(atomic_uint *sw, unsigned to, unsigned *was) {
  unsigned st = atomic_load(sw);
  while (st == SL_QUEUED || st == SL_TELL)
    if (atomic_compare_exchange_weak(sw, &st, to)) return 1;
  if (was) *was = st;
  return 0;
}

/* Under p->mu, the pool broken: the tasks sent ahead and not started fail
** "broken" like the queue (a worker must not start them after the break).
** One still being sent is left to its proxy, which calls this once sent. */
static void break_held(lp_pool *p) {
  lp_wset *s = luapool__wset(p);
  for (int i = 0; i < s->nworkers; i++) {
    pworker *o = (pworker *)s->workers[i];
    for (int k = 0; k < PIPELINE_DEPTH; k++) {
      lp_future *g = o->ahead[k];
      if (g == NULL || !o->ahead_sent[k] || !slot_claim(&o->slots[k], SL_TAKEN, NULL)) continue;
      o->ahead[k] = NULL;
      luapool__future_hold(g, 0);
      luapool__future_fail(g, LP_EK_BROKEN, "%s", p->broken); /* (its proxy drops it at FR_SKIP) */
    }
  }
}

/* Breaks the pool (luapool__pool_break) and fails what was sent ahead. */
static void break_pool(lp_pool *p, const char *why) {
  luapool__pool_break(p, why);
  pthread_mutex_lock(&p->mu);
  break_held(p);
  pthread_mutex_unlock(&p->mu);
}

/* p->mu locked: every worker exists and runs a task.  Not "none idle or
** spinning": a worker thread that has not reached its first wait yet is
** neither, and a task sent ahead past it then waited behind a busy one
** while it slept (it takes back only after a task of its own). */
static int all_busy(lp_pool *p, lp_wset *s) {
  if (s->nworkers < p->max_workers) return 0;
  for (int i = 0; i < s->nworkers; i++)
    if (!atomic_load(&s->workers[i]->busy)) return 0;
  return 1;
}

/* Sends the next queued task ahead when the pipelining rules (above) allow
** it.  0, or -1 when the send failed (the worker is gone). */
static int send_ahead(pworker *pw) {
  lp_worker *w = &pw->w;
  lp_pool *p = w->pool;
  const proc_config *c = config_of(p);
  if (pw->slots == NULL || pw->nfl >= PIPELINE_DEPTH || atomic_load(&w->intr.closing)) return 0;
  if (c->max_tasks_per_child && pw->ntasks + pw->nfl >= c->max_tasks_per_child) return 0;
  int k = -1;
  for (int i = 0; i < PIPELINE_DEPTH && k < 0; i++) {
    int used = 0;
    for (int j = 0; j < pw->nfl; j++)
      used |= pw->fl[j].slot == i + 1;
    if (!used) k = i;
  }
  if (k < 0) return 0;
  lp_wset *s = luapool__wset(p);
  pthread_mutex_lock(&p->mu);
  lp_future *f = p->head;
  /* Nor one that needs FR_PATHS first: the paths are of any size (a long
  ** package.path), and a send that fills the socket while the worker writes
  ** a big reply waits for a reader that waits for it (helper-55). */
  int new_paths = f != NULL && f->paths != NULL && f->paths->gen != pw->paths_gen;
  if (f == NULL || !all_busy(p, s) || f->msglen > AHEAD_MAX || new_paths || pw->ahead[k] != NULL) {
    pthread_mutex_unlock(&p->mu);
    return 0;
  }
  luapool__pool_take(p);
  atomic_store(&pw->slots[k], SL_QUEUED);
  /* Held before p->mu goes: from here a cancel asks the slot, and
  ** cancel_held_all (under p->mu) finds it in ahead[k]. */
  if (!luapool__future_hold(f, held_id(w, k))) { /* cancelled while queued */
    atomic_store(&pw->slots[k], SL_FREE);
    pthread_mutex_unlock(&p->mu);
    luapool__future_unref(f);
    return 0;
  }
  pw->ahead[k] = f;
  pw->ahead_sent[k] = 0;
  pthread_mutex_unlock(&p->mu);
  pw->fl[pw->nfl].f = f;
  pw->fl[pw->nfl].slot = k + 1;
  pw->fl[pw->nfl].started = 0;
  pw->nfl++;
  /* (A cancel now leaves the message in place: f is held, future.c.) */
  int r = send_call(pw, f, k + 1);
  pthread_mutex_lock(&p->mu);
  pw->ahead_sent[k] = r == 0;
  if (p->broken) break_held(p); /* (a break while it was sent) */
  pthread_mutex_unlock(&p->mu);
  return r;
}

/* The first task in flight starts (its slot said RUNNING, or a tick came). */
static void start_first(pworker *pw) {
  luapool__future_start(pw->fl[0].f, pw->w.name); /* (wins: a cancel found RUNNING) */
  pw->fl[0].started = 1;
}

/* A task ahead became the first in flight: 1 when it has started already
** (it is started here), else 0 (a tick or FR_SKIP will tell). */
static int first_started(pworker *pw) {
  atomic_uint *sw = &pw->slots[pw->fl[0].slot - 1];
  unsigned st;
  if (slot_claim(sw, SL_TELL, &st)) return 0; /* the worker ticks when it starts it */
  if (st != SL_RUNNING) return 0;             /* cancelled or taken back: FR_SKIP comes */
  start_first(pw);
  return 1;
}

/* Drops the first task in flight (its reference) and frees its slot. */
static void pop_first(pworker *pw) {
  lp_future *f = pw->fl[0].f;
  int slot = pw->fl[0].slot;
  if (slot) {
    lp_pool *p = pw->w.pool;
    pthread_mutex_lock(&p->mu);
    if (pw->ahead[slot - 1] == f) pw->ahead[slot - 1] = NULL;
    pw->ahead_sent[slot - 1] = 0;
    atomic_store(&pw->slots[slot - 1], SL_FREE);
    pthread_mutex_unlock(&p->mu);
  }
  pw->nfl--;
  memmove(&pw->fl[0], &pw->fl[1], (size_t)pw->nfl * sizeof pw->fl[0]);
  luapool__future_unref(f);
}

/* The process is gone (reaped): every task in flight that it never started
** goes back to the queue (cancelled instead when cancel: Ctrl-C), one it
** started after the first fails with why_running ("crashed"), one a cancel
** or another proxy decided is only dropped. */
static void end_in_flight(pworker *pw, int cancel, const char *why_running) {
  lp_worker *w = &pw->w;
  lp_pool *p = w->pool;
  lp_future *ran[PIPELINE_DEPTH];
  int nran = 0;
  pthread_mutex_lock(&p->mu);
  for (int i = pw->nfl - 1; i >= 0; i--) { /* the newest first: requeued, the oldest ends first */
    lp_future *f = pw->fl[i].f;
    int k = pw->fl[i].slot - 1;
    unsigned st;
    if (k < 0 || pw->fl[i].started) { /* (only the first can be: failed by the caller) */
      continue;
    }
    if (slot_claim(&pw->slots[k], SL_TAKEN, &st)) {
      luapool__future_hold(f, 0);
      if (cancel) {
        luapool__future_cancel(f);
      } else {
        luapool__future_ref(f); /* the queue's */
        luapool__pool_requeue(p, f);
      }
    } else if (st == SL_RUNNING) {
      ran[nran++] = f;
    }
    if (pw->ahead[k] == f) pw->ahead[k] = NULL;
    pw->ahead_sent[k] = 0;
    atomic_store(&pw->slots[k], SL_FREE);
  }
  pthread_mutex_unlock(&p->mu);
  char label[48];
  for (int i = 0; i < nran; i++) {
    luapool__future_start(ran[i], w->name);
    luapool__future_fail(ran[i], LP_EK_CRASHED, "%s while running %s", why_running,
                         luapool__future_label(ran[i], label, sizeof label));
  }
  for (int i = 0; i < pw->nfl; i++)
    luapool__future_unref(pw->fl[i].f);
  pw->nfl = 0;
}

/* A worker whose process ran out of work takes back one task sent ahead to
** another worker that has not started it: it goes to the head of the queue,
** where this worker's thread takes it next. */
static void take_back_one(pworker *pw) {
  lp_pool *p = pw->w.pool;
  lp_wset *s = luapool__wset(p);
  pthread_mutex_lock(&p->mu);
  /* Not busy from here (workers.c clears it again after run): a proxy's
  ** send_ahead after this lock sees a free worker and sends nothing ahead;
  ** one before it sent a task this loop finds and takes back. */
  atomic_store(&pw->w.busy, 0);
  for (int i = 0; i < s->nworkers && p->head == NULL && !p->broken; i++) {
    pworker *o = (pworker *)s->workers[i];
    if (o == pw) continue;
    for (int k = 0; k < PIPELINE_DEPTH; k++) {
      lp_future *g = o->ahead[k];
      /* (o->slots is set while o holds a task: o is in its proc_run) */
      if (g == NULL || !o->ahead_sent[k] || !slot_claim(&o->slots[k], SL_TAKEN, NULL)) continue;
      o->ahead[k] = NULL;
      luapool__future_hold(g, 0);
      luapool__future_ref(g); /* the queue's; o drops its own at FR_SKIP */
      luapool__pool_requeue(p, g);
      break;
    }
  }
  pthread_mutex_unlock(&p->mu);
}

/* Runs f (started) and, while it runs, the tasks sent ahead after it. */
/* Has the worker's process ended (not reaped yet: it stays a zombie for
** close_worker)? */
static int worker_exited(const pworker *pw) {
  siginfo_t si;
  memset(&si, 0, sizeof si);
  return waitid(P_PID, (id_t)atomic_load(&pw->pid), &si, WEXITED | WNOHANG | WNOWAIT) == 0 &&
         si.si_pid != 0;
}

/* A worker that died while it had no task (the OOM killer picks the
** biggest process, idle or not; a kill): nothing of the next task ran, so
** it gets a new worker instead of failing as crashed.  With on_crash =
** "break" the death still breaks the pool, as Python's
** BrokenProcessPool does, and f fails broken.  0 when f may go on. */
static int replace_dead_idle(pworker *pw, lp_future *f) {
  lp_worker *w = &pw->w;
  lp_pool *p = w->pool;
  pid_t pid = atomic_load(&pw->pid);
  if (pid <= 0) return 0;
  pthread_mutex_lock(&pw->pidmu);
  int ours = pw->killed == pid; /* a stop's kill (Ctrl-C, a closing pool): no crash */
  pthread_mutex_unlock(&pw->pidmu);
  /* Killed by a stop, it is reaped even before it ended (the kill makes
  ** that quick): one still tearing down its heap took the next task and
  ** died under it, "crashed" (helper-46, a Ctrl-C between two tasks). */
  if (!ours && !worker_exited(pw)) return 0;
  int status = close_worker(pw, 1.0);
  char label[48];
  /* The stop was aimed at f itself: taken, then killed before it was sent. */
  if (ours && luapool__stopped_whole(&w->intr)) {
    luapool__future_fail(f, LP_EK_INTERRUPTED, "%s was interrupted: worker %s (pid %d) was stopped",
                         luapool__future_label(f, label, sizeof label), w->name, (int)pid);
    return -1;
  }
  if (ours || !config_of(p)->on_crash_break) return 0;
  char how[128], why[300];
  describe_status(status, how, sizeof how);
  snprintf(why, sizeof why, "the pool is broken: worker %s (pid %d) %s while idle", w->name,
           (int)pid, how);
  luapool__future_fail(f, LP_EK_BROKEN, "%s", why);
  break_pool(p, why);
  return -1;
}

static void proc_run(lp_worker *w, lp_future *f) {
  pworker *pw = (pworker *)w;
  char label[48]; /* for reports */
  lp_pool *p = w->pool;
  char err[512];
  if (replace_dead_idle(pw, f) != 0) return;
  /* A stop that came before the process was there (spawn_worker) ends the
  ** task as interrupted, not as a worker that could not start. */
  if (atomic_load(&pw->pid) <= 0 &&
      (luapool__interrupted(&w->intr) || spawn_worker(pw, f->paths, err, sizeof err) != 0)) {
    if (luapool__interrupted(&w->intr))
      luapool__future_fail(f, LP_EK_INTERRUPTED,
                           "%s was interrupted: worker %s was stopped before its process started",
                           luapool__future_label(f, label, sizeof label), w->name);
    else
      luapool__future_fail(f, LP_EK_BROKEN, "%s", err);
    return;
  }
  if (pw->need_init && run_initializer(pw, f) != 0) return;
  pid_t pid = atomic_load(&pw->pid);
  luapool__future_ref(f); /* every task in flight holds one (pop_first drops it) */
  pw->fl[0].f = f;
  pw->fl[0].slot = 0;
  pw->fl[0].started = 1;
  pw->nfl = 1;
  /* Each call has its own deadline: the worker says when one starts
  ** (FR_TICK), and only the call running then is past it.  A task sent
  ** ahead has none until it starts. */
  double deadline = deadline_of(f);
  unsigned type = 0;
  char *reply = NULL;
  size_t len = 0;
  uint32_t call = 0;
  int r = send_call(pw, f, 0);
  while (r == 0 && pw->nfl > 0) {
    if (send_ahead(pw) != 0) {
      r = -1;
      break;
    }
    r = wait_worker(pw, pw->fl[0].started ? deadline : 0);
    if (r == 0) { /* past its deadline: the only way to stop it is the kill */
      lp_future *cur = pw->fl[0].f;
      kill(pid, SIGKILL);
      close_worker(pw, 1.0);
      if (cur->task_no)
        luapool__future_label(cur, label, sizeof label);
      else
        snprintf(label, sizeof label, "item #%lld", (long long)cur->item_lo + (long long)call);
      /* The chunk fails as a whole (the kill took its other calls), but it
      ** was this call's deadline: map names it as err.item, as a thread
      ** worker's per-call timeout does (helper-55). */
      luapool__future_fail_call(cur, cur->task_no ? 0 : (int)call + 1, LP_EK_TIMEOUT,
                                "%s exceeded its deadline of %g seconds in worker %s; "
                                "the worker (pid %d) was killed and will be replaced",
                                label, cur->timeout, w->name, (int)pid);
      pop_first(pw);
      char why[160];
      snprintf(why, sizeof why, "worker %s (pid %d) was killed at the deadline of %s", w->name,
               (int)pid, label);
      end_in_flight(pw, 0, why);
      return;
    }
    r = r < 0 ? -1 : read_frame(pw->fd, pw->pidfd, &pw->in, &type, &reply, &len);
    if (r != 0) break;
    if (type == FR_TICK) { /* a call starts (the first of a task ahead: it started) */
      if (len == 4) memcpy(&call, reply, 4);
      lp_free(reply);
      reply = NULL;
      if (!pw->fl[0].started) start_first(pw);
      deadline = deadline_of(pw->fl[0].f);
      continue;
    }
    if (type != FR_REPLY && type != FR_SKIP) break; /* FR_OOM, or out of step */
    if (type == FR_REPLY) {
      if (!pw->fl[0].started) start_first(pw); /* (it ran: its slot says RUNNING) */
      luapool__future_finish(pw->fl[0].f, reply, len, 0);
      pw->ntasks++;
    } else {
      lp_free(reply); /* a task cancelled or taken back before it started */
    }
    reply = NULL;
    pop_first(pw);
    call = 0;
    deadline = pw->nfl > 0 && first_started(pw) ? deadline_of(pw->fl[0].f) : 0;
  }
  if (r == 0 && pw->nfl == 0) {
    if (config_of(p)->max_tasks_per_child && pw->ntasks >= config_of(p)->max_tasks_per_child)
      close_worker(pw, 2.0); /* recycled: the next task starts a new one */
    take_back_one(pw);
    return;
  }
  lp_free(reply);
  /* The worker died (or announced that it ran out of memory first), or
  ** the stream is out of step: it ends first, so that nothing starts
  ** after the slots are read. */
  int status = close_worker(pw, 1.0);
  /* The first task in flight is the one the process was running, when it
  ** had started it (its slot tells, for one sent ahead). */
  if (!pw->fl[0].started && pw->fl[0].slot &&
      atomic_load(&pw->slots[pw->fl[0].slot - 1]) == SL_RUNNING)
    start_first(pw);
  lp_future *cur = pw->fl[0].started ? pw->fl[0].f : NULL;
  if (r == -2) {
    if (cur) {
      luapool__future_fail(cur, LP_EK_TRANSFER, "no memory for the reply of worker %s", w->name);
      pop_first(pw);
    }
    end_in_flight(pw, 0, "its worker ran out of memory for a reply");
    return;
  }
  char how[128];
  if (r == 0 && type == FR_OOM)
    snprintf(how, sizeof how, "ran out of memory (max_memory_mb = %d)",
             config_of(p)->max_memory_mb);
  else
    describe_status(status, how, sizeof how);
  char why[512];
  snprintf(why, sizeof why, "worker %s (pid %d) %s", w->name, (int)pid, how);
  int interrupted = luapool__signal_stopped(&w->intr);
  if (cur == NULL) { /* it died between two tasks: nothing of theirs ran */
    end_in_flight(pw, interrupted, why);
    return;
  }
  if (atomic_load(&w->intr.closing)) {
    luapool__future_fail(cur, LP_EK_INTERRUPTED, "worker %s (pid %d) was stopped while running %s",
                         w->name, (int)pid, luapool__future_label(cur, label, sizeof label));
  } else if (interrupted) {
    luapool__future_fail(cur, LP_EK_INTERRUPTED,
                         "%s was interrupted: worker %s (pid %d) was stopped",
                         luapool__future_label(cur, label, sizeof label), w->name, (int)pid);
  } else {
    char full[600];
    snprintf(full, sizeof full, "%s while running %s", why,
             luapool__future_label(cur, label, sizeof label));
    luapool__future_fail(cur, LP_EK_CRASHED, "%s", full);
    pop_first(pw);
    /* The tasks sent ahead go back to the queue before a break fails it. */
    end_in_flight(pw, 0, why);
    if (config_of(p)->on_crash_break) { /* like Python's BrokenProcessPool */
      char broken[700];
      snprintf(broken, sizeof broken, "the pool is broken: %s", full);
      break_pool(p, broken);
    }
    return;
  }
  pop_first(pw);
  end_in_flight(pw, interrupted, why);
}

/* f:cancel() on a task sent ahead (engine.h: under f's stripe lock). */
static int proc_cancel_held(lp_pool *p, lp_future *f) {
  int id = f->held - 1;
  /* (the worker holding f is in its proc_run: its slot page is mapped) */
  pworker *pw = (pworker *)luapool__wset(p)->workers[id / PIPELINE_DEPTH];
  unsigned st;
  if (slot_claim(&pw->slots[id % PIPELINE_DEPTH], SL_CANCELLED, &st)) return 1;
  return st != SL_RUNNING; /* (TAKEN: back to the queue, where it is cancelled as queued) */
}

/* Ctrl-C and shutdown{cancel_futures}: the tasks sent ahead count as queued
** (under p->mu; each cancel goes through proc_cancel_held). */
static size_t proc_cancel_held_all(lp_pool *p) {
  lp_wset *s = luapool__wset(p);
  size_t calls = 0;
  for (int i = 0; i < s->nworkers; i++) {
    pworker *pw = (pworker *)s->workers[i];
    for (int k = 0; k < PIPELINE_DEPTH; k++)
      if (pw->ahead[k] && luapool__future_cancel(pw->ahead[k]))
        calls += (size_t)pw->ahead[k]->ncalls;
  }
  return calls;
}

static void proc_stop(lp_worker *w) {
  pworker *pw = (pworker *)w;
  close_worker(pw, 2.0);
  rb_free(&pw->in);
  /* No task is held any more (each proc_run ends with none in flight),
  ** so no cancel can reach the page. */
  if (pw->slots) munmap((void *)pw->slots, (size_t)sysconf(_SC_PAGESIZE));
  pw->slots = NULL;
  if (pw->shmfd >= 0) close(pw->shmfd);
  pw->shmfd = -1;
}

static void proc_interrupt(lp_worker *w) {
  pworker *pw = (pworker *)w;
  pthread_mutex_lock(&pw->pidmu);
  pid_t pid = atomic_load(&pw->pid);
  if (pid > 0) {
    kill(pid, SIGKILL);
    pw->killed = pid;
  }
  pthread_mutex_unlock(&pw->pidmu);
}

static int proc_default_workers(int ncpu) { return ncpu; }

static const char *const crash_choices[] = {"replace", "break", NULL};

static const lp_option proc_options[] = {
    {.name = "on_crash",
     .per_process = 1,
     .type = LP_OPT_CHOICE,
     .choices = crash_choices,
     .offset = offsetof(proc_config, on_crash_break)},
    {.name = "max_tasks_per_child",
     .per_process = 1,
     .type = LP_OPT_INT,
     .min = 1,
     .max = INT32_MAX,
     .offset = offsetof(proc_config, max_tasks_per_child)},
    {.name = "max_memory_mb",
     .per_process = 1,
     .type = LP_OPT_INT,
     .min = 1,
     .max = INT32_MAX,
     .offset = offsetof(proc_config, max_memory_mb)},
    {.name = NULL},
};

static const lp_worker_ops proc_ops = {
    .worker_size = sizeof(pworker),
    .watchdog = 0,
    .init = proc_init,
    .start = proc_start,
    .run = proc_run,
    .stop = proc_stop,
    .interrupt = proc_interrupt,
};

const lp_engine luapool__process_engine = {
    .kind = "processpool",
    .options = proc_options,
    .config_size = sizeof(proc_config),
    .default_workers = proc_default_workers,
    .chunking = 1,
    LP_WORKER_SET(&proc_ops),
    .cancel_held = proc_cancel_held,
    .cancel_held_all = proc_cancel_held_all,
};

/* }====================================================== */

/* {======================================================
** Worker side (luapool --worker NAME INDEX PPID, socket on fd 3)
** ======================================================= */

/* The Lua state passed max_memory_mb: tell the parent, and go.  Exiting
** is the only safe way out of an allocation that must not fail. */
static void report_oom(lp_wstate *ws) {
  write_frame(ws->fd, -1, FR_OOM, "", 0);
  _exit(70);
}

/* A call with a deadline starts: the parent times it from now.  (A lost
** tick only makes the parent's deadline earlier, never later.) */
static void send_tick(lp_wstate *ws, uint32_t call) {
  write_frame(ws->fd, -1, FR_TICK, (const char *)&call, 4);
}

/* Copies the paths of an FR_INIT or FR_PATHS payload into one malloc'd
** block (path, then cpath); NULL when malformed or out of memory. */
static char *read_paths(lp_reader *r, const char **path, const char **cpath) {
  const char *p, *c;
  size_t pl, cl;
  if (luapool__get_string(r, &p, &pl) || luapool__get_string(r, &c, &cl)) return NULL;
  char *paths = lp_malloc(pl + cl + 2);
  if (paths == NULL) return NULL;
  memcpy(paths, p, pl);
  paths[pl] = 0;
  memcpy(paths + pl + 1, c, cl);
  paths[pl + 1 + cl] = 0;
  *path = paths;
  *cpath = paths + pl + 1;
  return paths;
}

/* A worker of a serving MPI rank's local pool (engines/mpi_rank.c sets
** LUAPOOL_MPI_WORKER = "RANK SIZE HOST" before it starts any): what
** luapool.current_worker() says in its tasks. */
static char mpi_identity[320];

const char *luapool__mpi_identity(void) { return mpi_identity[0] ? mpi_identity : NULL; }

/* What the worker process received from its parent and has not read yet
** (one per process: static, so an early return leaves it reachable). */
static rdbuf in;

/* The worker's SIGTERM: nothing to do (luapool__process_worker_main). */
static void ignore_signal(int sig) { (void)sig; }

int luapool__process_worker_main(int fd, const char *name, int index) {
  /* The socket came through exec, so without close-on-exec: set it before
  ** anything runs, or every command a task starts (io.popen, os.execute,
  ** a background job) would hold it, and the parent would see this
  ** process's end only when the last of them exits. */
  int fl = fcntl(fd, F_GETFD);
  if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) < 0) return 1;
#if !HAVE_ADDCLOSEFROM
  /* posix_spawn could not close what the script had open: do it here. */
  long maxfd = sysconf(_SC_OPEN_MAX);
  if (maxfd < 0 || maxfd > 65536) maxfd = 65536;
  for (int i = 3; i < maxfd; i++)
    if (i != fd) close(i);
#endif
  /* Die with the parent; if it is already gone, leave now. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  /* Ctrl-C is the parent's to handle, and so is a SIGTERM sent to the
  ** whole process group (kill -TERM -- -PGID, timeout(1), a batch system):
  ** the parent stops the running tasks as interrupted; killed by them here,
  ** they would read as crashed.  A handler and not SIG_IGN: an exec resets
  ** it, so a command a task starts still ends on the group's signal. */
  struct sigaction quiet = {.sa_handler = ignore_signal, .sa_flags = SA_RESTART};
  sigemptyset(&quiet.sa_mask);
  sigaction(SIGINT, &quiet, NULL);
  sigaction(SIGTERM, &quiet, NULL);
  sigset_t held; /* blocked by spawn_worker until now */
  sigemptyset(&held);
  sigaddset(&held, SIGINT);
  sigaddset(&held, SIGTERM);
  sigprocmask(SIG_UNBLOCK, &held, NULL);
  setvbuf(stdout, NULL, _IOLBF, 0); /* task output reaches the terminal by line */
  lp_interrupt intr;                /* nothing sets it: the parent kills instead */
  atomic_init(&intr.closing, 0);
  atomic_init(&intr.seq, 0);
  atomic_init(&intr.kill_seq, UINT64_MAX);
  atomic_init(&intr.reason, 0);
  lp_wstate ws;
  memset(&ws, 0, sizeof ws);
  ws.kind = "process";
  ws.own_process = 1;
  const char *mpi = getenv("LUAPOOL_MPI_WORKER");
  if (mpi) { /* (not passed on to what its tasks start) */
    snprintf(mpi_identity, sizeof mpi_identity, "%s", mpi);
    unsetenv("LUAPOOL_MPI_WORKER");
    ws.kind = "mpi";
  }
  snprintf(ws.name, sizeof ws.name, "%s", name);
  ws.index = index;
  ws.intr = &intr;
  ws.fd = fd;
  unsigned type;
  char *msg;
  size_t len;
  /* The handshake first: a parent of another build is told what this one
  ** is, and nothing else is read from it. */
  if (read_frame(fd, -1, &in, &type, &msg, &len) != 0) return 1;
  char peer[256];
  int alien = type != FR_HELLO || luapool__wire_check(msg, len, peer, sizeof peer) != 0;
  lp_free(msg);
  if (alien) {
    char mine[256];
    luapool__wire_describe(mine, sizeof mine);
    write_frame(fd, -1, FR_REFUSE, mine, strlen(mine));
    return 1;
  }
  if (read_frame(fd, -1, &in, &type, &msg, &len) != 0) return 1;
  if (type != FR_INIT) {
    lp_free(msg);
    return 1;
  }
  lp_reader r = {msg, msg + len};
  uint32_t mem_mb = 0, has_slots = 0;
  char *paths = read_paths(&r, &ws.path, &ws.cpath);
  if (paths == NULL || luapool__get_u32(&r, &mem_mb) || luapool__get_u32(&r, &has_slots)) {
    lp_free(paths);
    lp_free(msg);
    return 1;
  }
  lp_free(msg);
  /* The slot page (pipelining: the parent side's comment) is fd 4; mapped,
  ** the descriptor goes before any task runs. */
  atomic_uint *slots = NULL;
  if (has_slots) {
    void *m = mmap(NULL, (size_t)sysconf(_SC_PAGESIZE), PROT_READ | PROT_WRITE, MAP_SHARED, 4, 0);
    close(4);
    if (m == MAP_FAILED) {
      lp_free(paths);
      return 1;
    }
    slots = m;
  }
  ws.call_start = send_tick;
  ws.deadline_by_kill = 1;
  if (mem_mb) {
    ws.mem_cap = (size_t)mem_mb << 20;
    ws.on_oom = report_oom;
  }
  if (write_frame(fd, -1, FR_READY, "", 0) != 0) {
    lp_free(paths);
    return 1;
  }
  lp_buf out = {0};
  int rc = 0;
  for (;;) {
    int fr = read_frame(fd, -1, &in, &type, &msg, &len);
    if (fr == -1) break;               /* the parent closed: we are done */
    if (fr == 0 && type == FR_PATHS) { /* the next task's package.path and cpath */
      lp_reader pr = {msg, msg + len};
      const char *path, *cpath;
      char *np = read_paths(&pr, &path, &cpath);
      lp_free(msg);
      if (np == NULL || luapool__wstate_set_paths(&ws, path, cpath) != 0) {
        lp_free(np);
        rc = 1;
        break;
      }
      lp_free(paths);
      paths = np;
      continue;
    }
    if (fr == -2 || type != FR_CALL || len < CALL_HEADER) {
      if (fr == 0) lp_free(msg);
      rc = 1;
      break;
    }
    memcpy(&ws.call_timeout, msg, 8);
    memcpy(&ws.task_no, msg + 8, 8);
    memcpy(&ws.item_lo, msg + 16, 8);
    if (!(ws.call_timeout > 0)) ws.call_timeout = 0; /* (NaN too) */
    uint32_t slot;
    memcpy(&slot, msg + 24, 4);
    if (slot > 0) { /* sent ahead: it starts only if no cancel or take-back came first */
      if (slots == NULL || slot > PIPELINE_DEPTH) {
        lp_free(msg);
        rc = 1;
        break;
      }
      atomic_uint *sw = &slots[slot - 1];
      unsigned st = atomic_load(sw);
      while ((st == SL_QUEUED || st == SL_TELL) &&
             !atomic_compare_exchange_weak(sw, &st, SL_RUNNING)) {
      }
      int skip = st != SL_QUEUED && st != SL_TELL;
      if (skip || st == SL_TELL) { /* the proxy waits to hear */
        uint32_t none = 0;
        if (write_frame(fd, -1, skip ? FR_SKIP : FR_TICK, (const char *)&none, skip ? 0 : 4) != 0) {
          lp_free(msg);
          rc = 1;
          break;
        }
      }
      if (skip) {
        lp_free(msg);
        continue;
      }
    }
    out.len = 0;
    int st = luapool__run_message(&ws, msg + CALL_HEADER, len - CALL_HEADER, &out);
    ws.deadline = 0;
    lp_free(msg);
    if (st != 0 || write_frame(fd, -1, FR_REPLY, out.p, out.len) != 0) {
      rc = 1;
      break;
    }
  }
  luapool__buf_free(&out);
  rb_free(&in);
  luapool__wstate_close(&ws);
  luapool__http_thread_cleanup();
  lp_free(paths);
  return rc;
}

/* }====================================================== */
