/*
** The engines (the files of engines/) and the one table the module walks to make a
** constructor for each (luapool.threadpool, ...).  Adding an engine: its
** file, its lp_engine, a line in engines.c.
*/
#ifndef LUAPOOL_ENGINES_H
#define LUAPOOL_ENGINES_H

#include "core/engine.h"

extern const lp_engine luapool__thread_engine;
extern const lp_engine luapool__process_engine;
extern const lp_engine luapool__io_engine;  /* iopool.c */
extern const lp_engine luapool__mpi_engine; /* mpipool.c */
/* Every engine, ended by NULL. */
extern const lp_engine *const luapool__engines[];

/* Process worker entry point (processpool.c): serve tasks on fd. */
int luapool__process_worker_main(int fd, const char *name, int index);
/* In a worker of a serving MPI rank: "RANK SIZE HOST"; else NULL. */
const char *luapool__mpi_identity(void);
/* Path of an executable that can run `--worker` (processpool.c):
** $LUAPOOL_WORKER_EXE, else the host binary, else the luapool binary beside
** luapool.so, else the installed one. */
const char *luapool__worker_exe(void);
extern char *luapool__host_exe; /* set by the host binary (main.c) */

#endif
