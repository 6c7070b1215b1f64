/*
** mpipool (docs/mpi.md): a pool whose tasks run on the serving ranks of an
** MPI job, each rank running them in local worker processes.  Three parts:
**   engines/mpipool.c   the engine entry (in every build, the module too):
**                       its options, and a refusal that says how to launch
**                       when this process is no rank 0 of `luapool --mpi`;
**   engines/mpi_owner.c rank 0's engine: one progress thread per pool
**                       talks MPI;
**   engines/mpi_rank.c  what ranks 1..N-1 run instead of a script, and
**                       the host's MPI start and end.
** The MPI parts are compiled only when CMake found MPI (LUAPOOL_HAVE_MPI),
** into a plugin (luapool-mpi.so, engines/mpi_plugin.c) that only
** `luapool --mpi` dlopens: the host executable is not linked to libmpi, so
** a plain run, every process worker and the Lua module start without it.
** The plugin takes the core's symbols from the host that loads it (the
** host exports them), and exports one symbol, luapool_mpi_plugin.
*/
#ifndef LUAPOOL_MPIPOOL_H
#define LUAPOOL_MPIPOOL_H

#include "core/engine.h"

/* mpipool's own options (engines/mpipool.c lists them). */
typedef struct mpi_config {
  int slots;               /* tasks a rank runs at once (its local workers) */
  int prefetch;            /* tasks sent ahead to a rank while the queue is long */
  int max_memory_mb;       /* per local worker process; 0: none */
  int max_tasks_per_child; /* 0: none */
  int on_crash_break;      /* on_crash = "break" */
} mpi_config;

/* The engine of rank 0 of an MPI launch, set by the host once MPI is up
** (mpi_owner.c's); NULL elsewhere, and mpipool.new then refuses. */
extern const lp_engine *luapool__mpi_owner;
/* Why there is none, for the refusal (set by the host: "" in a plain
** launch).  NULL: the module, or a build without MPI. */
extern const char *luapool__mpi_absent;

/* The launch line users are shown. */
#define LUAPOOL_MPI_LAUNCH "mpiexec -n N luapool --mpi script.lua [args]"

/* The host's MPI mode (mpi_rank.c, in the plugin only).
** luapool__mpi_start: MPI_Init_thread (SERIALIZED) in the process's
** first thread, before any other exists; returns this rank, or -1 with
** a message printed.  Ranks above 0 then call luapool__mpi_serve, which
** returns the process's exit status.  Rank 0 runs the script and calls
** luapool__mpi_end before it exits (the serving ranks are told to stop,
** then MPI_Finalize). */
int luapool__mpi_start(int *argc, char ***argv);
int luapool__mpi_serve(void);
void luapool__mpi_end(void);

/* What the plugin exports (mpi_plugin.c), and all the host uses of it:
** the three calls above and rank 0's engine (luapool__mpi_owner once MPI
** is up on rank 0).  abi and size tell a plugin with another layout of
** this struct apart, and build (CMake's LUAPOOL_BUILD_ID: the version and a
** digest of the headers and build options) a plugin of another build of the
** core, before any of it is called. */
#define LUAPOOL_MPI_PLUGIN_ABI 2
typedef struct lp_mpi_plugin {
  int abi;           /* LUAPOOL_MPI_PLUGIN_ABI */
  size_t size;       /* sizeof(lp_mpi_plugin) */
  const char *build; /* LUAPOOL_BUILD_ID */
  int (*start)(int *argc, char ***argv);
  int (*serve)(void);
  void (*end)(void);
  const lp_engine *owner;
} lp_mpi_plugin;
#define LUAPOOL_MPI_PLUGIN_SYMBOL "luapool_mpi_plugin"

#endif
