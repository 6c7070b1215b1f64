/*
** The luapool host: a lua(1)-like command line with threadpool, processpool
** and luapool as globals.  main() starts the script's thread (run_host,
** which creates the state and runs pmain under lua_pcall) and then only
** takes SIGINT/SIGTERM (see signal_loop); every chunk runs through docall,
** whose message handler adds a traceback and copes with non-string error
** values (as lua.c does).  The REPL (doREPL) is lua.c 5.4's, with readline
** when the build found it (LUAPOOL_USE_READLINE).
**
** `luapool --worker NAME INDEX PPID` is the process-pool worker mode: it
** serves tasks on fd 3 and never reaches the Lua command line.
**
** `mpiexec -n N luapool --mpi script.lua [args]` is the MPI mode (docs/
** mpi.md, engines/mpipool.h): the MPI plugin (luapool-mpi.so, the one part
** linked to libmpi) is loaded and MPI initialised on this first thread
** before any other exists; rank 0 goes on as usual, with mpipool.new
** working, and tells the other ranks to stop when the script ends; ranks
** 1..N-1 serve tasks instead (the plugin's serve) until then.
*/
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <poll.h>
#include <pthread.h>
#include <sys/resource.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "base/ctrlc.h"
#include "engines/engines.h"
#include "engines/mpipool.h"
#include "kernels/kernel.h" /* luapool__http_thread_cleanup */
#include "bind/luapool.h"
#include "base/util.h"
#include "worker/wstate.h"

#ifdef LUAPOOL_USE_READLINE
#include <readline/history.h>
#include <readline/readline.h>
#ifndef LUAPOOL_READLINE_SONAME /* the ABI of the headers built against */
#define RL_STR_(x)              #x
#define RL_STR(x)               RL_STR_(x)
#define LUAPOOL_READLINE_SONAME "libreadline.so." RL_STR(RL_VERSION_MAJOR)
#endif

/* readline is not linked: the REPL dlopens it (LUAPOOL_READLINE_SONAME)
** when it starts on a terminal.  Linked, libreadline and libtinfo were two
** of the libraries every start maps and relocates, a script's and every
** process worker's (an exec of this host), none of which uses them
** (docs/performance.md).  Every name of it used below goes through a
** pointer resolved at load (RL_NAMES); no library, or one lacking a name:
** the REPL reads plain lines, as a build without readline does. */
#define RL_NAMES(X)                                                                                \
  X(rl_readline_name)                                                                              \
  X(rl_instream)                                                                                   \
  X(rl_outstream)                                                                                  \
  X(rl_catch_signals)                                                                              \
  X(rl_catch_sigwinch)                                                                             \
  X(rl_change_environment)                                                                         \
  X(rl_point)                                                                                      \
  X(rl_end)                                                                                        \
  X(using_history)                                                                                 \
  X(add_history)                                                                                   \
  X(rl_reset_screen_size)                                                                          \
  X(rl_callback_handler_install)                                                                   \
  X(rl_callback_handler_remove)                                                                    \
  X(rl_callback_read_char)                                                                         \
  X(rl_redisplay)                                                                                  \
  X(rl_free_line_state)                                                                            \
  X(rl_callback_sigcleanup)                                                                        \
  X(rl_cleanup_after_signal)
#define RL_POINTER(name) static __typeof__(&(name)) p_##name;
RL_NAMES(RL_POINTER)
#undef RL_POINTER

/* 0 when every name resolved (once per process). */
static int load_readline(void) {
  static int state; /* 0 not tried, 1 loaded, -1 failed */
  if (state != 0) return state > 0 ? 0 : -1;
  state = -1;
  void *lib = dlopen(LUAPOOL_READLINE_SONAME, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) return -1;
  void *sym;
#define RL_RESOLVE(name)                                                                           \
  if ((sym = dlsym(lib, #name)) == NULL) {                                                         \
    dlclose(lib);                                                                                  \
    return -1;                                                                                     \
  }                                                                                                \
  memcpy(&p_##name, &sym, sizeof sym);
  RL_NAMES(RL_RESOLVE)
#undef RL_RESOLVE
  state = 1; /* never closed: its state lives to the end */
  return 0;
}

/* From here on, the names are readline's, through the pointers. */
#define rl_readline_name            (*p_rl_readline_name)
#define rl_instream                 (*p_rl_instream)
#define rl_outstream                (*p_rl_outstream)
#define rl_catch_signals            (*p_rl_catch_signals)
#define rl_catch_sigwinch           (*p_rl_catch_sigwinch)
#define rl_change_environment       (*p_rl_change_environment)
#define rl_point                    (*p_rl_point)
#define rl_end                      (*p_rl_end)
#define using_history               (*p_using_history)
#define add_history                 (*p_add_history)
#define rl_reset_screen_size        (*p_rl_reset_screen_size)
#define rl_callback_handler_install (*p_rl_callback_handler_install)
#define rl_callback_handler_remove  (*p_rl_callback_handler_remove)
#define rl_callback_read_char       (*p_rl_callback_read_char)
#define rl_redisplay                (*p_rl_redisplay)
#define rl_free_line_state          (*p_rl_free_line_state)
#define rl_callback_sigcleanup      (*p_rl_callback_sigcleanup)
#define rl_cleanup_after_signal     (*p_rl_cleanup_after_signal)
#endif

static const char *progname = "luapool"; /* NULL at the prompt */
static atomic_int exit_signal;           /* the last signal received */
static atomic_int signals_taken;         /* how many were received */
static atomic_int ending;                /* the host is ending on an uncaught one */
static int uncaught_interrupt;           /* the script ended on it: exit 128 + it */
static int in_repl;                      /* in the REPL, a SIGINT ends only the statement */
#ifdef LUAPOOL_HAVE_MPI
static const lp_mpi_plugin *mpi_plugin; /* --mpi: rank 0 of an MPI job */

/* Ends MPI on rank 0 once: after the script's state closed, or from
** exit() when the script called os.exit (the state then may still be
** open: the pools' progress threads are made to leave their loops by
** the plugin's end, which touches no Lua).  Without it an os.exit(0)
** skipped MPI_Finalize and the job ended with status 1 and Open MPI's
** "exiting improperly" banner. */
static void mpi_end_once(void) {
  static atomic_int ended;
  if (mpi_plugin && !atomic_exchange(&ended, 1)) mpi_plugin->end();
}
#endif

/* {====== SIGINT and SIGTERM
** The script runs on a thread of its own (run_host); the process's main
** thread only takes SIGINT and SIGTERM with sigwaitinfo, keeping both
** blocked.  That is what makes them reliable: glibc's system() sets
** SIGINT to SIG_IGN for the whole process while its child runs (a thread
** task's os.execute does it), and Linux drops a signal sent to the
** process (kill PID) as ignored unless its main thread blocks it.  A
** blocked signal is kept for sigwaitinfo, whatever the disposition.  The
** script's own thread keeps both unblocked (with on_signal as handler), so
** the commands it starts (os.execute, io.popen) get Ctrl-C as usual.
**
** A signal is delivered to the script as an error of kind "interrupted"
** (luapool__check_signal, from a wait that polls luapool__signal or from
** the hook set on the main state as lua.c does: STOP_SIGNAL sent to the
** script's thread sets it there, see luapool__set_signal_state).  A
** second one while the first is still being handled (received and not
** yet delivered, or the host already ending on an uncaught one) ends the
** process at once, and the workers with it (their parent-death signal);
** once delivered, the next one is a new, catchable interruption. */
static void take_signal(int sig) {
  int none = 0;
  atomic_store(&exit_signal, sig);
  atomic_fetch_add(&signals_taken, 1);
  if (!atomic_load(&luapool__signals_handled) || atomic_load(&ending) ||
      !atomic_compare_exchange_strong(&luapool__signal, &none, sig))
    _exit(128 + sig);
  pthread_kill(luapool__signal_thread, LUAPOOL_STOP_SIGNAL);
}

/* The handler, for the rare delivery to an unblocked thread (the script's
** own, or one a library started from it).  Async-signal-safe work only:
** atomics, pthread_kill, _exit. */
static void on_signal(int sig) { take_signal(sig); }

static void signal_set(sigset_t *set) {
  sigemptyset(set);
  sigaddset(set, SIGINT);
  sigaddset(set, SIGTERM);
}

/* The process's main thread, for good. */
static _Noreturn void signal_loop(void) {
  sigset_t set;
  signal_set(&set);
  for (;;) {
    siginfo_t si;
    int sig = sigwaitinfo(&set, &si);
    if (sig > 0) take_signal(sig);
  }
}
/* }====== */

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

/* On the script's thread, once its state exists: from here on signals are
** delivered to the script. */
static void install_signal_handlers(lua_State *L) {
  sigset_t set;
  signal_set(&set);
  luapool__on_signal(SIGINT, on_signal);
  luapool__on_signal(SIGTERM, on_signal);
  luapool__signal_thread = pthread_self();
  luapool__set_signal_state(L);
  atomic_store(&luapool__signals_handled, 1);
  pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

#ifdef LUAPOOL_USE_READLINE
#define REPL_HELP    "the REPL (with readline) when stdin is a terminal"
#define READLINE_ENV "  INPUTRC             readline's key bindings file (default: ~/.inputrc)\n"
#else
#define REPL_HELP    "the REPL when stdin is a terminal"
#define READLINE_ENV ""
#endif

/* Every option, and every environment variable the host and the module read
** (the C code's getenv and Lua's package library). */
static void print_usage(FILE *out) {
  fprintf(out,
          "usage: %s [options] [script [args]]\n"
          "Available options are:\n"
          "  -e stat   execute string 'stat'\n"
          "  -i        enter interactive mode after executing 'script'\n"
          "  -l mod    require library 'mod' into global 'mod'\n"
          "  -l g=mod  require library 'mod' into global 'g'\n"
          "  -v        show version information (also --version)\n"
          "  -E        ignore LUA_PATH and LUA_CPATH\n"
          "  -W        turn warnings on\n"
          "  -h        show this help (also --help)\n"
          "  --        stop handling options\n"
          "  -         stop handling options and execute stdin\n"
          "  --mpi     first option: rank 0 of an MPI job runs the script, the other\n"
          "            ranks serve its mpipool tasks (mpiexec -n N %s --mpi script.lua)\n"
          "With no script, no -e and no -v: " REPL_HELP ",\n"
          "else stdin runs as the script.  At the prompt, Ctrl-C cancels the line\n"
          "or interrupts the statement, Ctrl-D exits.\n"
          "Environment variables:\n"
          "  LUAPOOL_WORKER_EXE  the binary process pools start as workers (default: luapool)\n"
          "  LUAPOOL_LIBCURL     the libcurl HTTP loads on first use (default: libcurl.so.4)\n"
          "  GLIBC_TUNABLES      glibc.malloc.mmap_threshold/trim_threshold: the host keeps them\n"
          "  MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_  the same, glibc's older names\n"
          "  LUA_PATH_5_4        initial package.path (';;' stands for the default)\n"
          "  LUA_PATH            initial package.path when LUA_PATH_5_4 is unset\n"
          "  LUA_CPATH_5_4       initial package.cpath (';;' stands for the default)\n"
          "  LUA_CPATH           initial package.cpath when LUA_CPATH_5_4 is unset\n" READLINE_ENV
          "In scripts, threadpool, processpool, iopool, mpipool and luapool are globals.\n",
          progname, progname);
}

static void print_version(void) { printf("luapool %s (%s)\n", LUAPOOL_VERSION, LUA_RELEASE); }

static void l_message(const char *msg) {
  if (progname) fprintf(stderr, "%s: ", progname);
  fprintf(stderr, "%s\n", msg);
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

static void end_on_signal(void) {
  uncaught_interrupt = 1;
  atomic_store(&ending, 1);
  atomic_store(&luapool__ending_on_signal, 1);
}

/* A signal the script did not see (it came after its last wait or hook,
** or while the state closed): the host ends on it all the same. */
static void end_late(int sig) {
  end_on_signal();
  l_message(sig == SIGTERM ? "interrupted: the script received SIGTERM"
                           : "interrupted: the script received SIGINT");
}

/* Message handler: non-string errors go through __tostring when they have
** one (luapool error objects do), then a traceback is appended. */
static int msghandler(lua_State *L) {
  /* an interruption nobody caught: the exit status says which signal, and
  ** the host ends (a further signal exits at once, pools give stuck
  ** threads only a short grace); in the REPL a SIGINT ends only the
  ** statement, a SIGTERM still ends the host */
  int sig = atomic_load(&exit_signal);
  if (lua_type(L, 1) == LUA_TTABLE && lua_getfield(L, 1, "kind") == LUA_TSTRING &&
      strcmp(lua_tostring(L, -1), "interrupted") == 0 && sig && (!in_repl || sig == SIGTERM))
    end_on_signal();
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

/* The handler of pmain's own errors (the script's calls have msghandler,
** through docall): a signal taken while pmain sets the state up is an
** uncaught interruption like one in the script; any other error stays as
** it was raised, reported alone as lua.c reports pmain's errors. */
static int start_msghandler(lua_State *L) {
  int interrupted = lua_type(L, 1) == LUA_TTABLE && lua_getfield(L, 1, "kind") == LUA_TSTRING &&
                    strcmp(lua_tostring(L, -1), "interrupted") == 0;
  lua_settop(L, 1);
  return interrupted ? msghandler(L) : 1;
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

/* {====== The REPL, as lua.c 5.4's doREPL: continuation lines for an
** incomplete statement, `=expr` and plain expressions print their values,
** _PROMPT and _PROMPT2, readline (when built with it) for editing and
** history.  Unlike lua, Ctrl-C at the prompt cancels the statement being
** typed instead of ending the program, and Ctrl-C during a statement ends
** only that statement (its error, of kind "interrupted", is printed).
**
** The prompt waits on the script's thread, like everything the script
** does.  A SIGINT taken while it waits (by the signal thread or the
** handler, see take_signal) leaves luapool__signal set and sends
** STOP_SIGNAL here; wait_input sees the flag and cancels the line instead
** of letting the signal hook raise it in the next statement. */
#define REPL_LINE   1
#define REPL_EOF    0
#define REPL_CANCEL (-1) /* SIGINT: the statement being typed is dropped */
#define REPL_END    (-2) /* SIGTERM: the host ends (status 143) */

#ifdef LUAPOOL_USE_READLINE
static int use_readline; /* stdin is a terminal: edit the line with readline */
#endif

/* Waits until stdin is readable (REPL_LINE) or a signal is pending.  SIGINT,
** SIGTERM and STOP_SIGNAL stay blocked on this thread except inside ppoll,
** so one that comes before the wait is not lost: it is pending and ends
** ppoll at once.  The signal is consumed here, with the hook STOP_SIGNAL set
** for it (nothing is running to interrupt): a SIGINT cancels the line, a
** SIGTERM ends the REPL and the host (doREPL). */
static int wait_input(lua_State *L) {
  sigset_t block, old;
  signal_set(&block);
  sigaddset(&block, LUAPOOL_STOP_SIGNAL);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  int r = REPL_LINE;
  for (;;) {
    int sig = atomic_exchange(&luapool__signal, 0);
    if (sig != 0) {
      if (lua_gethook(L) == luapool__signal_hook) lua_sethook(L, NULL, 0, 0);
      r = sig == SIGINT ? REPL_CANCEL : REPL_END;
      break;
    }
    struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
    int n = ppoll(&pfd, 1, NULL, &old);
    if (n > 0 || (n < 0 && errno != EINTR)) break; /* (read reports an error) */
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return r;
}

/* Without readline: stdin read with read(2), so that the wait above sees
** what is buffered.  Lines are split here (a pipe gives several at once). */
static char in_buf[LUAL_BUFFERSIZE];
static size_t in_len;

static int read_line_plain(lua_State *L, const char *prompt) {
  fputs(prompt, stdout);
  fflush(stdout);
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  for (;;) {
    char *nl = memchr(in_buf, '\n', in_len);
    if (nl) {
      size_t n = (size_t)(nl - in_buf);
      luaL_addlstring(&b, in_buf, n);
      in_len -= n + 1;
      memmove(in_buf, nl + 1, in_len);
      luaL_pushresult(&b);
      return REPL_LINE;
    }
    luaL_addlstring(&b, in_buf, in_len);
    in_len = 0;
    int w = wait_input(L);
    if (w != REPL_LINE) {
      /* the terminal dropped what was typed (and echoed ^C) */
      luaL_pushresult(&b);
      lua_pop(L, 1);
      fputs("\n", stdout);
      return w;
    }
    ssize_t got = read(STDIN_FILENO, in_buf, sizeof in_buf);
    if (got > 0) {
      in_len = (size_t)got;
    } else if (got == 0 || errno != EINTR) { /* end of input: a last line without newline? */
      luaL_pushresult(&b);
      if (lua_rawlen(L, -1) > 0) return REPL_LINE;
      lua_pop(L, 1);
      return REPL_EOF;
    }
  }
}

#ifdef LUAPOOL_USE_READLINE
/* readline's callback interface, so that the wait is wait_input's. */
static char *rl_result;
static int rl_finished;

static void on_rl_line(char *line) {
  rl_result = line; /* NULL: Ctrl-D on an empty line */
  rl_finished = 1;
  rl_callback_handler_remove();
}

static void init_readline(void) {
  rl_readline_name = "luapool"; /* for $if in ~/.inputrc */
  rl_instream = stdin;
  rl_outstream = stdout;
  /* The host owns SIGINT and SIGTERM (and readline's SIGWINCH handler could
  ** run on any thread); readline must not setenv LINES and COLUMNS while
  ** pool threads may read the environment. */
  rl_catch_signals = 0;
  rl_catch_sigwinch = 0;
  rl_change_environment = 0;
  using_history();
}

static int read_line_rl(lua_State *L, const char *prompt) {
  rl_finished = 0;
  rl_result = NULL;
  rl_reset_screen_size(); /* the terminal may have been resized (no SIGWINCH handler) */
  rl_callback_handler_install(prompt, on_rl_line);
  while (!rl_finished) {
    int w = wait_input(L);
    if (w == REPL_LINE) {
      rl_callback_read_char();
      continue;
    }
    /* show the cancelled line whole, then leave it as bash does */
    rl_point = rl_end;
    rl_redisplay();
    if (w == REPL_CANCEL) fputs("^C", rl_outstream);
    rl_free_line_state();
    rl_callback_sigcleanup();
    rl_cleanup_after_signal();
    rl_callback_handler_remove();
    fputs("\n", rl_outstream);
    fflush(rl_outstream);
    return w;
  }
  if (rl_result == NULL) return REPL_EOF;
  lua_pushstring(L, rl_result);
  free(rl_result);
  return REPL_LINE;
}
#endif

/* The statement in readline's history, as it was typed ("=expr" stays). */
static int typed_eq; /* the first line was "=expr", now "return expr" */

static void save_line(const char *line) {
#ifdef LUAPOOL_USE_READLINE
  if (!use_readline || line[0] == '\0') return;
  static const char ret[] = "return ";
  if (typed_eq && strncmp(line, ret, sizeof ret - 1) == 0) {
    size_t n = strlen(line + sizeof ret - 1);
    char *eq = malloc(n + 2);
    if (eq == NULL) return; /* (no memory: not in the history) */
    eq[0] = '=';
    memcpy(eq + 1, line + sizeof ret - 1, n + 1);
    add_history(eq);
    free(eq);
  } else {
    add_history(line);
  }
#else
  (void)line;
#endif
}

/* The prompt: tostring(_PROMPT) or tostring(_PROMPT2) when set. */
static const char *get_prompt(lua_State *L, int firstline) {
  if (lua_getglobal(L, firstline ? "_PROMPT" : "_PROMPT2") == LUA_TNIL) {
    lua_pop(L, 1);
    return lua_pushstring(L, firstline ? "> " : ">> ");
  }
  const char *p = luaL_tolstring(L, -1, NULL);
  lua_remove(L, -2);
  return p;
}

/* Reads a line and pushes it (REPL_LINE); a first line "=expr" becomes
** "return expr". */
static int pushline(lua_State *L, int firstline) {
  const char *prompt = get_prompt(L, firstline);
#ifdef LUAPOOL_USE_READLINE
  int r = use_readline ? read_line_rl(L, prompt) : read_line_plain(L, prompt);
#else
  int r = read_line_plain(L, prompt);
#endif
  if (r != REPL_LINE) {
    lua_pop(L, 1);
    return r;
  }
  lua_remove(L, -2); /* the prompt */
  size_t len;
  const char *b = lua_tolstring(L, -1, &len);
  if (len > 0 && b[len - 1] == '\r') { /* (a CRLF line from a pipe) */
    lua_pushlstring(L, b, len - 1);
    lua_remove(L, -2);
    b = lua_tostring(L, -1);
  }
  if (firstline) typed_eq = b[0] == '=';
  if (firstline && b[0] == '=') {
    lua_pushfstring(L, "return %s", b + 1);
    lua_remove(L, -2);
  }
  return REPL_LINE;
}

/* The line as "return line;": an expression whose values are printed. */
static int addreturn(lua_State *L) {
  const char *line = lua_tostring(L, -1);
  const char *retline = lua_pushfstring(L, "return %s;", line);
  int status = luaL_loadbuffer(L, retline, strlen(retline), "=stdin");
  if (status == LUA_OK) {
    lua_remove(L, -2);
    save_line(line);
  } else {
    lua_pop(L, 2);
  }
  return status;
}

/* A syntax error at "<eof>" means the statement is not complete yet. */
static int incomplete(lua_State *L, int status) {
  static const char mark[] = "<eof>";
  size_t len, mlen = sizeof mark - 1;
  if (status == LUA_ERRSYNTAX) {
    const char *msg = lua_tolstring(L, -1, &len);
    if (len >= mlen && strcmp(msg + len - mlen, mark) == 0) {
      lua_pop(L, 1);
      return 1;
    }
  }
  return 0;
}

/* The line as a statement, with continuation lines while it is
** incomplete: REPL_LINE with the load status in *status (and the chunk or
** the message pushed), or what ended the reading of a continuation line. */
static int multiline(lua_State *L, int *status) {
  for (;;) {
    size_t len;
    const char *line = lua_tolstring(L, 1, &len);
    *status = luaL_loadbuffer(L, line, len, "=stdin");
    if (!incomplete(L, *status)) {
      save_line(line);
      return REPL_LINE;
    }
    int r = pushline(L, 0);
    if (r != REPL_LINE) {
      save_line(line); /* what was typed stays in the history, as in bash */
      return r;
    }
    lua_pushliteral(L, "\n");
    lua_insert(L, -2);
    lua_concat(L, 3);
  }
}

/* Reads a statement: REPL_LINE with its load status in *status and its
** chunk (or the error message) alone on the stack; else the stack is empty
** and the code says what ended the reading. */
static int loadline(lua_State *L, int *status) {
  lua_settop(L, 0);
  int r = pushline(L, 1);
  if (r != REPL_LINE) return r;
  if ((*status = addreturn(L)) != LUA_OK) r = multiline(L, status);
  if (r != REPL_LINE) {
    lua_settop(L, 0);
    return r;
  }
  lua_remove(L, 1); /* the line */
  return REPL_LINE;
}

/* The values of the statement, with print (tostring, tab-separated). */
static void l_print(lua_State *L) {
  int n = lua_gettop(L);
  if (n > 0) {
    luaL_checkstack(L, LUA_MINSTACK, "too many results to print");
    lua_getglobal(L, "print");
    lua_insert(L, 1);
    if (lua_pcall(L, n, 0, 0) != LUA_OK)
      l_message(lua_pushfstring(L, "error calling 'print' (%s)", lua_tostring(L, -1)));
  }
}

static void doREPL(lua_State *L) {
  const char *oldprogname = progname;
  progname = NULL; /* no program name on errors at the prompt, as lua */
  in_repl = 1;
#ifdef LUAPOOL_USE_READLINE
  use_readline = isatty(STDIN_FILENO) && load_readline() == 0;
  if (use_readline) init_readline();
#endif
  int r, status = LUA_OK;
  while ((r = loadline(L, &status)) != REPL_EOF && r != REPL_END) {
    if (r == REPL_CANCEL) continue;
    if (status == LUA_OK) status = docall(L, 0, LUA_MULTRET);
    if (status == LUA_OK)
      l_print(L);
    else
      report(L, status);
    if (uncaught_interrupt) break; /* a SIGTERM during the statement */
  }
  lua_settop(L, 0);
#ifdef LUAPOOL_USE_READLINE
  if (r == REPL_EOF && !use_readline) fputs("\n", stdout); /* (readline ends its line itself) */
#else
  if (r == REPL_EOF) fputs("\n", stdout);
#endif
  fflush(stdout);
  in_repl = 0;
  progname = oldprogname;
  if (r == REPL_END) { /* as a SIGTERM the script does not catch */
    l_message("interrupted: the script received SIGTERM");
    end_on_signal();
  }
}
/* }====== */

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
  int script = 0, has_e = 0, has_i = 0, has_E = 0, has_W = 0, i;
  /* First pass: find the script and check the options. */
  for (i = 1; i < argc && argv[i][0] == '-'; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--") == 0) {
      i++;
      break;
    }
    if (strcmp(a, "-") == 0) break;
    if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) continue;
    if (strcmp(a, "-i") == 0) {
      has_i = 1;
      continue;
    }
    if (strcmp(a, "-E") == 0 || strcmp(a, "-W") == 0) { /* as lua(1) */
      if (a[1] == 'E')
        has_E = 1;
      else
        has_W = 1;
      continue;
    }
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
  if (has_E) { /* package.path and cpath ignore LUA_PATH and LUA_CPATH (lua.c's way) */
    lua_pushboolean(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "LUA_NOENV");
  }
  luaL_openlibs(L);
  if (has_W) lua_warning(L, "@on", 0);
  add_build_tree_path(L);
  luapool__open_worker_state(L, NULL, NULL, 0); /* globals; main is no worker */
  /* A signal that came before the module could deliver it (its hook found
  ** no delivery and let it be) is delivered now, not at the script's first
  ** wait: a script that never waits would not see it. */
  luapool__check_signal(L);
  createargtable(L, argv, argc, script);
  /* Second pass: run -e and -l in order.  -i shows the banner first, as
  ** lua's -i implies -v. */
  int printed_version = 0;
  if (has_i) {
    print_version();
    printed_version = 1;
  }
  for (i = 1; i < (script ? script : argc); i++) {
    char *a = argv[i];
    if (strcmp(a, "--") == 0 || strcmp(a, "-") == 0) break;
    if (strcmp(a, "-v") == 0 || strcmp(a, "--version") == 0) {
      if (!printed_version++) print_version();
      continue;
    }
    if (strcmp(a, "-E") == 0 || strcmp(a, "-W") == 0) continue; /* (done above) */
    if (a[1] == 'e' || a[1] == 'l') {
      char *val = a[2] ? a + 2 : argv[++i];
      int st = a[1] == 'e' ? dostring(L, val, "=(command line)") : dolibrary(L, val);
      if (st != LUA_OK) return 0;
    }
  }
  if (script && handle_script(L, argv + script) != LUA_OK) return 0;
  if (has_i) {
    doREPL(L);
  } else if (!script && !has_e && !printed_version) {
    if (isatty(STDIN_FILENO)) {
      print_version();
      doREPL(L);
    } else if (dochunk(L, luaL_loadfile(L, NULL)) != LUA_OK) {
      return 0;
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

typedef struct host_args {
  int argc;
  char **argv;
} host_args;

/* The script's thread: runs the command line, then ends the process. */
static void *run_host(void *arg) {
  host_args *a = arg;
#ifdef LUAPOOL_TEST_ALLOC
  lua_State *L = lua_newstate(test_alloc, NULL);
#else
  lua_State *L = luaL_newstate();
#endif
  if (L == NULL) {
    l_message("cannot create state: not enough memory");
    exit(EXIT_FAILURE);
  }
#ifdef LUAPOOL_TEST_ALLOC
  lua_register(L, "__luapool_fail_alloc", l_fail_alloc);
#endif
  install_signal_handlers(L);
  /* A signal taken while pmain sets the state up (between the module's
  ** opening and the script's docall) raises its error there, and is then
  ** an uncaught interruption (exit 128 + signal) like one in the script,
  ** not "(error object is not a string)" and exit 1 (start_msghandler) */
  lua_pushcfunction(L, start_msghandler);
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, a->argc);
  lua_pushlightuserdata(L, a->argv);
  int status = lua_pcall(L, 2, 1, 1);
  int ok = lua_toboolean(L, -1);
  report(L, status);
  /* A signal that came after the script's last wait or hook: the script
  ** did not finish on its own terms. */
  int late = atomic_load(&luapool__signal);
  if (late && !uncaught_interrupt) end_late(late);
  int taken = atomic_load(&signals_taken);
  lua_close(L);
  /* A signal during lua_close (the joins of pools left open, which give
  ** up on a stuck thread half a second after it) ends the host as one in
  ** the script would: it exited 0 as if the script had finished. */
  if (atomic_load(&signals_taken) != taken && !uncaught_interrupt)
    end_late(atomic_load(&exit_signal));
  /* The loop the script's blocking requests ran on: closed here, its kept
  ** connections reset (luapool__hl_close_fd), not left to exit's FIN and
  ** TIME_WAIT. */
  luapool__http_thread_cleanup();
  free(luapool__host_exe);
#ifdef LUAPOOL_HAVE_MPI
  mpi_end_once(); /* every pool is gone with the state */
#endif
  if (uncaught_interrupt) exit(128 + atomic_load(&exit_signal));
  exit((ok && status == LUA_OK) ? EXIT_SUCCESS : EXIT_FAILURE);
}

/* The launcher's variable that says this process is a rank of an MPI job
** (Open MPI, MPICH's hydra, PMI and PMIx launchers, srun with either), or
** NULL.  A process started by a rank (a worker, a command a task runs)
** has its variables too, and LUAPOOL_MPI_CHILD. */
static const char *mpi_launch_var(void) {
  static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK",
                                     NULL};
  if (getenv("LUAPOOL_MPI_CHILD")) return NULL;
  for (int i = 0; vars[i]; i++)
    if (getenv(vars[i])) return vars[i];
  return NULL;
}

#ifdef LUAPOOL_HAVE_MPI
/* Where the MPI plugin is: LUAPOOL_MPI_PLUGIN when set (tests, a plugin
** moved elsewhere); else next to this binary when it runs from its build
** dir; else where it is installed: LUAPOOL_MPI_PLUGIN_REL from the
** binary's directory (CMakeLists.txt computes it from the install dirs),
** or as it is when absolute (a LuaRocks tree's). */
static void mpi_plugin_path(char *buf, size_t n) {
  const char *env = getenv("LUAPOOL_MPI_PLUGIN");
  if (env && *env) { /* a file name: dlopen would search the library path for one without '/' */
    snprintf(buf, n, "%s%s", strchr(env, '/') ? "" : "./", env);
    return;
  }
  const char *rel = LUAPOOL_MPI_PLUGIN_REL;
  if (luapool__host_exe == NULL) { /* (no /proc): an absolute place, or none */
    if (rel[0] == '/')
      snprintf(buf, n, "%s/%s", rel, LUAPOOL_MPI_PLUGIN_NAME);
    else
      buf[0] = 0; /* never a path relative to the current directory */
    return;
  }
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s", luapool__host_exe);
  char *slash = strrchr(dir, '/');
  if (slash) *slash = 0;
  char *real = realpath(LUAPOOL_MPI_BUILD_DIR, NULL);
  int in_build = real && strcmp(real, dir) == 0;
  free(real);
  if (!in_build && rel[0] == '/')
    snprintf(buf, n, "%s/%s", rel, LUAPOOL_MPI_PLUGIN_NAME);
  else if (in_build || rel[0] == 0)
    snprintf(buf, n, "%s/%s", dir, LUAPOOL_MPI_PLUGIN_NAME);
  else
    snprintf(buf, n, "%s/%s/%s", dir, rel, LUAPOOL_MPI_PLUGIN_NAME);
}

/* dlopens the plugin, or exits saying why.  RTLD_GLOBAL: Open MPI's own
** components, which MPI_Init dlopens, take libmpi's symbols from the
** global scope.  Never closed: MPI's threads run its code to the end. */
static const lp_mpi_plugin *mpi_load(void) {
  char path[PATH_MAX + 256];
  mpi_plugin_path(path, sizeof path);
  if (path[0] == 0) {
    fprintf(stderr, "luapool: --mpi: cannot find the MPI plugin: this luapool's own path is "
                    "unknown (/proc/self/exe); set LUAPOOL_MPI_PLUGIN to the plugin's file\n");
    exit(EXIT_FAILURE);
  }
  void *lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (lib == NULL) {
    fprintf(stderr, "luapool: --mpi: cannot load the MPI plugin %s (%s)\n", path, dlerror());
    exit(EXIT_FAILURE);
  }
  const lp_mpi_plugin *p = dlsym(lib, LUAPOOL_MPI_PLUGIN_SYMBOL);
  if (p == NULL) {
    fprintf(stderr, "luapool: --mpi: %s is no MPI plugin of luapool (%s)\n", path, dlerror());
    exit(EXIT_FAILURE);
  }
  if (p->abi != LUAPOOL_MPI_PLUGIN_ABI || p->size != sizeof *p) {
    fprintf(stderr, "luapool: --mpi: %s is the MPI plugin of another luapool build\n", path);
    exit(EXIT_FAILURE);
  }
  if (strcmp(p->build, LUAPOOL_BUILD_ID) != 0) {
    fprintf(stderr,
            "luapool: --mpi: %s is the MPI plugin of another luapool build (the plugin's is %s, "
            "this luapool is %s)\n",
            path, p->build, LUAPOOL_BUILD_ID);
    exit(EXIT_FAILURE);
  }
  return p;
}
#endif

/* --mpi as the first argument: checks the launch, loads the MPI plugin
** and starts MPI; a serving rank never returns from here.  Without --mpi
** under mpiexec (every rank would run the script), or with it outside one,
** says what to run: those read the environment only, with no plugin. */
static void mpi_launch(int *argc, char ***argv) {
  const char *var = mpi_launch_var();
  if (*argc < 2 || strcmp((*argv)[1], "--mpi") != 0) {
    luapool__mpi_absent =
        "not in an MPI launch: run the script as `" LUAPOOL_MPI_LAUNCH "` (rank 0 runs it, "
        "ranks 1..N-1 serve its tasks)";
    if (var) {
      fprintf(stderr,
              "luapool: started by an MPI launcher (%s is set) without --mpi: every rank would "
              "run the script on its own; run `" LUAPOOL_MPI_LAUNCH "`\n",
              var);
      exit(EXIT_FAILURE);
    }
    return;
  }
#ifndef LUAPOOL_HAVE_MPI
  fprintf(stderr,
          "luapool: --mpi: this build of luapool has no MPI (CMake found none: install Open "
          "MPI's libopenmpi-dev and rebuild)\n");
  exit(EXIT_FAILURE);
#else
  if (var == NULL) {
    fprintf(stderr,
            "luapool: --mpi needs an MPI launch: run `" LUAPOOL_MPI_LAUNCH
            "` (on a cluster: `mpiexec --hostfile FILE ...`, under Slurm: `srun -n N luapool "
            "--mpi script.lua`)\n");
    exit(EXIT_FAILURE);
  }
  const lp_mpi_plugin *p = mpi_load();
  (*argv)[1] = (*argv)[0]; /* the script's arg table does not see --mpi */
  (*argv)++;
  (*argc)--;
  int rank = p->start(argc, argv);
  if (rank < 0) exit(EXIT_FAILURE);
  if (rank > 0) exit(p->serve());
  luapool__mpi_owner = p->owner; /* (start sets it too) */
  mpi_plugin = p;
  atexit(mpi_end_once); /* (os.exit in the script) */
#endif
}

/* Values of a megabyte and more (a task's result string, a message, the
** decoded copy) would each be a fresh mmap under glibc's defaults, or be
** trimmed back to the kernel after their free: every page of every such
** value then faults again when the next one is made, and on a VM a fault
** costs more than the copy (200 tasks of a 1 MiB string: 123 faults per task).
** Keeping them in the heap and its free top makes the next value reuse
** mapped pages.  Both are set, since setting either turns glibc's dynamic
** threshold off; the mmap threshold is glibc's own upper bound for its
** dynamic one (4 MiB times sizeof(long): 32 MiB on 64-bit).  A threshold
** the user set (GLIBC_TUNABLES or glibc's older MALLOC_*_ variables) wins. */
static int user_sets(const char *tunable, const char *var) {
  const char *t = getenv("GLIBC_TUNABLES");
  return (t && strstr(t, tunable)) || getenv(var);
}

static void malloc_policy(void) {
#ifdef __GLIBC__
  if (!user_sets("glibc.malloc.mmap_threshold", "MALLOC_MMAP_THRESHOLD_"))
    mallopt(M_MMAP_THRESHOLD, (int)((4u << 20) * sizeof(long)));
  if (!user_sets("glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_"))
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
}

/* A standard descriptor that came closed (`luapool job.lua >&-`, a daemon's
** start) is opened on /dev/null: else the first socket made (a process
** worker's, a fetch's) would take its number, and print would write into it,
** io.read read from it. */
static void sanitize_stdio(void) {
  for (int fd = 0; fd <= 2; fd++) {
    if (fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    int nfd = open("/dev/null", O_RDWR);
    if (nfd >= 0 && nfd != fd) close(nfd); /* (not the lowest free: leave it) */
  }
}

int main(int argc, char **argv) {
  sanitize_stdio();
  malloc_policy();
  if (argc >= 5 && strcmp(argv[1], "--worker") == 0) {
    if ((long)getppid() != atol(argv[4])) return 1;        /* orphaned before start */
    luapool__set_state_opener(luapool__open_worker_state); /* before its state exists */
    return luapool__process_worker_main(3, argv[2], atoi(argv[3]));
  }
  if (argv[0] && argv[0][0]) progname = "luapool";
  luapool__host_exe = realpath("/proc/self/exe", NULL);
  /* Blocked here for good, and in every thread started from here until the
  ** script's thread unblocks them for itself (pool threads block them);
  ** MPI's own threads, started by MPI_Init, inherit the mask too. */
  sigset_t set;
  signal_set(&set);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  mpi_launch(&argc, &argv);
  static host_args a;
  a.argc = argc;
  a.argv = argv;
  /* The script's thread gets the stack a main thread would have. */
  pthread_attr_t attr;
  pthread_t t;
  struct rlimit rl;
  size_t stack = 8u << 20;
  if (getrlimit(RLIMIT_STACK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur > stack)
    stack = (size_t)rl.rlim_cur;
  if (pthread_attr_init(&attr) == 0) {
    pthread_attr_setstacksize(&attr, stack);
    int r = pthread_create(&t, &attr, run_host, &a);
    pthread_attr_destroy(&attr);
    if (r == 0) signal_loop();
  }
  /* No thread to spare: the script runs here, with the handler only. */
  run_host(&a);
  return EXIT_FAILURE;
}
