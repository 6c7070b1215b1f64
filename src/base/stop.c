/*
** The calling thread's task stop block (stop.h).
*/
#include "base/stop.h"

static _Thread_local const lp_interrupt *tl_intr;
static _Thread_local const double *tl_deadline;

void luapool__set_thread_stop(const lp_interrupt *i, const double *deadline) {
  tl_intr = i;
  tl_deadline = deadline;
}

const lp_interrupt *luapool__thread_interrupt(double *deadline) {
  *deadline = tl_deadline ? *tl_deadline : 0;
  return tl_intr;
}
