/*
** Running a task message in a worker (worker.c): every call, its reply.
*/
#ifndef LUAPOOL_WORKER_H
#define LUAPOOL_WORKER_H

#include <stddef.h>

#include "base/buf.h"
#include "codec/message.h"
#include "worker/wstate.h"

/* Runs every call of msg, appending the reply to out.  Returns 0, or -1 when
** out of memory (the caller fails the future). */
int luapool__run_message(lp_wstate *ws, const char *msg, size_t len, lp_buf *out);

#endif
