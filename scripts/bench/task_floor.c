/* task_floor: the floor of the per-task benchmarks (issue 14's "threads
** submit+result per no-op task"), a thread pool with nothing but what any
** pool of Lua states must do per task, so that peers.lua can show what this
** machine allows in the same run as luapool and luv.
**
**   task_floor N [W [R]]   R rounds (default 1) of: a pool of W threads
**                          (default 2), each with its own Lua state, is
**                          started; a Lua script on the main state runs
**                            for i = 1, N do fs[i] = pool:submit(noop, i) end
**                            for i = 1, N do assert(fs[i]:result() == i) end
**                          and the pool is closed.
**
** Per task that is: a Lua call of a C function; a userdata with a __gc for the
** future; a malloc'd task on a queue under a mutex (a condition variable
** wakes an idle thread; a thread that ran out of work watches the queue for
** 30 us, yielding the CPU, before it sleeps, and the owner watches a future
** as long before it sleeps on it: without that every task cost a futex
** wake-up, 17 us a task here, as luapool's own queue learned in session
** 23: src/core/workers.c); on a worker, a protected call of the state's own
** no-op with one integer; the result stored and the future marked done (the
** owner is woken only when it waits); then result(), and the future's
** collection.  What it leaves out is what makes luapool usable: the function
** is not moved (each worker state has its own noop; the script's argument is
** only checked to be a function), arguments and results are one integer, not
** encoded values, and there are no errors, timeouts, cancels, callbacks,
** stats or interrupts.  Prints, per round, "task_floor: N tasks W threads in
** S s (U us/task)" (the script's time, pool start and stop included). */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct task {
  struct task *next;
  lua_Integer arg, result;
  atomic_uint done;
} task;

#define SPIN_SECONDS 30e-6

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Watches *v (no lock held) until it differs from seen or the spin is over. */
static void spin_while(atomic_uint *v, unsigned seen) {
  double end = now() + SPIN_SECONDS;
  for (;;) {
    for (int i = 0; i < 64; i++) {
      if (atomic_load_explicit(v, memory_order_acquire) != seen) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    if (now() >= end) return;
    sched_yield();
  }
}

typedef struct pool {
  atomic_uint qseq; /* moves at each submit: what a spinning thread watches */
  pthread_mutex_t mu;
  pthread_cond_t work,
      finished; /* work: a task or the close; finished: a task the owner waits for */
  task *head, *tail;
  int idle, closing, owner_waits;
  int nthreads;
  pthread_t *threads;
} pool;

static void die(const char *what) {
  fprintf(stderr, "task_floor: %s\n", what);
  exit(1);
}

static void *worker(void *arg) {
  pool *p = arg;
  lua_State *L = luaL_newstate();
  if (L == NULL) die("cannot make a worker state");
  if (luaL_dostring(L, "return function(x) return x end")) die(lua_tostring(L, -1));
  for (;;) {
    pthread_mutex_lock(&p->mu);
    if (p->head == NULL && !p->closing) {
      unsigned seq = atomic_load_explicit(&p->qseq, memory_order_relaxed);
      pthread_mutex_unlock(&p->mu);
      spin_while(&p->qseq, seq);
      pthread_mutex_lock(&p->mu);
    }
    while (p->head == NULL && !p->closing) {
      p->idle++;
      pthread_cond_wait(&p->work, &p->mu);
      p->idle--;
    }
    task *t = p->head;
    if (t == NULL) { /* closing, and nothing left */
      pthread_mutex_unlock(&p->mu);
      break;
    }
    p->head = t->next;
    if (p->head == NULL) p->tail = NULL;
    pthread_mutex_unlock(&p->mu);
    lua_pushvalue(L, 1);
    lua_pushinteger(L, t->arg);
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) die(lua_tostring(L, -1));
    t->result = lua_tointeger(L, -1);
    lua_settop(L, 1);
    atomic_store_explicit(&t->done, 1, memory_order_release);
    pthread_mutex_lock(&p->mu);
    if (p->owner_waits) pthread_cond_broadcast(&p->finished);
    pthread_mutex_unlock(&p->mu);
  }
  lua_close(L);
  return NULL;
}

/* The floor checks nothing it does not have to: the script is its own, so
** self is taken as a pool and a future as a future (a real pool must check
** both on every call), and the futures' metatable is an upvalue, not a
** registry lookup. */
static int pool_submit(lua_State *L) {
  pool *p = *(pool **)lua_touserdata(L, 1);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_Integer arg = luaL_checkinteger(L, 3);
  task **u = lua_newuserdatauv(L, sizeof *u, 0);
  *u = NULL;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_setmetatable(L, -2);
  task *t = malloc(sizeof *t);
  if (t == NULL) return luaL_error(L, "not enough memory");
  t->next = NULL;
  t->arg = arg;
  t->result = 0;
  atomic_init(&t->done, 0);
  *u = t;
  pthread_mutex_lock(&p->mu);
  if (p->tail)
    p->tail->next = t;
  else
    p->head = t;
  p->tail = t;
  atomic_fetch_add_explicit(&p->qseq, 1, memory_order_release);
  int wake = p->idle > 0;
  pthread_mutex_unlock(&p->mu);
  if (wake) pthread_cond_signal(&p->work);
  return 1;
}

/* The owner's wait: the pool in the future's uservalue would cost a lookup
** per call, so the one pool of the script is a static. */
static pool *the_pool;

static int future_result(lua_State *L) {
  task *t = *(task **)lua_touserdata(L, 1);
  if (!atomic_load_explicit(&t->done, memory_order_acquire)) spin_while(&t->done, 0);
  if (!atomic_load_explicit(&t->done, memory_order_acquire)) {
    pool *p = the_pool;
    pthread_mutex_lock(&p->mu);
    p->owner_waits = 1;
    while (!atomic_load_explicit(&t->done, memory_order_acquire))
      pthread_cond_wait(&p->finished, &p->mu);
    p->owner_waits = 0;
    pthread_mutex_unlock(&p->mu);
  }
  lua_pushinteger(L, t->result);
  return 1;
}

static int future_gc(lua_State *L) {
  task **u = lua_touserdata(L, 1);
  /* (the script takes every result before it closes the pool: a task is
  ** done by the time its future is collected) */
  free(*u);
  *u = NULL;
  return 0;
}

static int pool_close(lua_State *L) {
  pool **u = luaL_checkudata(L, 1, "floor.pool");
  pool *p = *u;
  if (p == NULL) return 0;
  pthread_mutex_lock(&p->mu);
  p->closing = 1;
  pthread_cond_broadcast(&p->work);
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nthreads; i++)
    pthread_join(p->threads[i], NULL);
  free(p->threads);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->work);
  pthread_cond_destroy(&p->finished);
  free(p);
  *u = NULL;
  the_pool = NULL;
  return 0;
}

static int pool_new(lua_State *L) {
  int n = (int)luaL_checkinteger(L, 1);
  pool **u = lua_newuserdatauv(L, sizeof *u, 0);
  *u = NULL;
  luaL_setmetatable(L, "floor.pool");
  pool *p = calloc(1, sizeof *p);
  if (p == NULL || (p->threads = calloc((size_t)n, sizeof *p->threads)) == NULL)
    die("not enough memory");
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->work, NULL);
  pthread_cond_init(&p->finished, NULL);
  for (int i = 0; i < n; i++) {
    if (pthread_create(&p->threads[i], NULL, worker, p) != 0) die("cannot start a thread");
    p->nthreads++;
  }
  *u = the_pool = p;
  return 1;
}

static const char SCRIPT[] = "local new, n, w = ...\n"
                             "local pool <close> = new(w)\n"
                             "local function noop(x) return x end\n"
                             "local fs = {}\n"
                             "for i = 1, n do fs[i] = pool:submit(noop, i) end\n"
                             "for i = 1, n do assert(fs[i]:result() == i) end\n";

int main(int argc, char **argv) {
  long n = argc > 1 ? strtol(argv[1], NULL, 10) : 0, w = argc > 2 ? strtol(argv[2], NULL, 10) : 2,
       rounds = argc > 3 ? strtol(argv[3], NULL, 10) : 1;
  if (argc < 2 || argc > 4 || n < 1 || n > 100000000 || w < 1 || w > 256 || rounds < 1 ||
      rounds > 1000) {
    fprintf(
        stderr,
        "usage: task_floor N [W [R]]   (N in [1, 1e8] tasks, W in [1, 256] threads, R in [1, 1000] "
        "rounds)\n");
    return 2;
  }
  lua_State *L = luaL_newstate();
  if (L == NULL) die("cannot make a state");
  luaL_openlibs(L);
  luaL_newmetatable(L, "floor.future"); /* 1 */
  lua_newtable(L);
  lua_pushcfunction(L, future_result);
  lua_setfield(L, -2, "result");
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, future_gc);
  lua_setfield(L, -2, "__gc");
  luaL_newmetatable(L, "floor.pool"); /* 2 */
  lua_newtable(L);
  lua_pushvalue(L, 1);
  lua_pushcclosure(L, pool_submit, 1);
  lua_setfield(L, -2, "submit");
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, pool_close);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, pool_close);
  lua_setfield(L, -2, "__gc");
  lua_settop(L, 0);
  for (long r = 0; r < rounds; r++) {
    double t0 = now();
    if (luaL_loadstring(L, SCRIPT) != LUA_OK) die(lua_tostring(L, -1));
    lua_pushcfunction(L, pool_new);
    lua_pushinteger(L, n);
    lua_pushinteger(L, w);
    if (lua_pcall(L, 3, 0, 0) != LUA_OK) die(lua_tostring(L, -1));
    lua_gc(L, LUA_GCCOLLECT); /* the futures' collection, inside the time as luapool's is */
    double s = now() - t0;
    printf("task_floor: %ld tasks %ld threads in %.4f s (%.3f us/task)\n", n, w, s,
           s * 1e6 / (double)n);
  }
  lua_close(L);
  return 0;
}
