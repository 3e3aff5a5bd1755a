# dsmoe_bench_gemm: the cpu kernel plugin's grouped GEMM stages of an MoE expert FFN (forward and backward)
# in float32 and bfloat16, against OpenBLAS / oneDNN on the same shapes (bench/bench_gemm.c,
# docs/performance.md). It loads the plugin with dlopen (no core library). From the build tree:
#   <build>/bin/dsmoe_bench_gemm --threads 1 --precision both
add_executable(dsmoe_bench_gemm ${CMAKE_CURRENT_SOURCE_DIR}/bench_gemm.c)
target_include_directories(dsmoe_bench_gemm PRIVATE ${PROJECT_SOURCE_DIR}/include)
target_compile_definitions(dsmoe_bench_gemm PRIVATE DSMOE_BENCH_PLUGIN_DIR="${DSMOE_BUILD_PLUGIN_DIR}")
target_link_libraries(dsmoe_bench_gemm PRIVATE PkgConfig::OPENBLAS OpenMP::OpenMP_C m ${CMAKE_DL_LIBS})
if(DSMOE_CPU_ONEDNN)
  target_link_libraries(dsmoe_bench_gemm PRIVATE dsmoe_bench_dnnl) # the bf16 reference (bench/CMakeLists.txt)
endif()
add_dependencies(dsmoe_bench_gemm dsmoe_kernel_cpu)
