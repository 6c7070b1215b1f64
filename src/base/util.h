/*
** Utilities every layer may use: the clock deadlines are measured on, the
** CPU count, a monotonic condition variable, installing a signal handler.
** No Lua, nothing of luapool above it (docs/architecture.md: layer 0).
*/
#ifndef LUAPOOL_UTIL_H
#define LUAPOOL_UTIL_H

#include <pthread.h>

#define LUAPOOL_VERSION "0.1.0"

/* luapool.now(): CLOCK_MONOTONIC in seconds, the clock of every deadline. */
double luapool__now(void);
/* CPUs this process may run on (its affinity mask), at least 1. */
int luapool__cpu_count(void);
/* A condition variable whose timed waits use CLOCK_MONOTONIC. */
int luapool__cond_init(pthread_cond_t *cv);
/* A mutex that spins a moment before it sleeps when another thread holds
** it (glibc's adaptive kind, where it exists). */
int luapool__mutex_init_spinning(pthread_mutex_t *mu);
/* Installs a handler for sig (SA_RESTART). */
void luapool__on_signal(int sig, void (*handler)(int));

#endif
