/*
** The engines every pool kind is made of (threadpool.c, processpool.c)
** and the process engine's worker-side entry points.  The module and the
** host name them; the pool core does not.
*/
#ifndef LUAPOOL_ENGINES_H
#define LUAPOOL_ENGINES_H

#include "core/executor.h"

extern const lp_backend luapool__thread_backend;
extern const lp_backend luapool__process_backend;

/* Process worker entry point (processpool.c): serve tasks on fd. */
int luapool__process_worker_main(int fd, const char *name, int index);
/* Path of an executable that can run `--worker` (processpool.c):
** $LUAPOOL_WORKER_EXE, else the host binary, else the luapool binary beside
** luapool.so, else the installed one. */
const char *luapool__worker_exe(void);
extern char *luapool__host_exe; /* set by the host binary (main.c) */

#endif
