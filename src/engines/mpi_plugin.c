/*
** The entry of the MPI plugin (luapool-mpi.so, engines/mpipool.h): the one
** symbol it exports, luapool_mpi_plugin, that host/main.c looks up after
** dlopen for `luapool --mpi`.  Everything else of the plugin (mpi_owner.c,
** mpi_rank.c) is local to it (the plugin's link exports this symbol alone),
** and the core's functions it calls are the host's own.
*/
#include "engines/mpi_proto.h"
#include "engines/mpipool.h"

extern const lp_mpi_plugin luapool_mpi_plugin; /* (-Wmissing-variable-declarations) */
__attribute__((visibility("default"))) const lp_mpi_plugin luapool_mpi_plugin = {
    .abi = LUAPOOL_MPI_PLUGIN_ABI,
    .size = sizeof(lp_mpi_plugin),
#ifdef LUAPOOL_TEST_OTHER_BUILD /* spec/startup_spec.lua's plugin of another build */
    .build = "0.0.0+0000000000000000",
#else
    .build = LUAPOOL_BUILD_ID,
#endif
    .start = luapool__mpi_start,
    .serve = luapool__mpi_serve,
    .end = luapool__mpi_end,
    .owner = &luapool__mpi_owner_engine,
};
