/*
** The test build's failing C allocations (alloc.h).
*/
#include "base/alloc.h"

#ifdef LUAPOOL_TEST_ALLOC
static _Thread_local long budget = -1; /* -1: no failure armed */

void luapool__test_fail_c_alloc(long n) { budget = n < 0 ? -1 : n; }

int luapool__test_alloc_fails(void) {
  if (budget < 0) return 0;
  if (budget == 0) return 1;
  budget--;
  return 0;
}
#else
typedef int lp_alloc_nothing; /* (a translation unit may not be empty) */
#endif
