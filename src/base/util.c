/*
** Clock, CPU count, monotonic condition variables, signal handlers, the
** test knobs' seconds.
*/
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/util.h"

double luapool__now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double luapool__test_seconds(const char *name, double max) {
  const char *s = getenv(name);
  if (s == NULL || *s == '\0') return 0;
  char *end;
  double v = strtod(s, &end);
  return *end == '\0' && v > 0 && v < max ? v : 0;
}

void luapool__sleep_through(double seconds) {
  struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

int luapool__cpu_count(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

int luapool__cond_init(pthread_cond_t *cv) {
  pthread_condattr_t ca; /* waits measure time on the monotonic clock */
  if (pthread_condattr_init(&ca) != 0) return -1;
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  int r = pthread_cond_init(cv, &ca);
  pthread_condattr_destroy(&ca);
  return r;
}

int luapool__mutex_init_spinning(pthread_mutex_t *mu) {
#ifdef PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP
  pthread_mutexattr_t ma;
  if (pthread_mutexattr_init(&ma) != 0) return -1;
  pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
  int r = pthread_mutex_init(mu, &ma);
  pthread_mutexattr_destroy(&ma);
  return r;
#else
  return pthread_mutex_init(mu, NULL);
#endif
}

void luapool__on_signal(int sig, void (*handler)(int)) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART; /* interrupted system calls resume */
  sigaction(sig, &sa, NULL);
}
