# The cpu kernel plugin (plugins/cpu), tested through its table: each program dlopens the built plugin
# from the build tree as the core does (tests/cpu_plugin_test.h) and links no core library, so these
# build and run while the core does not. test_cpu_ops: table, memory, queues, errors, GEMM, element-wise
# ops, AdamW; test_cpu_threads: the compute threads' count, results independent of it, pinning;
# test_cpu_ops_layers: GPT layer ops and the inference ops; test_cpu_ops_grouped: grouped
# GEMMs with epilogues and weight gradients; test_cpu_distill: the distillation pair (docs/distill.md);
# test_cpu_simd: the GELU kernels of the `simd` setting, bitwise the same in both vector widths.
foreach(t test_cpu_ops test_cpu_threads test_cpu_ops_layers test_cpu_ops_grouped test_cpu_distill test_cpu_simd)
  add_executable(${t} ${CMAKE_CURRENT_LIST_DIR}/${t}.c)
  set_target_properties(${t} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  target_include_directories(${t} PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
  target_compile_definitions(${t} PRIVATE DSMOE_BUILD_PLUGIN_DIRS="${DSMOE_BUILD_PLUGIN_DIR}")
  # OpenMP: test_cpu_threads looks at the plugin's threads (test_thread_pinning).
  target_link_libraries(${t} PRIVATE PkgConfig::CMOCKA OpenMP::OpenMP_C m ${CMAKE_DL_LIBS})
  add_dependencies(${t} dsmoe_kernel_cpu)
  add_test(NAME ${t} COMMAND ${t})
  set_tests_properties(${t} PROPERTIES TIMEOUT 120 LABELS cpu ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=")
endforeach()
