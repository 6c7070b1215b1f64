/*
** The table of native kernels and the glue shared by all of them: turning
** Lua arguments into lp_values, running a kernel from Lua, and formatting
** kernel error messages.
*/
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "kernels/kernel.h"
#include "kernels/httploop.h" /* luapool__http_thread_loop */
#include "kernels/kernels_internal.h"
#include "base/ctrlc.h"
#include "codec/int128.h"
#include "worker/wstate.h"

/* Positions in luapool__kernels, so each Lua face finds its own entry
** without a search. */
enum { K_FETCH_LENGTH, K_SUM_SQUARES };

static int l_fetch_length(lua_State *L);
static int l_sum_squares(lua_State *L);

const lp_kernel luapool__kernels[] = {
    [K_FETCH_LENGTH] = {"fetch_length", l_fetch_length, luapool__fetch_length_run},
    [K_SUM_SQUARES] = {"sum_squares", l_sum_squares, luapool__sum_squares_run},
    {NULL, NULL, NULL},
};

static int l_fetch_length(lua_State *L) {
  /* In an iopool task's own coroutine the request yields to its loop. */
  if (luapool__io_task(L, "luapool.kernels.fetch_length") && luapool__http_thread_loop())
    return luapool__http_fetch_length_yield(L);
  return luapool__kernel_call_lua(L, &luapool__kernels[K_FETCH_LENGTH]);
}

static int l_sum_squares(lua_State *L) {
  return luapool__kernel_call_lua(L, &luapool__kernels[K_SUM_SQUARES]);
}

int luapool__kernel_index(lua_CFunction f) {
  for (int i = 0; luapool__kernels[i].name != NULL; i++)
    if (luapool__kernels[i].lua_fn == f) return i;
  return -1;
}

/* Raises msg as is: kernel messages are the same whether the kernel ran
** here or in a worker, so no "chunk:line:" prefix is added. */
static int raise_plain(lua_State *L, const char *msg) {
  lua_pushstring(L, msg);
  return lua_error(L);
}

/* Type name for "got X" messages, like luaL_typeerror: a userdata's __name
** when it has one.  The __name string is left on the stack so the pointer
** stays valid for the whole kernel call. */
static const char *arg_tname(lua_State *L, int idx) {
  int t;
  switch (lua_type(L, idx)) {
    case LUA_TUSERDATA:
      t = luaL_getmetafield(L, idx, "__name");
      if (t == LUA_TSTRING) return lua_tostring(L, -1);
      if (t != LUA_TNIL) lua_pop(L, 1); /* a non-string __name: ignore it */
      break;
    case LUA_TLIGHTUSERDATA: return "light userdata";
    default: break;
  }
  return luaL_typename(L, idx);
}

int luapool__kernel_call_lua(lua_State *L, const lp_kernel *k) {
  int nargs = lua_gettop(L);
  lp_value args[LP_KERNEL_MAXARGS];
  lp_kcall c;

  if (nargs > LP_KERNEL_MAXARGS) {
    lua_pushfstring(L, "too many arguments to '%s'", k->name);
    return lua_error(L);
  }
  /* Room for one __name string per argument, the results, and the few
  ** temporaries of luaL_testudata/luaL_getmetafield. */
  luaL_checkstack(L, LP_KERNEL_MAXARGS + LP_KERNEL_MAXOUT + 4, "kernel call");

  for (int i = 0; i < nargs; i++) {
    int idx = i + 1;
    lp_value *v = &args[i];
    memset(v, 0, sizeof *v);
    v->tname = luaL_typename(L, idx);
    switch (lua_type(L, idx)) {
      case LUA_TNIL: v->type = LP_NIL; break;
      case LUA_TBOOLEAN:
        v->type = LP_BOOL;
        v->u.b = lua_toboolean(L, idx);
        break;
      case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
          v->type = LP_INT;
          v->u.i = lua_tointeger(L, idx);
        } else {
          v->type = LP_NUM;
          v->u.n = lua_tonumber(L, idx);
        }
        break;
      case LUA_TSTRING:
        /* Borrowed: the string stays on the stack until the kernel returns. */
        v->type = LP_STR;
        v->u.s.p = lua_tolstring(L, idx, &v->u.s.len);
        break;
      default:
        if (luapool__int128_test(L, idx, &v->u.big)) {
          v->type = LP_INT128;
          v->tname = LUAPOOL_INT128_MT;
        } else {
          v->type = LP_OTHER;
          v->tname = arg_tname(L, idx);
        }
        break;
    }
  }

  c.args = args;
  c.nargs = nargs;
  c.nout = 0;
  /* Inside a worker's task the worker's stop and deadline apply. */
  c.interrupt = luapool__lua_interrupt(L, &c.deadline);
  c.err[0] = '\0';
  if (k->run(&c) != 0) {
    /* Stopped by Ctrl-C in the host's main state: the script's error. */
    if (c.interrupt == NULL) luapool__check_signal(L);
    return raise_plain(L, c.err);
  }

  for (int i = 0; i < c.nout; i++) {
    const lp_value *o = &c.out[i];
    switch (o->type) {
      case LP_BOOL: lua_pushboolean(L, o->u.b); break;
      case LP_INT: lua_pushinteger(L, o->u.i); break;
      case LP_NUM: lua_pushnumber(L, o->u.n); break;
      case LP_INT128: luapool__int128_push(L, o->u.big); break;
      default:
        /* LP_NIL, and the LP_STR/LP_OTHER that kernels must not return. */
        lua_pushnil(L);
        break;
    }
  }
  return c.nout;
}

int luapool__kerr(lp_kcall *c, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
  return -1;
}

int luapool__kargmsg(lp_kcall *c, const char *kname, int arg, const char *fmt, ...) {
  char detail[LP_KERNEL_ERRSZ];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  return luapool__kerr(c, "bad argument #%d to '%s' (%s)", arg, kname, detail);
}

/* expected is a type name ("number"), as for luaL_typeerror. */
int luapool__kargerr(lp_kcall *c, const char *kname, int arg, const char *expected) {
  const char *got = "no value";
  if (arg >= 1 && arg <= c->nargs) got = c->args[arg - 1].tname ? c->args[arg - 1].tname : "?";
  return luapool__kargmsg(c, kname, arg, "%s expected, got %s", expected, got);
}

const char *luapool__knumfmt(const lp_value *v, char *buf, size_t size) {
  switch (v->type) {
    case LP_INT: snprintf(buf, size, LUA_INTEGER_FMT, (LUAI_UACINT)v->u.i); break;
    case LP_NUM: {
      snprintf(buf, size, LUA_NUMBER_FMT, (LUAI_UACNUMBER)v->u.n);
      /* Lua shows 3.0 as "3.0" so floats never pass for integers. */
      size_t len = strlen(buf);
      if (buf[strspn(buf, "-0123456789")] == '\0' && len + 3 <= size) memcpy(buf + len, ".0", 3);
      break;
    }
    case LP_INT128:
      if (size >= 41) {
        luapool__int128_format(v->u.big, buf);
      } else {
        char tmp[48];
        size_t n = luapool__int128_format(v->u.big, tmp);
        if (size == 0) break;
        if (n >= size) n = size - 1; /* truncate, like snprintf */
        memcpy(buf, tmp, n);
        buf[n] = '\0';
      }
      break;
    default: snprintf(buf, size, "%s", v->tname ? v->tname : "?"); break;
  }
  return buf;
}
