# dsmoe_bench_moe: one MoE layer on one rank against the best sgemm (native BLAS or the kernel plugin's) (bench/bench_moe.c,
# docs/moe-layer.md). Run it from the build tree: <build>/bin/dsmoe_bench_moe --threads 1
add_executable(dsmoe_bench_moe ${CMAKE_CURRENT_SOURCE_DIR}/bench_moe.c)
target_link_libraries(dsmoe_bench_moe PRIVATE dsmoe_core PkgConfig::OPENBLAS m)
add_dependencies(dsmoe_bench_moe dsmoe_kernel_cpu dsmoe_comm_mpi)
