# dsmoe_bench_decode: decode steps of the inference forward (core/model/model_infer.c) against the memory-bandwidth
# bound measured in the same run (bench/bench_decode.c, docs/performance.md#decode). Run it from the build tree:
# <build>/bin/dsmoe_bench_decode --layers 4 --hidden 1024 --heads 16 --experts 8 --batch 1 --threads 1
# bench_bandwidth.c: the bandwidth of the bound, a host triad or a copy through the plugin (device memory).
add_executable(dsmoe_bench_decode ${CMAKE_CURRENT_SOURCE_DIR}/bench_decode.c ${CMAKE_CURRENT_SOURCE_DIR}/bench_bandwidth.c)
target_link_libraries(dsmoe_bench_decode PRIVATE dsmoe_core PkgConfig::OPENBLAS OpenMP::OpenMP_C m)
# -O3 and the host CPU flags: the triad and the hand reference loop must be vectorised to run at memory speed.
target_compile_options(dsmoe_bench_decode PRIVATE -O3 ${DSMOE_CPU_ARCH_FLAGS})
add_dependencies(dsmoe_bench_decode dsmoe_kernel_cpu dsmoe_comm_mpi)
