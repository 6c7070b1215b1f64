/*
** luapool.int128: the exact integer type (see int128.h), its arithmetic
** metamethods, and its text form.
*/
#include <math.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "codec/int128.h"

/* 2^127 as a double: the int128 range for floats (exact in binary). */
#define TWO_127 170141183460469231731687303715884105728.0

typedef unsigned __int128 lp_uint128;

#define INT128_MAX_ ((lp_int128)(((lp_uint128)1 << 127) - 1))
#define INT128_MIN_ (-INT128_MAX_ - 1)

size_t luapool__int128_format(lp_int128 v, char *buf) {
  char tmp[40];
  size_t n = 0, len = 0;
  /* Work on the magnitude as unsigned: -INT128_MIN does not fit signed. */
  lp_uint128 m = v < 0 ? -(lp_uint128)v : (lp_uint128)v;
  do {
    tmp[n++] = (char)('0' + (int)(m % 10));
    m /= 10;
  } while (m != 0);
  if (v < 0) buf[len++] = '-';
  while (n > 0)
    buf[len++] = tmp[--n];
  buf[len] = '\0';
  return len;
}

/* Pushes the metatable, creating it on first use in this Lua state so that
** int128 values pushed by a kernel always get their methods, even in a state
** where luapool__int128_open was never called. */
static void push_mt(lua_State *L);

void luapool__int128_push(lua_State *L, lp_int128 v) {
  /* Lua only guarantees 8-byte alignment for userdata blocks: memcpy. */
  void *p = lua_newuserdatauv(L, sizeof v, 0);
  memcpy(p, &v, sizeof v);
  push_mt(L);
  lua_setmetatable(L, -2);
}

int luapool__int128_test(lua_State *L, int idx, lp_int128 *v) {
  const void *p = luaL_testudata(L, idx, LUAPOOL_INT128_MT);
  if (p == NULL) return 0;
  memcpy(v, p, sizeof *v);
  return 1;
}

static lp_int128 check_int128(lua_State *L, int idx) {
  lp_int128 v;
  memcpy(&v, luaL_checkudata(L, idx, LUAPOOL_INT128_MT), sizeof v);
  return v;
}

static int push_string(lua_State *L, lp_int128 v) {
  char buf[48];
  size_t len = luapool__int128_format(v, buf);
  lua_pushlstring(L, buf, len);
  return 1;
}

/* Whitespace as Lua's lua_stringtonumber accepts it (C locale isspace). */
static int is_space(char ch) {
  return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\v' || ch == '\f' || ch == '\r';
}

/* Parses [spaces][+-]digits[spaces]; returns 0 ok, 1 malformed, 2 out of
** range. */
static int parse_decimal(const char *s, size_t len, lp_int128 *out) {
  const char *e = s + len;
  int neg = 0, digits = 0;
  lp_uint128 m = 0;
  /* 2^127 is reachable only as a negative number (INT128_MIN). */
  lp_uint128 limit;
  while (s < e && is_space(*s))
    s++;
  if (s < e && (*s == '+' || *s == '-')) neg = *s++ == '-';
  limit = neg ? (lp_uint128)1 << 127 : ((lp_uint128)1 << 127) - 1;
  for (; s < e && *s >= '0' && *s <= '9'; s++, digits++) {
    unsigned d = (unsigned)(*s - '0');
    if (m > (limit - d) / 10) {
      /* Keep scanning: a malformed tail must still say "invalid". */
      for (; s < e && *s >= '0' && *s <= '9'; s++) {
      }
      while (s < e && is_space(*s))
        s++;
      return s == e ? 2 : 1;
    }
    m = m * 10 + d;
  }
  while (s < e && is_space(*s))
    s++;
  if (digits == 0 || s != e) return 1;
  *out = neg ? (lp_int128)(-m) : (lp_int128)m;
  return 0;
}

/* Exact integer value of a float, if it has one within int128 range. */
static int float_to_int128(lua_Number d, lp_int128 *out) {
  if (!(isfinite(d) && floor(d) == d && d >= -TWO_127 && d < TWO_127)) return 0;
  *out = (lp_int128)d;
  return 1;
}

/* luapool.int128(v) */
static int int128_new(lua_State *L) {
  lp_int128 v;
  switch (lua_type(L, 1)) {
    case LUA_TNUMBER:
      if (lua_isinteger(L, 1)) {
        v = lua_tointeger(L, 1);
      } else if (!float_to_int128(lua_tonumber(L, 1), &v)) {
        return luaL_error(L, "bad argument #1 to 'int128' (%s)",
                          "number has no integer representation");
      }
      break;
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, 1, &len);
      switch (parse_decimal(s, len, &v)) {
        case 0: break;
        case 2:
          return luaL_error(L,
                            "bad argument #1 to 'int128' (integer string out of "
                            "int128 range '%s')",
                            s);
        default:
          return luaL_error(L, "bad argument #1 to 'int128' (invalid integer string '%s')", s);
      }
      break;
    }
    default:
      if (!luapool__int128_test(L, 1, &v))
        return luaL_error(L, "bad argument #1 to 'int128' (integer expected, got %s)",
                          lua_isnone(L, 1) ? "no value" : luaL_typename(L, 1));
      break;
  }
  luapool__int128_push(L, v);
  return 1;
}

/* What an arithmetic operand turned out to be. */
enum { OPND_BAD, OPND_INT, OPND_FLOAT };

/* Reads an operand of a metamethod: an int128, a Lua integer, a float, or
** a string that converts to a number (Lua coerces strings in arithmetic). */
static int get_operand(lua_State *L, int idx, lp_int128 *iv, lua_Number *fv) {
  switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx)) {
        *iv = lua_tointeger(L, idx);
        *fv = (lua_Number)*iv;
        return OPND_INT;
      }
      *fv = lua_tonumber(L, idx);
      return OPND_FLOAT;
    case LUA_TSTRING: {
      int kind = OPND_BAD;
      size_t len;
      const char *s = lua_tolstring(L, idx, &len);
      /* lua_stringtonumber pushes the number on success and returns the
    ** size it consumed: anything short of len + 1 means an embedded zero. */
      size_t used = lua_stringtonumber(L, s);
      if (used != 0) {
        if (used == len + 1) kind = get_operand(L, -1, iv, fv);
        lua_pop(L, 1);
      }
      return kind;
    }
    default:
      if (luapool__int128_test(L, idx, iv)) {
        *fv = (lua_Number)*iv;
        return OPND_INT;
      }
      return OPND_BAD;
  }
}

/* Reads both operands; when either is a float, pushes the result of the
** float operation (Lua semantics: an integer op a float is a float) and
** returns 1.  Otherwise fills *a, *b and returns 0. */
static int arith_operands(lua_State *L, int op, lp_int128 *a, lp_int128 *b) {
  lua_Number fa, fb;
  int ka = get_operand(L, 1, a, &fa);
  int kb = get_operand(L, 2, b, &fb);
  if (ka == OPND_BAD || kb == OPND_BAD) {
    int bad = ka == OPND_BAD ? 1 : 2;
    return luaL_error(L, "attempt to perform arithmetic on a %s value", luaL_typename(L, bad));
  }
  if (ka == OPND_FLOAT || kb == OPND_FLOAT || op == LUA_OPDIV || op == LUA_OPPOW) {
    lua_pushnumber(L, fa);
    lua_pushnumber(L, fb);
    lua_arith(L, op);
    return 1;
  }
  return 0;
}

static int overflow_error(lua_State *L) { return luaL_error(L, "int128 overflow"); }

static int int128_add(lua_State *L) {
  lp_int128 a, b, r;
  if (arith_operands(L, LUA_OPADD, &a, &b)) return 1;
  if (__builtin_add_overflow(a, b, &r)) return overflow_error(L);
  luapool__int128_push(L, r);
  return 1;
}

static int int128_sub(lua_State *L) {
  lp_int128 a, b, r;
  if (arith_operands(L, LUA_OPSUB, &a, &b)) return 1;
  if (__builtin_sub_overflow(a, b, &r)) return overflow_error(L);
  luapool__int128_push(L, r);
  return 1;
}

static int int128_mul(lua_State *L) {
  lp_int128 a, b, r;
  if (arith_operands(L, LUA_OPMUL, &a, &b)) return 1;
  if (__builtin_mul_overflow(a, b, &r)) return overflow_error(L);
  luapool__int128_push(L, r);
  return 1;
}

/* Floored division, like Lua's //: the quotient rounds toward minus
** infinity, so C's truncated quotient is one too high when the operands
** have opposite signs and the division is inexact. */
static int int128_idiv(lua_State *L) {
  lp_int128 a, b, q;
  if (arith_operands(L, LUA_OPIDIV, &a, &b)) return 1;
  if (b == 0) return luaL_error(L, "attempt to perform 'n//0'");
  if (b == -1) { /* also avoids the trapping INT128_MIN / -1 */
    if (a == INT128_MIN_) return overflow_error(L);
    q = -a;
  } else {
    q = a / b;
    if (a % b != 0 && (a < 0) != (b < 0)) q -= 1;
  }
  luapool__int128_push(L, q);
  return 1;
}

/* Floored modulo, like Lua's %: the result takes the sign of the divisor. */
static int int128_mod(lua_State *L) {
  lp_int128 a, b, m;
  if (arith_operands(L, LUA_OPMOD, &a, &b)) return 1;
  if (b == 0) return luaL_error(L, "attempt to perform 'n%%0'");
  if (b == -1) { /* x % -1 is 0, and INT128_MIN % -1 would trap */
    m = 0;
  } else {
    m = a % b;
    if (m != 0 && (m < 0) != (b < 0)) m += b;
  }
  luapool__int128_push(L, m);
  return 1;
}

/* / and ^ always give floats in Lua; arith_operands does them as such. */
static int int128_div(lua_State *L) {
  lp_int128 a, b;
  arith_operands(L, LUA_OPDIV, &a, &b);
  return 1;
}

static int int128_pow(lua_State *L) {
  lp_int128 a, b;
  arith_operands(L, LUA_OPPOW, &a, &b);
  return 1;
}

static int int128_unm(lua_State *L) {
  lp_int128 a = check_int128(L, 1), r;
  if (__builtin_sub_overflow((lp_int128)0, a, &r)) return overflow_error(L);
  luapool__int128_push(L, r);
  return 1;
}

/* a < d (le == 0) or a <= d (le == 1) for an int128 a and a float d,
** exactly: a < d iff a < ceil(d) iff a <= floor(d) for non-integral d. */
static int int_lt_float(lp_int128 a, lua_Number d, int le) {
  lua_Number f;
  if (isnan(d)) return 0;
  if (d >= 0x1p127) return 1;
  if (d < -0x1p127) return 0;
  f = floor(d); /* within [-2^127, 2^127): converts exactly */
  if (f == d) return le ? a <= (lp_int128)f : a < (lp_int128)f;
  return a <= (lp_int128)f;
}

/* d < a (le == 0) or d <= a (le == 1): d < a iff floor(d) < a, and
** d <= a iff ceil(d) <= a. */
static int float_lt_int(lua_Number d, lp_int128 a, int le) {
  if (isnan(d)) return 0;
  if (d >= 0x1p127) return 0;
  if (d < -0x1p127) return 1;
  if (le) {
    lua_Number c = ceil(d);
    return c >= 0x1p127 ? 0 : (lp_int128)c <= a;
  }
  return (lp_int128)floor(d) < a;
}

/* Type name as Lua's own comparison errors show it (__name if any). */
static const char *obj_typename(lua_State *L, int idx) {
  if (luaL_getmetafield(L, idx, "__name") == LUA_TSTRING)
    return lua_tostring(L, -1); /* left on the stack: we raise right after */
  return luaL_typename(L, idx);
}

static int compare(lua_State *L, int le) {
  lp_int128 a, b;
  lua_Number fa, fb;
  int ka, kb, r;
  /* Strings never compare with numbers in Lua, so no coercion here. */
  ka = lua_type(L, 1) == LUA_TSTRING ? OPND_BAD : get_operand(L, 1, &a, &fa);
  kb = lua_type(L, 2) == LUA_TSTRING ? OPND_BAD : get_operand(L, 2, &b, &fb);
  if (ka == OPND_BAD || kb == OPND_BAD) {
    const char *t1 = obj_typename(L, 1);
    const char *t2 = obj_typename(L, 2);
    return luaL_error(L, "attempt to compare %s with %s", t1, t2);
  }
  if (ka == OPND_INT && kb == OPND_INT)
    r = le ? a <= b : a < b;
  else if (ka == OPND_INT)
    r = int_lt_float(a, fb, le);
  else if (kb == OPND_INT)
    r = float_lt_int(fa, b, le);
  else /* unreachable: one side is our userdata */
    r = le ? fa <= fb : fa < fb;
  lua_pushboolean(L, r);
  return 1;
}

static int int128_lt(lua_State *L) { return compare(L, 0); }

static int int128_le(lua_State *L) { return compare(L, 1); }

/* Lua only calls __eq when both operands are full userdata, so int128 ==
** Lua number is always false (a language rule we cannot change). */
static int int128_eq(lua_State *L) {
  lp_int128 a, b;
  lua_pushboolean(L, luapool__int128_test(L, 1, &a) && luapool__int128_test(L, 2, &b) && a == b);
  return 1;
}

static int int128_concat(lua_State *L) {
  for (int i = 1; i <= 2; i++) {
    lp_int128 v;
    if (luapool__int128_test(L, i, &v)) {
      push_string(L, v);
    } else if (lua_type(L, i) == LUA_TSTRING || lua_type(L, i) == LUA_TNUMBER) {
      lua_pushvalue(L, i); /* lua_concat formats numbers as Lua does */
    } else {
      return luaL_error(L, "attempt to concatenate a %s value", luaL_typename(L, i));
    }
  }
  lua_concat(L, 2);
  return 1;
}

static int int128_tostring(lua_State *L) { return push_string(L, check_int128(L, 1)); }

/* v:tointeger(): a Lua integer, or fail (nil) outside the int64 range. */
static int int128_tointeger(lua_State *L) {
  lp_int128 v = check_int128(L, 1);
  if (v >= LUA_MININTEGER && v <= LUA_MAXINTEGER)
    lua_pushinteger(L, (lua_Integer)v);
  else
    luaL_pushfail(L);
  return 1;
}

static int int128_tonumber(lua_State *L) {
  lua_pushnumber(L, (lua_Number)check_int128(L, 1));
  return 1;
}

static const luaL_Reg int128_meta[] = {
    {"__tostring", int128_tostring},
    {"__eq", int128_eq},
    {"__lt", int128_lt},
    {"__le", int128_le},
    {"__add", int128_add},
    {"__sub", int128_sub},
    {"__mul", int128_mul},
    {"__div", int128_div},
    {"__pow", int128_pow},
    {"__unm", int128_unm},
    {"__idiv", int128_idiv},
    {"__mod", int128_mod},
    {"__concat", int128_concat},
    {NULL, NULL},
};

static const luaL_Reg int128_methods[] = {
    {"tointeger", int128_tointeger},
    {"tonumber", int128_tonumber},
    {"tostring", int128_tostring},
    {NULL, NULL},
};

static void push_mt(lua_State *L) {
  if (luaL_newmetatable(L, LUAPOOL_INT128_MT)) { /* first use: fill it */
    luaL_setfuncs(L, int128_meta, 0);
    luaL_newlib(L, int128_methods);
    lua_setfield(L, -2, "__index");
  }
}

void luapool__int128_open(lua_State *L) {
  push_mt(L);
  lua_pop(L, 1);
  lua_pushcfunction(L, int128_new);
}
