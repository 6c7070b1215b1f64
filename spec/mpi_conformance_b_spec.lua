-- Part b of the conformance suite on mpipool under `mpiexec -n 3`
-- (spec/mpi_conformance.lua says how, and which specs each part runs).
require("mpi_conformance").describe_part("b", 140, _ENV)
