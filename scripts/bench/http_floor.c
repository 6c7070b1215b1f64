/* http_floor: the floor of the HTTP benchmarks, a client with nothing but
** epoll and sockets (no futures, no Lua, no library), so that peers.lua and
** http.lua can show what the machine and the server allow in the same run.
**
**   http_floor many  ADDR PORT PATH N T   N requests at once, one connection
**                                         each, on T threads (as an iopool's
**                                         T loops)
**   http_floor chain ADDR PORT PATH N C [T]
**                                         N requests over C kept-alive
**                                         connections, one after the other on
**                                         each, on T threads (default 1)
**
** ADDR must be an IPv4 literal of the loopback network (the benchmarks talk
** to the local fixture only).  Every answer must be a complete 200 (a
** Content-Length or chunked body); anything else is an error and the exit
** status is 1.  At the end the connections are reset (SO_LINGER 0), as a
** closing luapool loop does (src/kernels/httploop.c, luapool__hl_close_fd),
** so neither leaves ports in TIME_WAIT for the next run.  Prints one line:
** "http_floor: MODE N requests ... in S s". */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF   65536 /* a read, per thread */
#define MAXANS 65536 /* the largest answer kept whole (the fixture's are small) */

typedef struct conn {
  int fd, sent, left; /* left: requests still to make on it */
  size_t n;           /* bytes of a partial answer kept in buf */
  char *buf;          /* (NULL until an answer comes in pieces) */
} conn;

typedef struct job {
  struct sockaddr_in addr;
  char req[1024];
  int reqlen;
  conn *c;
  int nc;
  const char *err; /* the first failure, static text */
  char detail[160];
  char rbuf[RBUF];
} job;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void die(const char *what) {
  fprintf(stderr, "http_floor: %s\n", what);
  exit(2);
}

static long number(const char *s, long lo, long hi, const char *what) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) {
    fprintf(stderr, "http_floor: %s must be an integer in %ld..%ld, got '%s'\n", what, lo, hi, s);
    exit(2);
  }
  return v;
}

/* Whether the n bytes at b begin with a whole answer; its length in *len.
** -1: not a 200, malformed, or a close announced while requests remain
** (j->err says which). */
static int complete(job *j, const char *b, size_t n, int more, size_t *len) {
  const char *end = memmem(b, n, "\r\n\r\n", 4);
  if (end == NULL) return 0;
  if (n < 12 || memcmp(b, "HTTP/1.", 7) != 0 || memcmp(b + 8, " 200", 4) != 0) {
    j->err = "an answer that is not a 200";
    snprintf(j->detail, sizeof j->detail, "%.*s", (int)strcspn(b, "\r\n") % 100, b);
    return -1;
  }
  size_t head = (size_t)(end - b) + 4;
  if (more && (memmem(b, head, "\r\nConnection: close", 19) ||
               memmem(b, head, "\r\nconnection: close", 19))) {
    j->err = "the server closes its connections (Connection: close): chain needs keep-alive";
    return -1;
  }
  const char *cl = memmem(b, head, "\r\nContent-Length:", 17);
  if (cl == NULL) cl = memmem(b, head, "\r\ncontent-length:", 17);
  if (cl) {
    size_t body = strtoul(cl + 17, NULL, 10);
    if (n < head + body) return 0;
    *len = head + body;
    return 1;
  }
  if (memmem(b, head, "chunked", 7) == NULL) {
    j->err = "an answer with neither Content-Length nor chunked";
    return -1;
  }
  size_t i = head;
  for (;;) { /* size line, data, CRLF; the last chunk then an empty trailer */
    const char *eol = memmem(b + i, n - i, "\r\n", 2);
    if (eol == NULL) return 0;
    char *hexend;
    size_t sz = strtoul(b + i, &hexend, 16);
    if (hexend == b + i) {
      j->err = "a malformed chunk size";
      return -1;
    }
    i = (size_t)(eol - b) + 2;
    if (sz == 0) {
      if (n - i < 2) return 0;
      if (memcmp(b + i, "\r\n", 2) != 0) {
        j->err = "trailers (not expected from the fixture)";
        return -1;
      }
      *len = i + 2;
      return 1;
    }
    if (n - i < sz + 2) return 0;
    i += sz + 2;
  }
}

static int open_conn(job *j, int ep, int k) {
  conn *c = &j->c[k];
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) {
    j->err = "socket failed (raise ulimit -n?)";
    return -1;
  }
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(c->fd, (struct sockaddr *)&j->addr, sizeof j->addr) != 0 && errno != EINPROGRESS) {
    j->err = "connect failed";
    return -1;
  }
  struct epoll_event e = {.events = EPOLLOUT, .data.u32 = (uint32_t)k};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e) != 0) {
    j->err = "epoll_ctl failed";
    return -1;
  }
  return 0;
}

static int send_req(job *j, int ep, int k) {
  conn *c = &j->c[k];
  if (send(c->fd, j->req, (size_t)j->reqlen, MSG_NOSIGNAL) != j->reqlen) {
    j->err = "send failed or short";
    return -1;
  }
  if (!c->sent) {
    c->sent = 1;
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)k};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e) != 0) {
      j->err = "epoll_ctl failed";
      return -1;
    }
  }
  return 0;
}

/* Runs j's connections to the end; 0, or -1 with j->err set. */
static int run(job *j) {
  int ep = epoll_create1(EPOLL_CLOEXEC), active = 0;
  if (ep < 0) {
    j->err = "epoll_create1 failed";
    return -1;
  }
  for (int k = 0; k < j->nc; k++) {
    if (j->c[k].left == 0) continue;
    if (open_conn(j, ep, k) != 0) return -1;
    active++;
  }
  struct epoll_event ev[256];
  while (active > 0) {
    int nev = epoll_wait(ep, ev, 256, 30000);
    if (nev <= 0) {
      j->err = nev == 0 ? "no event for 30 s" : "epoll_wait failed";
      return -1;
    }
    for (int e = 0; e < nev; e++) {
      int k = (int)ev[e].data.u32;
      conn *c = &j->c[k];
      if (!c->sent) {
        if (send_req(j, ep, k) != 0) return -1;
        continue;
      }
      ssize_t r = recv(c->fd, j->rbuf, RBUF, 0);
      if (r <= 0) {
        if (r < 0 && errno == EAGAIN) continue;
        j->err = r == 0 ? "the server closed a connection mid-answer" : "recv failed";
        return -1;
      }
      const char *b = j->rbuf;
      size_t n = (size_t)r;
      if (c->n > 0) { /* the rest of a partial answer */
        if (c->n + n > MAXANS) {
          j->err = "an answer larger than 64 KiB";
          return -1;
        }
        memcpy(c->buf + c->n, b, n);
        c->n += n;
        b = c->buf;
        n = c->n;
      }
      size_t len;
      int got;
      while (c->left > 0 && (got = complete(j, b, n, c->left > 1, &len)) != 0) {
        if (got < 0) return -1;
        b += len;
        n -= len;
        if (--c->left > 0) {
          if (send_req(j, ep, k) != 0) return -1;
        } else { /* done: its events (the server's close) no longer count */
          active--;
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        }
      }
      if (c->left == 0 && n > 0) {
        j->err = "bytes after the last answer";
        return -1;
      }
      if (n > 0) { /* a partial answer: kept until the rest */
        if (n > MAXANS) {
          j->err = "an answer larger than 64 KiB";
          return -1;
        }
        if (c->buf == NULL && (c->buf = malloc(MAXANS)) == NULL) {
          j->err = "out of memory";
          return -1;
        }
        memmove(c->buf, b, n);
      }
      c->n = n;
    }
  }
  for (int k = 0; k < j->nc; k++) {
    if (j->c[k].left == 0 && j->c[k].fd > 0) {
      struct linger lg = {1, 0};
      setsockopt(j->c[k].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
      close(j->c[k].fd);
    }
  }
  close(ep);
  return 0;
}

static void *run_thread(void *p) {
  job *j = p;
  return (void *)(intptr_t)run(j);
}

int main(int argc, char **argv) {
  int many = argc > 1 && strcmp(argv[1], "many") == 0;
  if (!(many && argc == 7) &&
      !(argc > 1 && strcmp(argv[1], "chain") == 0 && (argc == 7 || argc == 8)))
    die("usage: http_floor many ADDR PORT PATH N T | chain ADDR PORT PATH N C [T] (see the head of "
        "http_floor.c)");
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1 || (ntohl(a.sin_addr.s_addr) >> 24) != 127) {
    fprintf(stderr, "http_floor: ADDR must be a loopback IPv4 address (127.x.y.z), got '%s'\n",
            argv[2]);
    return 2;
  }
  a.sin_port = htons((uint16_t)number(argv[3], 1, 65535, "PORT"));
  const char *path = argv[4];
  if (path[0] != '/' || strpbrk(path, " \r\n") != NULL || strlen(path) > 900) {
    fprintf(stderr,
            "http_floor: PATH must start with '/' and hold no space or line break, got '%s'\n",
            path);
    return 2;
  }
  int n = (int)number(argv[5], 1, 1000000, "N");
  int t = (int)number(argv[6], 1, many ? 64 : 100000, many ? "T" : "C");
  int nc = many ? n : (t < n ? t : n); /* connections */
  int nth = many ? t : argc == 8 ? (int)number(argv[7], 1, 64, "T") : 1;
  if (nth > nc) nth = nc;
  struct rlimit rl; /* as luapool does at start: the soft limit up to the hard one */
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  conn *cs = calloc((size_t)nc, sizeof *cs);
  job *jobs = calloc((size_t)nth, sizeof *jobs);
  pthread_t *th = calloc((size_t)nth, sizeof *th);
  if (cs == NULL || jobs == NULL || th == NULL) die("out of memory");
  for (int k = 0; k < nc; k++)
    cs[k].left = many ? 1 : n / nc + (k < n % nc);
  double t0 = now();
  for (int i = 0; i < nth; i++) {
    job *j = &jobs[i];
    j->addr = a;
    j->reqlen =
        snprintf(j->req, sizeof j->req,
                 "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUser-Agent: http_floor\r\nAccept: */*\r\n\r\n",
                 path, argv[2], argv[3]);
    int first = (int)((long)nc * i / nth), last = (int)((long)nc * (i + 1) / nth);
    j->c = cs + first;
    j->nc = last - first;
    if (pthread_create(&th[i], NULL, run_thread, j) != 0) die("pthread_create failed");
  }
  int failed = 0;
  for (int i = 0; i < nth; i++) {
    void *rc;
    pthread_join(th[i], &rc);
    if (rc != NULL) {
      fprintf(stderr, "http_floor: %s%s%s\n", jobs[i].err, jobs[i].detail[0] ? ": " : "",
              jobs[i].detail);
      failed = 1;
    }
  }
  double secs = now() - t0;
  if (failed) {
    /* (a failed run's sockets close with the process) */
  } else if (many) {
    printf("http_floor: many %d requests at once on %d thread(s) in %.3f s\n", n, nth, secs);
  } else {
    printf("http_floor: chain %d requests over %d connection(s) on %d thread(s) in %.3f s\n", n, nc,
           nth, secs);
  }
  for (int k = 0; k < nc; k++)
    free(cs[k].buf);
  free(cs);
  free(jobs);
  free(th);
  return failed;
}
