/*
** The mpipool engine entry (mpipool.h): in every build and in the module,
** so that its options are checked like any pool's and mpipool.new says
** how to launch when it cannot run here.  Rank 0 of `luapool --mpi` has
** the real engine (mpi_owner.c, linked into the host with MPI only); this
** entry hands every call to it.
*/
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/pool.h"
#include "engines/engines.h"
#include "engines/mpipool.h"

const lp_engine *luapool__mpi_owner = NULL;
const char *luapool__mpi_absent = NULL;

static int mpi_open(lp_pool *p, char *err, size_t errsz) {
  if (luapool__mpi_owner) return luapool__mpi_owner->open(p, err, errsz);
#ifndef LUAPOOL_HAVE_MPI
  snprintf(err, errsz,
           "mpipool: this build of luapool has no MPI (CMake found none: install Open MPI's "
           "libopenmpi-dev and rebuild); with MPI, run `%s`",
           LUAPOOL_MPI_LAUNCH);
#else
  if (luapool__mpi_absent)
    snprintf(err, errsz, "mpipool: %s", luapool__mpi_absent);
  else
    snprintf(err, errsz,
             "mpipool: not in an MPI launch (mpipool runs in the luapool host, not in the "
             "module or a worker): run `%s`",
             LUAPOOL_MPI_LAUNCH);
#endif
  return -1;
}

/* The others are only called once open succeeded, so the owner exists. */
static int mpi_queued(lp_pool *p, char *err, size_t errsz) {
  return luapool__mpi_owner->queued(p, err, errsz);
}
static int mpi_cancel(lp_pool *p, lp_future *f) {
  return luapool__mpi_owner->cancel ? luapool__mpi_owner->cancel(p, f) : 0;
}
static void mpi_interrupt(lp_pool *p) { luapool__mpi_owner->interrupt(p); }
static int mpi_stop(lp_pool *p, int interrupt, int wait) {
  return luapool__mpi_owner->stop(p, interrupt, wait);
}
static void mpi_free(lp_pool *p) { luapool__mpi_owner->free(p); }
static void mpi_stats(lp_pool *p, int *workers, int *idle) {
  luapool__mpi_owner->stats(p, workers, idle);
}

/* Every serving rank (the owner sets it; 1 elsewhere: open refuses). */
static int mpi_default_workers(int ncpu) {
  (void)ncpu;
  return luapool__mpi_owner ? luapool__mpi_owner->default_workers(ncpu) : 1;
}

static void mpi_defaults(void *config) {
  mpi_config *c = config;
  c->slots = 1;
  c->prefetch = 64;
}

static const char *const crash_choices[] = {"replace", "break", NULL};

static const lp_option mpi_options[] = {
    {.name = "slots",
     .type = LP_OPT_INT,
     .min = 1,
     .max = 4096,
     .offset = offsetof(mpi_config, slots)},
    {.name = "prefetch",
     .type = LP_OPT_INT,
     .min = 0,
     .max = 4096,
     .offset = offsetof(mpi_config, prefetch)},
    {.name = "on_crash",
     .per_process = 1,
     .type = LP_OPT_CHOICE,
     .choices = crash_choices,
     .offset = offsetof(mpi_config, on_crash_break)},
    {.name = "max_tasks_per_child",
     .per_process = 1,
     .type = LP_OPT_INT,
     .min = 1,
     .max = INT32_MAX,
     .offset = offsetof(mpi_config, max_tasks_per_child)},
    {.name = "max_memory_mb",
     .per_process = 1,
     .type = LP_OPT_INT,
     .min = 1,
     .max = INT32_MAX,
     .offset = offsetof(mpi_config, max_memory_mb)},
    {.name = NULL},
};

const lp_engine luapool__mpi_engine = {
    .kind = "mpipool",
    .options = mpi_options,
    .config_size = sizeof(mpi_config),
    .config_defaults = mpi_defaults,
    .default_workers = mpi_default_workers,
    .chunking = 1,
    .open = mpi_open,
    .queued = mpi_queued,
    .cancel = mpi_cancel,
    .interrupt = mpi_interrupt,
    .stop = mpi_stop,
    .free = mpi_free,
    .stats = mpi_stats,
};
