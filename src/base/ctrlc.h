/*
** Ctrl-C: the signal the host received (SIGINT, SIGTERM) on its way to the
** script's Lua state.  The host (main.c) sets it; waits anywhere below the
** bindings (a future's wait, a kernel's HTTP transfer) poll it and hand it
** to luapool__check_signal.  What delivery does (stopping every pool) is
** the upper layers' business: they register it as a hook.
*/
#ifndef LUAPOOL_CTRLC_H
#define LUAPOOL_CTRLC_H

#include <pthread.h>
#include <stdatomic.h>

#include <lua.h>

/* The signal the host received and has not yet delivered to the script as
** an error (0: none).  Set only by the host (main.c: its signal thread,
** or its handler), consumed by luapool__check_signal. */
extern atomic_int luapool__signal;
/* Non-zero when a handler is installed: owner waits then run in slices
** and notice the signal. */
extern atomic_int luapool__signals_handled;
/* The thread whose Lua state receives the signal (the host's script thread,
** set with signals_handled): only it consumes luapool__signal. */
extern pthread_t luapool__signal_thread;
int luapool__signal_for_me(void);
/* When a signal is pending for the calling thread: consumes it and calls
** the delivery hook, which stops the work of every pool (queued tasks
** cancelled, running ones stopped) and raises an error of kind
** "interrupted" (luapool.c's deliver_signal).  Returns when none is
** pending. */
void luapool__check_signal(lua_State *L);
/* Sets that hook (once, before any Lua state can see a signal: the module
** sets it at its first open, the host before it runs a script).  It must
** not return. */
void luapool__set_signal_delivery(void (*deliver)(lua_State *L, int sig));
/* The hook the host's handler sets on the main state (as lua.c does). */
void luapool__signal_hook(lua_State *L, lua_Debug *ar);
/* Set by the host when the script ended on an uncaught interruption: a
** closing pool then waits only briefly for a thread stuck in a C call. */
extern atomic_int luapool__ending_on_signal;

#endif
