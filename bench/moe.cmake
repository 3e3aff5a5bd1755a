# dsmoe_bench_moe: one MoE layer on one rank in float32 or bfloat16, against the best GEMM rate at that precision on
# the same expert shapes (the kernel plugin's gemm, native OpenBLAS for fp32, oneDNN matmul for bf16) (bench/bench_moe.c,
# docs/moe-layer.md). Run it from the build tree: <build>/bin/dsmoe_bench_moe --threads 1 --precision bf16
add_executable(dsmoe_bench_moe ${CMAKE_CURRENT_SOURCE_DIR}/bench_moe.c)
target_link_libraries(dsmoe_bench_moe PRIVATE dsmoe_core PkgConfig::OPENBLAS m)
if(DSMOE_CPU_ONEDNN)
  target_link_libraries(dsmoe_bench_moe PRIVATE dsmoe_bench_dnnl) # the bf16 reference (bench/CMakeLists.txt)
endif()
add_dependencies(dsmoe_bench_moe dsmoe_kernel_cpu dsmoe_comm_mpi)
# With the CUDA toolkit (the cuda plugin is built): NVTX ranges around the layer steps, for ncu and nsys
# (nvtx3 is header-only; without a tool attached its calls do nothing).
# CUDAToolkit_INCLUDE_DIRS may hold several directories (CUDA 13 adds its CCCL one): look in each.
find_path(DSMOE_NVTX3_DIR NAMES nvtx3/nvToolsExt.h HINTS ${CUDAToolkit_INCLUDE_DIRS} NO_DEFAULT_PATH)
if(DSMOE_BUILD_CUDA_PLUGIN AND DSMOE_NVTX3_DIR)
  target_include_directories(dsmoe_bench_moe PRIVATE ${DSMOE_NVTX3_DIR})
  target_compile_definitions(dsmoe_bench_moe PRIVATE DSMOE_BENCH_NVTX)
endif()
