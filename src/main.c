/*
** The luapool host: a lua(1)-like command line with threadpool, processpool
** and luapool as globals.  main() only creates the state and runs pmain
** under lua_pcall; every chunk runs through docall, whose message handler
** adds a traceback and copes with non-string error values (as lua.c does).
**
** `luapool --worker NAME INDEX PPID` is the process-pool worker mode: it
** serves tasks on fd 3 and never reaches the Lua command line.
*/
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "luapool.h"

static const char *progname = "luapool";
static lua_State *globalL;
static volatile sig_atomic_t signals_seen;
static int exit_signal;        /* the signal received */
static int uncaught_interrupt; /* the script ended on it: exit 128 + it */

/* SIGINT/SIGTERM: the first is delivered to the script as an error of kind
** "interrupted" (by luapool__check_signal, from a wait or from the hook set
** here, as lua.c does); a second one ends the process at once, and the
** workers with it (their parent-death signal).  Only async-signal-safe
** work here: atomics, lua_sethook, _exit. */
static void on_signal(int sig) {
  if (signals_seen++ > 0) _exit(128 + sig);
  exit_signal = sig;
  atomic_store(&luapool__signal, sig);
  lua_sethook(globalL, luapool__signal_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

#ifdef LUAPOOL_TEST_ALLOC
/* {====== test build: an allocator that fails on demand
** __luapool_fail_alloc(n): the main state's allocations succeed n more
** times, then every one fails until __luapool_fail_alloc(-1).  Drives
** out-of-memory through codec, futures and submit (spec/oom/oom.lua). */
static long alloc_budget = -1;

static void *test_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  if (alloc_budget >= 0 && nsize > (ptr ? osize : 0)) { /* a growth */
    if (alloc_budget == 0) return NULL;
    alloc_budget--;
  }
  return realloc(ptr, nsize);
}

static int l_fail_alloc(lua_State *L) {
  alloc_budget = (long)luaL_checkinteger(L, 1);
  return 0;
}
/* }====== */
#endif

static void install_signal_handlers(void) {
  luapool__on_signal(SIGINT, on_signal);
  luapool__on_signal(SIGTERM, on_signal);
  luapool__signal_thread = pthread_self();
  atomic_store(&luapool__signals_handled, 1);
}

static void print_usage(FILE *out) {
  fprintf(out,
          "usage: %s [options] [script [args]]\n"
          "Available options are:\n"
          "  -e stat   execute string 'stat'\n"
          "  -l mod    require library 'mod' into global 'mod'\n"
          "  -l g=mod  require library 'mod' into global 'g'\n"
          "  -v        show version information\n"
          "  -h        show this help\n"
          "  --        stop handling options\n"
          "  -         stop handling options and execute stdin\n"
          "In scripts, threadpool, processpool and luapool are globals.\n",
          progname);
}

static void print_version(void) { printf("luapool %s (%s)\n", LUAPOOL_VERSION, LUA_RELEASE); }

static void l_message(const char *msg) {
  fprintf(stderr, "%s: %s\n", progname, msg);
  fflush(stderr);
}

static int report(lua_State *L, int status) {
  if (status != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    l_message(msg ? msg : "(error object is not a string)");
    lua_pop(L, 1);
  }
  return status;
}

/* Message handler: non-string errors go through __tostring when they have
** one (luapool error objects do), then a traceback is appended. */
static int msghandler(lua_State *L) {
  /* an interruption nobody caught: the exit status says which signal */
  if (lua_type(L, 1) == LUA_TTABLE && lua_getfield(L, 1, "kind") == LUA_TSTRING &&
      strcmp(lua_tostring(L, -1), "interrupted") == 0 && exit_signal)
    uncaught_interrupt = 1;
  lua_settop(L, 1);
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int docall(lua_State *L, int narg, int nres) {
  int base = lua_gettop(L) - narg;
  lua_pushcfunction(L, msghandler);
  lua_insert(L, base);
  int status = lua_pcall(L, narg, nres, base);
  lua_remove(L, base);
  return status;
}

static int dochunk(lua_State *L, int status) {
  if (status == LUA_OK) status = docall(L, 0, 0);
  return report(L, status);
}

static int dostring(lua_State *L, const char *s, const char *name) {
  return dochunk(L, luaL_loadbuffer(L, s, strlen(s), name));
}

/* -l [g=]mod */
static int dolibrary(lua_State *L, char *spec) {
  char *eq = strchr(spec, '=');
  const char *mod = spec, *glob = spec;
  if (eq) {
    *eq = 0;
    mod = eq + 1;
  }
  lua_getglobal(L, "require");
  lua_pushstring(L, mod);
  int status = docall(L, 1, 1);
  if (status == LUA_OK) lua_setglobal(L, glob);
  return report(L, status);
}

/* arg table: script at 0, interpreter and options below, args above. */
static void createargtable(lua_State *L, char **argv, int argc, int script) {
  int narg = argc - (script + 1);
  lua_createtable(L, narg, script + 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
}

static int pushargs(lua_State *L) {
  if (lua_getglobal(L, "arg") != LUA_TTABLE) luaL_error(L, "'arg' is not a table");
  int n = (int)luaL_len(L, -1);
  luaL_checkstack(L, n + 3, "too many arguments to script");
  int i;
  for (i = 1; i <= n; i++)
    lua_rawgeti(L, -i, i);
  lua_remove(L, -i);
  return n;
}

static int handle_script(lua_State *L, char **argv) {
  const char *fname = argv[0];
  if (strcmp(fname, "-") == 0 && strcmp(argv[-1], "--") != 0) fname = NULL;
  int status = luaL_loadfile(L, fname);
  if (status == LUA_OK) {
    int n = pushargs(L);
    status = docall(L, n, LUA_MULTRET);
  }
  return report(L, status);
}

/* Interactive mode: a line is tried as an expression first. */
static void doREPL(lua_State *L) {
  char line[4096];
  print_version();
  for (;;) {
    fputs("> ", stdout);
    fflush(stdout);
    if (fgets(line, sizeof line, stdin) == NULL) break;
    lua_settop(L, 0);
    const char *ret = lua_pushfstring(L, "return %s", line);
    int status = luaL_loadbuffer(L, ret, strlen(ret), "=stdin");
    if (status != LUA_OK) {
      lua_pop(L, 2);
      status = luaL_loadbuffer(L, line, strlen(line), "=stdin");
    } else {
      lua_remove(L, -2);
    }
    if (status == LUA_OK) status = docall(L, 0, LUA_MULTRET);
    if (status == LUA_OK && lua_gettop(L) > 0) {
      lua_getglobal(L, "print");
      lua_insert(L, 1);
      if (lua_pcall(L, lua_gettop(L) - 1, 0, 0) != LUA_OK) report(L, LUA_ERRRUN);
    } else {
      report(L, status);
    }
  }
  lua_settop(L, 0);
  fputs("\n", stdout);
}

/* The project's lua/ directory, when this binary runs from its build tree. */
static void add_build_tree_path(lua_State *L) {
#if defined(LUAPOOL_BUILD_DIR) && defined(LUAPOOL_SOURCE_LUA_DIR)
  if (luapool__host_exe == NULL) return;
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", luapool__host_exe);
  char *slash = strrchr(dir, '/');
  if (slash == NULL) return;
  *slash = 0;
  char *real = realpath(LUAPOOL_BUILD_DIR, NULL);
  int same = real && strcmp(real, dir) == 0;
  free(real);
  if (!same) return;
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", LUAPOOL_SOURCE_LUA_DIR, LUAPOOL_SOURCE_LUA_DIR,
                  lua_tostring(L, -1));
  lua_setfield(L, -3, "path");
  lua_pop(L, 2);
#else
  (void)L;
#endif
}

static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = lua_touserdata(L, 2);
  int script = 0, has_e = 0, i;
  /* First pass: find the script and check the options. */
  for (i = 1; i < argc && argv[i][0] == '-'; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--") == 0) {
      i++;
      break;
    }
    if (strcmp(a, "-") == 0) break;
    if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) continue;
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      print_usage(stdout);
      lua_pushboolean(L, 1);
      return 1;
    }
    if (strcmp(a, "-e") == 0 || strcmp(a, "-l") == 0) {
      if (a[1] == 'e') has_e = 1;
      if (++i >= argc) {
        fprintf(stderr, "%s: '%s' needs argument\n", progname, a);
        print_usage(stderr);
        return 0;
      }
      continue;
    }
    if ((a[1] == 'e' || a[1] == 'l') && a[2]) {
      if (a[1] == 'e') has_e = 1;
      continue;
    }
    fprintf(stderr, "%s: unrecognized option '%s'\n", progname, a);
    print_usage(stderr);
    return 0;
  }
  script = i < argc ? i : 0;
  luaL_checkversion(L);
  luaL_openlibs(L);
  add_build_tree_path(L);
  luapool__open_worker_state(L, NULL, NULL, 0); /* globals; main is no worker */
  createargtable(L, argv, argc, script);
  /* Second pass: run -e and -l in order. */
  int printed_version = 0;
  for (i = 1; i < (script ? script : argc); i++) {
    char *a = argv[i];
    if (strcmp(a, "--") == 0 || strcmp(a, "-") == 0) break;
    if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) {
      if (!printed_version++) print_version();
      continue;
    }
    if (a[1] == 'e' || a[1] == 'l') {
      char *val = a[2] ? a + 2 : argv[++i];
      int st = a[1] == 'e' ? dostring(L, val, "=(command line)") : dolibrary(L, val);
      if (st != LUA_OK) return 0;
    }
  }
  if (script) {
    if (handle_script(L, argv + script) != LUA_OK) return 0;
  } else if (!has_e && !printed_version) {
    if (isatty(0)) {
      doREPL(L);
    } else if (dochunk(L, luaL_loadfile(L, NULL)) != LUA_OK) {
      return 0;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

int main(int argc, char **argv) {
  if (argc >= 5 && strcmp(argv[1], "--worker") == 0) {
    if ((long)getppid() != atol(argv[4])) return 1; /* orphaned before start */
    return luapool__process_worker_main(3, argv[2], atoi(argv[3]));
  }
  if (argv[0] && argv[0][0]) progname = "luapool";
  luapool__host_exe = realpath("/proc/self/exe", NULL);
#ifdef LUAPOOL_TEST_ALLOC
  lua_State *L = lua_newstate(test_alloc, NULL);
#else
  lua_State *L = luaL_newstate();
#endif
  if (L == NULL) {
    l_message("cannot create state: not enough memory");
    return EXIT_FAILURE;
  }
  globalL = L;
#ifdef LUAPOOL_TEST_ALLOC
  lua_register(L, "__luapool_fail_alloc", l_fail_alloc);
#endif
  install_signal_handlers();
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int status = lua_pcall(L, 2, 1, 0);
  int ok = lua_toboolean(L, -1);
  report(L, status);
  lua_close(L);
  free(luapool__host_exe);
  if (uncaught_interrupt) return 128 + exit_signal;
  return (ok && status == LUA_OK) ? EXIT_SUCCESS : EXIT_FAILURE;
}
