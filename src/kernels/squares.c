/*
** sum_squares, the CPU benchmark kernel (its results come back as
** luapool.int128, int128.c).
**
** Decision: sum_squares always answers a luapool.int128, whatever the size
** of the sum, so that adding results together (in Lua or in a reducer) is
** exact and never wraps around the way lua_Integer arithmetic would.
*/
#include <math.h>

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "kernels/kernel.h"
#include "kernels/kernels_internal.h"

/* 2^127 as a double: the int128 range for floats (exact in binary). */
#define TWO_127 170141183460469231731687303715884105728.0

typedef unsigned __int128 lp_uint128;

/* {====== sum_squares */

/*
** Largest n accepted.  S(n) = sum_{0<=i<n} i^2 = (n-1)n(2n-1)/6 grows like
** n^3/3, so the bound is near cbrt(3 * 2^127) ~ 7.99e12; the exact value,
** found by bisection on S(n) <= 2^127-1 with Python integers, is:
**   S(7991780883561) = 170141183460461313492259401898909956060 <= 2^127-1
**   S(7991780883562) = 170141183460525182053950252936749996781 >  2^127-1
** (2^127-1 = 170141183460469231731687303715884105727; the test suite
** checks both sides.)
*/
#define SUM_SQUARES_MAXN INT64_C(7991780883561)

/*
** The loop runs in three regions, each with the cheapest arithmetic that is
** still exact there:
**   i < 2^24          i*i < 2^48, so 2^16 terms sum below 2^64: one uint64
**                     accumulator per block (vectorizes well).
**   i < 2^32 - 2^16   i*i < 2^64: split each square into its 32-bit halves
**                     and sum them in two uint64s (2^16 terms of < 2^32 each
**                     cannot overflow); keeping the index a uint32 lets the
**                     multiply stay a 32x32->64 one.
**   beyond            plain unsigned __int128 (only reachable by runs that
**                     take hours, so its speed does not matter).
** Every block ends with a poll of the interrupt flag, i.e. every 2^16
** iterations in the hot regions (~10 us), which costs nothing measurable.
*/
#define BLOCK_SMALL (UINT32_C(1) << 16)
#define SMALL_END   (UINT64_C(1) << 24)
#define MID_END     ((UINT64_C(1) << 32) - BLOCK_SMALL) /* hi stays < 2^32 */
#define BLOCK_BIG   (UINT64_C(1) << 20)

/* The same loop bodies are compiled twice on x86-64: once for the baseline
** ISA and once for AVX2 (picked at run time), because the baseline SSE2
** build cannot do 64-bit lane multiplies well and AVX2 is ~2.7x faster.
** O3 is asked for on the AVX2 copies only: gcc's -O2 cost model does not
** vectorize these loops, and O3's SSE2 vectorization is slower than the
** scalar loop (measured), so the baseline copies stay at -O2. */
static uint64_t block_small(uint32_t lo, uint32_t hi) {
  uint64_t s = 0;
  for (uint32_t i = lo; i < hi; i++)
    s += (uint64_t)i * i;
  return s;
}

static lp_uint128 block_mid(uint32_t lo, uint32_t hi) {
  uint64_t low = 0, high = 0;
  for (uint32_t i = lo; i < hi; i++) {
    uint64_t q = (uint64_t)i * i;
    low += (uint32_t)q;
    high += q >> 32;
  }
  return ((lp_uint128)high << 32) + low;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HAVE_AVX2_COPY 1
__attribute__((target("avx2"), optimize("O3"))) static uint64_t block_small_avx2(uint32_t lo,
                                                                                 uint32_t hi) {
  uint64_t s = 0;
  for (uint32_t i = lo; i < hi; i++)
    s += (uint64_t)i * i;
  return s;
}

__attribute__((target("avx2"), optimize("O3"))) static lp_uint128 block_mid_avx2(uint32_t lo,
                                                                                 uint32_t hi) {
  uint64_t low = 0, high = 0;
  for (uint32_t i = lo; i < hi; i++) {
    uint64_t q = (uint64_t)i * i;
    low += (uint32_t)q;
    high += q >> 32;
  }
  return ((lp_uint128)high << 32) + low;
}
#endif

static lp_uint128 block_big(uint64_t lo, uint64_t hi) {
  lp_uint128 s = 0;
  for (uint64_t i = lo; i < hi; i++)
    s += (lp_uint128)i * i;
  return s;
}

static int interrupted(const lp_interrupt *flag) { return luapool__interrupted(flag); }

/* Sum of i*i for lo <= i < hi into *out; -1 when interrupted.  The caller
** guarantees the result fits (hi <= SUM_SQUARES_MAXN). */
static int sum_range(const lp_interrupt *flag, uint64_t lo, uint64_t hi, lp_uint128 *out) {
  lp_uint128 total = 0;
  uint64_t i = lo;
#ifdef HAVE_AVX2_COPY
  /* __cpu_model is filled in by libgcc's constructor before main: reading
  ** it here is race-free. */
  int avx2 = __builtin_cpu_supports("avx2");
#endif
  while (i < hi) {
    uint64_t end;
    if (interrupted(flag)) return -1;
    if (i < SMALL_END) {
      end = i + BLOCK_SMALL;
      if (end > SMALL_END) end = SMALL_END;
      if (end > hi) end = hi;
#ifdef HAVE_AVX2_COPY
      if (avx2)
        total += block_small_avx2((uint32_t)i, (uint32_t)end);
      else
#endif
        total += block_small((uint32_t)i, (uint32_t)end);
    } else if (i < MID_END) {
      end = i + BLOCK_SMALL;
      if (end > MID_END) end = MID_END;
      if (end > hi) end = hi;
#ifdef HAVE_AVX2_COPY
      if (avx2)
        total += block_mid_avx2((uint32_t)i, (uint32_t)end);
      else
#endif
        total += block_mid((uint32_t)i, (uint32_t)end);
    } else {
      end = hi - i > BLOCK_BIG ? i + BLOCK_BIG : hi;
      total += block_big(i, end);
    }
    i = end;
  }
  *out = total;
  return 0;
}

int luapool__sum_squares_run(lp_kcall *c) {
  static const char kname[] = "sum_squares";
  const lp_value *a = c->nargs >= 1 ? &c->args[0] : NULL;
  lp_int128 n;
  lp_uint128 sum;
  char got[64];

  if (a == NULL) return luapool__kargerr(c, kname, 1, "number");
  switch (a->type) {
    case LP_INT: n = a->u.i; break;
    case LP_INT128: n = a->u.big; break;
    case LP_NUM:
      /* Integral floats are taken at their value, as lua_tointeger would. */
      if (!(isfinite(a->u.n) && floor(a->u.n) == a->u.n && a->u.n >= -TWO_127 && a->u.n < TWO_127))
        return luapool__kargmsg(c, kname, 1, "number has no integer representation");
      n = (lp_int128)a->u.n;
      break;
    default: return luapool__kargerr(c, kname, 1, "number");
  }
  if (n < 0)
    return luapool__kargmsg(c, kname, 1, "non-negative integer expected, got %s",
                            luapool__knumfmt(a, got, sizeof got));
  if (n > SUM_SQUARES_MAXN)
    return luapool__kargmsg(c, kname, 1, "n too large: the sum would exceed 2^127-1");

  if (sum_range(c->interrupt, 0, (uint64_t)n, &sum) != 0) return luapool__kerr(c, "interrupted");
  c->out[0].type = LP_INT128;
  c->out[0].tname = LUAPOOL_INT128_MT;
  c->out[0].u.big = (lp_int128)sum;
  c->nout = 1;
  return 0;
}

/* }====== */
