/*
** The engine table (engines.h): the module makes one constructor per entry,
** the option reader looks up other engines' options here to say where an
** option belongs.
*/
#include <stddef.h>

#include "engines/engines.h"

const lp_engine *const luapool__engines[] = {
    &luapool__thread_engine,
    &luapool__process_engine,
    &luapool__io_engine,
    &luapool__mpi_engine,
    NULL,
};
