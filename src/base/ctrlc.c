/*
** Ctrl-C: the host's pending signal and its delivery to the script (see
** ctrlc.h).
*/
#include <pthread.h>
#include <stdatomic.h>

#include <lua.h>

#include "base/ctrlc.h"

atomic_int luapool__signal;
atomic_int luapool__signals_handled;
atomic_int luapool__ending_on_signal;
pthread_t luapool__signal_thread;

int luapool__signal_for_me(void) {
  return atomic_load(&luapool__signal) != 0 && atomic_load(&luapool__signals_handled) &&
         pthread_equal(pthread_self(), luapool__signal_thread);
}

/* Set once by the module's first open (under its pthread_once), read by
** whichever thread consumes a signal. */
static _Atomic(void (*)(lua_State *, int)) deliver_hook;

void luapool__set_signal_delivery(void (*deliver)(lua_State *L, int sig)) {
  atomic_store(&deliver_hook, deliver);
}

void luapool__check_signal(lua_State *L) {
  if (!luapool__signal_for_me()) return; /* a worker's nested wait: not its signal */
  void (*deliver)(lua_State *, int) = atomic_load(&deliver_hook);
  if (deliver == NULL) return; /* no module opened yet: it stays pending */
  int sig = atomic_exchange(&luapool__signal, 0);
  if (sig == 0) return;
  deliver(L, sig); /* does not return */
}

void luapool__signal_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0); /* (the handler set it; once is enough) */
  luapool__check_signal(L);
}
