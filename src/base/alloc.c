/*
** The test build's failing C allocations (alloc.h).
*/
#include "base/alloc.h"

#ifdef LUAPOOL_TEST_ALLOC
static _Thread_local long budget = -1; /* -1: no failure armed */
static _Thread_local int fail_once;
static _Thread_local long failed; /* since the last arming */

long luapool__test_fail_c_alloc(long n, int once) {
  long was = failed;
  budget = n < 0 ? -1 : n;
  fail_once = once;
  failed = 0;
  return was;
}

int luapool__test_alloc_fails(void) {
  if (budget < 0) return 0;
  if (budget > 0) {
    budget--;
    return 0;
  }
  if (fail_once) budget = -1; /* this one fails, the next succeed */
  failed++;
  return 1;
}
#else
typedef int lp_alloc_nothing; /* (a translation unit may not be empty) */
#endif
