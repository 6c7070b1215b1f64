/*
** Process backend: each worker thread of the pool is the proxy of one
** worker process.  The process is a fresh exec of the luapool binary in
** worker mode (never a fork of a parent that may run threads), connected by
** a Unix socket pair on fd 3; its stdout/stderr are the parent's, so print
** in a task shows up as usual.
**
** Frames on the socket: u64 payload length, u8 type, payload.
**   parent -> worker: FR_INIT (path, cpath), then FR_CALL (a task message)
**   worker -> parent: FR_READY (it took FR_INIT: started, so a task's
**                     deadline does not count the exec), FR_REPLY (the
**                     reply bytes, see worker.c), or FR_OOM
**                     just before it exits for passing max_memory_mb
** A worker that dies is noticed as end-of-file on the socket; the task it
** ran fails with kind "crashed" naming how it died, and the next task
** starts a new process.  The worker dies with its parent (PR_SET_PDEATHSIG)
** and leaves when the socket closes, so none outlives luapool.
*/
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <lua.h>

#include "luapool.h"

extern char **environ;

enum { FR_INIT = 1, FR_CALL = 2, FR_REPLY = 3, FR_OOM = 4, FR_READY = 5 };

/* How long a new worker may take to answer its start message. */
#define START_TIMEOUT 30.0

char *luapool__host_exe = NULL;

/* {======================================================
** Framing
** ======================================================= */

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL); /* a dead peer is EPIPE, not a signal */
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int read_all(int fd, char *p, size_t n) {
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static int write_frame(int fd, unsigned type, const char *p, size_t n) {
  char h[9];
  uint64_t len = n;
  memcpy(h, &len, 8);
  h[8] = (char)type;
  return write_all(fd, h, 9) || write_all(fd, p, n) ? -1 : 0;
}

/* Reads a frame into a malloc'd block.  -1 on EOF/error, -2 no memory. */
static int read_frame(int fd, unsigned *type, char **p, size_t *n) {
  char h[9];
  uint64_t len;
  if (read_all(fd, h, 9)) return -1;
  memcpy(&len, h, 8);
  *type = (unsigned char)h[8];
  if (len > SIZE_MAX - 1) return -2;
  char *b = malloc(len ? len : 1);
  if (b == NULL) return -2;
  if (read_all(fd, b, len)) {
    free(b);
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

typedef struct pworker {
  lp_worker w; /* must be first */
  atomic_int pid;
  pthread_mutex_t pidmu; /* kill() and the reap's claim of pid exclude each other */
  int fd;
  int need_init; /* the pool's initializer has not run in this process */
  int ntasks;    /* tasks this process has run (max_tasks_per_child) */
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
      char cand[PATH_MAX + 16];
      snprintf(cand, sizeof cand, "%s/luapool", buf);
      size_t n = strlen(cand);
      if (access(cand, X_OK) == 0 && n < sizeof found) {
        memcpy(found, cand, n + 1);
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
static int reap(pid_t pid, double grace) {
  int status = 0;
  double end = luapool__now() + grace;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno != EINTR)) return status;
    if (luapool__now() >= end) {
      kill(pid, SIGKILL);
      while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return status;
    }
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
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
  return pid > 0 ? reap(pid, grace) : -1;
}

static int wait_readable(int fd, double deadline);

static int spawn_worker(pworker *pw, char *err, size_t errsz) {
  lp_pool *p = pw->w.pool;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    snprintf(err, errsz, "socketpair: %s", strerror(errno));
    return -1;
  }
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t at;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&at);
  /* dup2 onto fd 3 clears close-on-exec for the child's copy only */
  posix_spawn_file_actions_adddup2(&fa, sv[1], 3);
  sigset_t none, dfl;
  sigemptyset(&none);
  sigemptyset(&dfl);
  sigaddset(&dfl, SIGPIPE);
  sigaddset(&dfl, SIGINT);
  sigaddset(&dfl, SIGTERM);
  posix_spawnattr_setsigmask(&at, &none);
  posix_spawnattr_setsigdefault(&at, &dfl);
  posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
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
    snprintf(err, errsz, "cannot start worker process %s: %s", exe, strerror(r));
    return -1;
  }
  pw->fd = sv[0];
  atomic_store(&pw->pid, pid);
  pw->need_init = p->init_msg != NULL;
  pw->ntasks = 0;
  /* INIT: the owner's package.path and cpath, so require works alike. */
  lp_buf b = {0};
  int bad = luapool__put_string(&b, p->path, strlen(p->path)) ||
            luapool__put_string(&b, p->cpath, strlen(p->cpath)) ||
            luapool__put_u32(&b, (uint32_t)p->max_memory_mb) ||
            write_frame(pw->fd, FR_INIT, b.p, b.len);
  luapool__buf_free(&b);
  unsigned type = 0;
  char *ready = NULL;
  size_t len;
  if (!bad && wait_readable(pw->fd, luapool__now() + START_TIMEOUT) == 1 &&
      read_frame(pw->fd, &type, &ready, &len) == 0) {
    free(ready);
    bad = type != FR_READY;
  } else {
    bad = 1;
  }
  if (bad) {
    int status = close_worker(pw, 0);
    char how[96];
    describe_status(status, how, sizeof how);
    snprintf(err, errsz,
             "cannot start worker process %s: it did not take "
             "its start message (%s)",
             exe, how);
    return -1;
  }
  return 0;
}

static void proc_init(lp_worker *w) {
  pworker *pw = (pworker *)w;
  atomic_init(&pw->pid, 0);
  pthread_mutex_init(&pw->pidmu, NULL);
}

static int proc_start(lp_worker *w) {
  pworker *pw = (pworker *)w;
  pw->fd = -1;
  return 0; /* the process starts with the first task */
}

/* Waits until fd is readable or the deadline (luapool__now; 0: none)
** passes: 1 readable (or closed), 0 deadline, -1 error. */
static int wait_readable(int fd, double deadline) {
  for (;;) {
    int ms = -1;
    if (deadline > 0) {
      double left = deadline - luapool__now();
      ms = left <= 0 ? 0 : (int)(left * 1000) + 1;
    }
    struct pollfd pfd = {fd, POLLIN, 0};
    int r = poll(&pfd, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    return r < 0 ? -1 : r > 0;
  }
}

/* Sends the initializer to a new process.  0, or -1 after failing f and
** breaking the pool (the stream is then out of step: the caller stops). */
static int run_initializer(pworker *pw, lp_future *f) {
  lp_worker *w = &pw->w;
  unsigned type = 0;
  char *reply = NULL;
  size_t len = 0;
  pw->need_init = 0;
  int r = write_frame(pw->fd, FR_CALL, w->pool->init_msg, w->pool->init_len);
  if (r == 0) r = read_frame(pw->fd, &type, &reply, &len);
  char why[768], msg[600] = "the worker died";
  int failed = r != 0 || type != FR_REPLY || luapool__reply_failed(reply, len, msg, sizeof msg);
  free(reply);
  if (!failed) return 0;
  snprintf(why, sizeof why, "the initializer failed in worker %s: %s", w->name, msg);
  luapool__future_fail(f, LP_EK_BROKEN, "%s", why);
  luapool__pool_break(w->pool, why);
  close_worker(pw, 1.0);
  return -1;
}

static void proc_run(lp_worker *w, lp_future *f) {
  pworker *pw = (pworker *)w;
  char label[48]; /* for reports */
  lp_pool *p = w->pool;
  char err[512];
  if (atomic_load(&pw->pid) <= 0 && spawn_worker(pw, err, sizeof err) != 0) {
    luapool__future_fail(f, LP_EK_BROKEN, "%s", err);
    return;
  }
  if (pw->need_init && run_initializer(pw, f) != 0) return;
  pid_t pid = atomic_load(&pw->pid);
  double deadline = f->timeout > 0 ? luapool__now() + f->timeout : 0;
  unsigned type = 0;
  char *reply = NULL;
  size_t len = 0;
  int r = write_frame(pw->fd, FR_CALL, f->msg, f->msglen);
  if (r == 0) {
    r = wait_readable(pw->fd, deadline);
    if (r == 0) { /* past its deadline: the only way to stop it is the kill */
      kill(pid, SIGKILL);
      close_worker(pw, 1.0);
      luapool__future_fail(f, LP_EK_TIMEOUT,
                           "%s exceeded its deadline of %g seconds in worker %s; "
                           "the worker (pid %d) was killed and will be replaced",
                           luapool__future_label(f, label, sizeof label), f->timeout, w->name,
                           (int)pid);
      return;
    }
    r = r < 0 ? -1 : read_frame(pw->fd, &type, &reply, &len);
  }
  if (r == 0 && type == FR_REPLY) {
    luapool__future_finish(f, reply, len, 0);
    if (p->max_tasks_per_child && ++pw->ntasks >= p->max_tasks_per_child)
      close_worker(pw, 2.0); /* recycled: the next task starts a new one */
    return;
  }
  free(reply);
  if (r == -2) {
    luapool__future_fail(f, LP_EK_TRANSFER, "no memory for the reply of worker %s", w->name);
    close_worker(pw, 1.0); /* the stream is out of step now */
    return;
  }
  /* The worker died (or announced that it ran out of memory first). */
  int status = close_worker(pw, 1.0);
  char how[128];
  if (r == 0 && type == FR_OOM)
    snprintf(how, sizeof how, "ran out of memory (max_memory_mb = %d)", p->max_memory_mb);
  else
    describe_status(status, how, sizeof how);
  if (atomic_load(&w->intr.closing)) {
    luapool__future_fail(f, LP_EK_INTERRUPTED, "worker %s (pid %d) was stopped while running %s",
                         w->name, (int)pid, luapool__future_label(f, label, sizeof label));
    return;
  }
  if (atomic_load(&w->intr.kill_seq) == atomic_load(&w->intr.seq) &&
      atomic_load(&w->intr.reason) == LP_STOP_SIGNAL) {
    luapool__future_fail(f, LP_EK_INTERRUPTED, "%s was interrupted: worker %s (pid %d) was stopped",
                         luapool__future_label(f, label, sizeof label), w->name, (int)pid);
    return;
  }
  char why[512];
  snprintf(why, sizeof why, "worker %s (pid %d) %s while running %s", w->name, (int)pid, how,
           luapool__future_label(f, label, sizeof label));
  luapool__future_fail(f, LP_EK_CRASHED, "%s", why);
  if (p->on_crash_break) { /* like Python's BrokenProcessPool */
    char broken[600];
    snprintf(broken, sizeof broken, "the pool is broken: %s", why);
    luapool__pool_break(p, broken);
  }
}

static void proc_stop(lp_worker *w) { close_worker((pworker *)w, 2.0); }

static void proc_interrupt(lp_worker *w) {
  pworker *pw = (pworker *)w;
  pthread_mutex_lock(&pw->pidmu);
  pid_t pid = atomic_load(&pw->pid);
  if (pid > 0) kill(pid, SIGKILL);
  pthread_mutex_unlock(&pw->pidmu);
}

const lp_backend luapool__process_backend = {
    "processpool", sizeof(pworker), 0, proc_init, proc_start, proc_run, proc_stop, proc_interrupt};

/* }====================================================== */

/* {======================================================
** Worker side (luapool --worker NAME INDEX PPID, socket on fd 3)
** ======================================================= */

/* The Lua state passed max_memory_mb: tell the parent, and go.  Exiting
** is the only safe way out of an allocation that must not fail. */
static void report_oom(lp_wstate *ws) {
  write_frame(ws->fd, FR_OOM, "", 0);
  _exit(70);
}

int luapool__process_worker_main(int fd, const char *name, int index) {
  /* Die with the parent; if it is already gone, leave now. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  signal(SIGINT, SIG_IGN);          /* Ctrl-C is the parent's to handle */
  setvbuf(stdout, NULL, _IOLBF, 0); /* task output reaches the terminal by line */
  lp_interrupt intr;                /* nothing sets it: the parent kills instead */
  atomic_init(&intr.closing, 0);
  atomic_init(&intr.seq, 0);
  atomic_init(&intr.kill_seq, UINT64_MAX);
  atomic_init(&intr.reason, 0);
  lp_wstate ws;
  memset(&ws, 0, sizeof ws);
  ws.kind = "process";
  snprintf(ws.name, sizeof ws.name, "%s", name);
  ws.index = index;
  ws.intr = &intr;
  ws.fd = fd;
  unsigned type;
  char *msg;
  size_t len;
  if (read_frame(fd, &type, &msg, &len) != 0) return 1;
  if (type != FR_INIT) {
    free(msg);
    return 1;
  }
  lp_reader r = {msg, msg + len};
  const char *path, *cpath;
  size_t pl, cl;
  uint32_t mem_mb = 0;
  char *paths = NULL;
  if (luapool__get_string(&r, &path, &pl) || luapool__get_string(&r, &cpath, &cl) ||
      luapool__get_u32(&r, &mem_mb) || (paths = malloc(pl + cl + 2)) == NULL) {
    free(msg);
    return 1;
  }
  memcpy(paths, path, pl);
  paths[pl] = 0;
  memcpy(paths + pl + 1, cpath, cl);
  paths[pl + 1 + cl] = 0;
  free(msg);
  ws.path = paths;
  ws.cpath = paths + pl + 1;
  if (mem_mb) {
    ws.mem_cap = (size_t)mem_mb << 20;
    ws.on_oom = report_oom;
  }
  if (write_frame(fd, FR_READY, "", 0) != 0) {
    free(paths);
    return 1;
  }
  lp_buf out = {0};
  int rc = 0;
  for (;;) {
    int fr = read_frame(fd, &type, &msg, &len);
    if (fr == -1) break; /* the parent closed: we are done */
    if (fr == -2 || type != FR_CALL) {
      if (fr == 0) free(msg);
      rc = 1;
      break;
    }
    out.len = 0;
    int st = luapool__run_message(&ws, msg, len, &out);
    free(msg);
    if (st != 0 || write_frame(fd, FR_REPLY, out.p, out.len) != 0) {
      rc = 1;
      break;
    }
  }
  luapool__buf_free(&out);
  luapool__wstate_close(&ws);
  luapool__http_thread_cleanup();
  free(paths);
  return rc;
}

/* }====================================================== */
