/*
** What rank 0 and the serving ranks say to each other (mpi_owner.c,
** mpi_rank.c), and the MPI helpers both use.  Only with LUAPOOL_HAVE_MPI.
**
** Thread level: MPI_THREAD_SERIALIZED.  MPI is initialised on the host's
** first thread; on rank 0 every pool's progress thread (and the owner
** while a pool opens and closes) makes MPI calls, each under
** luapool__mpi_mu and each one non-blocking (Isend, Iprobe, Test; a
** Recv only of a message Iprobe has seen whole), so no thread holds the
** lock while it waits.  A serving rank makes them all on its one thread.
** Nobody waits inside MPI: Open MPI busy-polls a blocking call; the
** loops here sleep between polls instead (backoff, mpi_proto_idle).
**
** Messages to a serving rank (tag TAG_RANK), a type byte first:
**   M_OPEN  u32 byte-order mark (MPI_ORDER_MARK in the sender's order: a
**           rank of the other order refuses at once), u32 pool, u32 slots, u32 max_memory_mb, u32 max_tasks_per_child,
**           u32 hello length, hello (wire.c), u64 paths gen, path, cpath,
**           the pool's name (its local workers are NAME-1...), u32
**           initializer length, initializer message
**   M_TASK  u32 pool, u64 id, f64 timeout, u64 task number, i64 first item,
**           u32 calls, u64 paths gen, task message (the rest)
**   M_PATHS u32 pool, u64 gen, path, cpath (the next tasks' package paths)
**   M_INTERRUPT u32 pool (stop its running tasks now: Ctrl-C, a stop)
**   M_CANCEL u32 pool, u64 id (cancel it if it has not started: the answer
**           is its R_DONE, state cancelled, or R_KEPT)
**   M_CLOSE u32 pool (its tasks are done: the local pool goes)
**   M_STOP  [u8 1: answer R_STOPPED first] (the job ends: the rank
**           finalizes and exits 0)
** Messages to rank 0 (tag TAG_POOL(pool): each pool's thread takes its own):
**   R_OPENED string host, u32 pid        R_REFUSE string (its build)
**   R_FAILED string (it could not make the local pool)
**   R_DONE   u64 id, u8 state (0 finished: the reply bytes follow; else
**            1 + lp_ekind, then the message, u32 the call that failed a
**            chunk as a whole, from 1, or 0)
**   R_KEPT   u64 id, u8 0 (a cancel found it started, or done)
**   R_STOPPED (tag TAG_END: an M_STOP that asked was read)
*/
#ifndef LUAPOOL_MPI_PROTO_H
#define LUAPOOL_MPI_PROTO_H

#include <mpi.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "core/engine.h"

/* Rank 0's engine (mpi_owner.c), which mpipool.c hands its calls to. */
extern const lp_engine luapool__mpi_owner_engine;

enum { M_OPEN = 1, M_TASK, M_PATHS, M_INTERRUPT, M_CLOSE, M_STOP, M_CANCEL };
enum { R_OPENED = 1, R_REFUSE, R_FAILED, R_DONE, R_KEPT, R_STOPPED };

#define TAG_RANK       1
#define TAG_END        2
#define MPI_ORDER_MARK 0x01020304u
/* 32767 is the least MPI_TAG_UB the standard allows. */
#define TAG_POOL(id) (16 + (int)((id) % 32000u))

/* Every MPI call of the process is made under it (SERIALIZED). */
extern pthread_mutex_t luapool__mpi_mu;
extern int luapool__mpi_rank, luapool__mpi_size;
extern char luapool__mpi_host[256];

/* Sends still in flight: their buffers live until MPI is done with them. */
typedef struct mpi_send {
  MPI_Request req;
  char *buf;
  struct mpi_send *next;
} mpi_send;
typedef struct mpi_sends {
  mpi_send *head;
  int n;
} mpi_sends;

/* Sends buf[0..len) (malloc'd, taken: freed once sent, or here on
** failure) to rank dest with tag.  0, or -1 (too large, no memory, MPI
** error). */
int luapool__mpi_send(mpi_sends *s, int dest, int tag, char *buf, size_t len);
/* Frees the sends that completed; returns how many are left. */
int luapool__mpi_sends_test(mpi_sends *s);
/* Waits (sleeping) until every send completed or `until` (luapool__now)
** passed; what is left is cancelled.  Returns how many did not complete. */
int luapool__mpi_sends_wait(mpi_sends *s, double until);
/* Takes a whole message from src (MPI_ANY_SOURCE) with tag if one has
** arrived: 1 with *buf (malloc'd), *len and *from set; 0 none; -1 no
** memory or MPI error. */
int luapool__mpi_try_recv(int src, int tag, char **buf, size_t *len, int *from);

/* The pause of a polling loop that found nothing, `quiet` seconds after
** it last found something: a yield at first, then a sleep of an eighth of
** the quiet time, up to MPI_HOT_US microseconds while the loop is hot
** (quiet < MPI_HOT_WINDOW), and up to cap_us after.  A sleep proportional
** to the gap keeps a ping-pong between two polling loops at microseconds
** (a backoff counting polls would make each side's sleep grow with the
** other's, up to the cap).  The hot window keeps the next message of a
** burst of work (the next task of a job, its answer) within tens of
** microseconds of its arrival, where the proportional sleep alone would
** have grown to hundreds by then (a task of 1 ms: 125 us).  It costs a
** wake every 50 us for MPI_HOT_WINDOW after each message (a few percent of
** a core for a loop that gets a message every 20 ms or so); after it the
** sleep is an eighth of the quiet time again (1.25 ms), so an idle loop
** is at the cap as before.  luapool__mpi_pause returns the pause in
** seconds (0: a yield), luapool__mpi_idle takes it.
**
** Not while the loop's own work keeps the CPUs busy: on a host with fewer
** cores than processes (2 cores: rank 0, 2 ranks, their 2 workers), a
** thread that wakes every 50 us keeps the core it wakes on from ever
** being idle long enough for the scheduler to move a waiting process to
** it (Linux skips the new-idle balance while a core's average idle time is
** under its migration cost, 0.5 ms), so the ranks' workers queued behind
** each other on one core while the other one ran only the polls (session
** 21: perf sched showed the CPU job's two workers running one after the
** other in most jobs).  So rank 0's thread, with nothing queued that a
** freed slot would take, only backs off (luapool__mpi_backoff: an eighth of
** the quiet time, no hot window), and a serving rank whose slots are all
** busy polls MPI every MPI_BUSY_POLL_US (mpi_rank.c: a task that settles
** still wakes it at once). */
#define MPI_HOT_WINDOW   0.01
#define MPI_HOT_US       50u
#define MPI_BUSY_POLL_US 1000u
double luapool__mpi_pause(double quiet, unsigned cap_us);
double luapool__mpi_backoff(double quiet, unsigned cap_us);
void luapool__mpi_idle(double quiet, unsigned cap_us);

/* The host is ending (rank 0, before MPI_Finalize): every pool's progress
** thread leaves its loop at its next pass (a pool left open at exit, whose
** stop gave up on it, too).  Waits until none runs or `until`
** (luapool__now); returns how many still run.  mpi_owner.c. */
int luapool__mpi_owner_quit(double until);
/* A pool gave up a rank that did not answer (mpi_owner.c's give_up_rank):
** the job's end then checks that every rank still answers before
** MPI_Finalize, which would wait for good for one that does not. */
extern atomic_int luapool__mpi_gave_up;

/* "rank 2 of 3 on host" for rank r (buf of at least 300 bytes), host
** being r's (given) or this process's (NULL). */
void luapool__mpi_rank_name(char *buf, size_t n, int r, const char *host);

#endif
