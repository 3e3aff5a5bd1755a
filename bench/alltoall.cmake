# dsmoe_bench_alltoall: flat against hierarchical all-to-all (core/parallel/exchange.c, docs/exchange.md) with real
# or pretend nodes. Run it from the build tree, e.g. on 8 ranks as 4 pretend nodes:
#   mpiexec -n 8 <build>/bin/dsmoe_bench_alltoall --ranks-per-node 2
add_executable(dsmoe_bench_alltoall ${CMAKE_CURRENT_SOURCE_DIR}/bench_alltoall.c)
target_link_libraries(dsmoe_bench_alltoall PRIVATE dsmoe_core m)
add_dependencies(dsmoe_bench_alltoall dsmoe_kernel_cpu dsmoe_comm_mpi)
