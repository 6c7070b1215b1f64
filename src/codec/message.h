/*
** The task message and reply formats' constants, shared by whoever writes
** them (the pool's submit, worker.c) and whoever reads them (worker.c, the
** future's outcome, the initializer check).  worker.c describes the
** format.  Header only, no dependency.
*/
#ifndef LUAPOOL_MESSAGE_H
#define LUAPOOL_MESSAGE_H

/* Task message kinds. */
enum { LP_MSG_SINGLE = 1, LP_MSG_BATCH = 2 };
/* Reply status byte per call. */
enum { LP_REPLY_OK = 0, LP_REPLY_ERROR = 1, LP_REPLY_TRANSFER = 2, LP_REPLY_TIMEOUT = 3 };
/* In the reply header (the count of failed calls): values went by name. */
#define LP_REPLY_NAMED 0x80000000u

#endif
