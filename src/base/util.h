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
/* A test knob's seconds: the environment variable `name` read as a number
** above 0 and below `max`; 0 when unset or anything else (a knob never
** refuses: it is for the specs, docs/luapool.1). */
double luapool__test_seconds(const char *name, double max);
/* Sleeps `seconds` (> 0), the whole of them, signals or not. */
void luapool__sleep_through(double seconds);
/* Installs a handler for sig (SA_RESTART). */
void luapool__on_signal(int sig, void (*handler)(int));

#endif
