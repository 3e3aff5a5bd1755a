# bfloat16 in the cpu kernel plugin (tests/plugins/kernel/test_cpu_bf16.c): conversions against a reference written from
# the definition, bf16 GEMMs / grouped GEMMs / weight gradients against double loops, bitwise thread
# independence. Run twice: as the machine is (oneDNN on AVX512-BF16 / AMX when built with it), and with
# oneDNN held below its bf16 ISA, so that the emulated GEMMs (float32 OpenBLAS) are tested everywhere.
add_executable(test_cpu_bf16 ${CMAKE_CURRENT_LIST_DIR}/test_cpu_bf16.c)
set_target_properties(test_cpu_bf16 PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_cpu_bf16 PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
if(DSMOE_CPU_ONEDNN)
  set(dsmoe_test_onednn 1)
else()
  set(dsmoe_test_onednn 0)
endif()
target_compile_definitions(test_cpu_bf16 PRIVATE DSMOE_BUILD_PLUGIN_DIRS="${DSMOE_BUILD_PLUGIN_DIR}"
                           DSMOE_TEST_ONEDNN=${dsmoe_test_onednn})
target_link_libraries(test_cpu_bf16 PRIVATE PkgConfig::CMOCKA m ${CMAKE_DL_LIBS})
add_dependencies(test_cpu_bf16 dsmoe_kernel_cpu)
add_test(NAME test_cpu_bf16 COMMAND test_cpu_bf16)
add_test(NAME test_cpu_bf16_emulated COMMAND test_cpu_bf16)
set_tests_properties(test_cpu_bf16 PROPERTIES TIMEOUT 300 LABELS cpu
                     ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;DSMOE_TEST_BF16_PATH=auto")
set_tests_properties(test_cpu_bf16_emulated PROPERTIES TIMEOUT 300 LABELS cpu
                     ENVIRONMENT
                     "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;DSMOE_TEST_BF16_PATH=emulated;ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI")

# The bf16 ops that read bfloat16 rows in place (layer norm, bias, axpy, the loss, attention, MoE dispatch
# and combine, the KV cache, cached attention): the plugin's float32 op on the widened values, rounded,
# bit for bit, on 1 and 2 threads.
add_executable(test_cpu_bf16_rows ${CMAKE_CURRENT_LIST_DIR}/test_cpu_bf16_rows.c)
set_target_properties(test_cpu_bf16_rows PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_cpu_bf16_rows PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
target_compile_definitions(test_cpu_bf16_rows PRIVATE DSMOE_BUILD_PLUGIN_DIRS="${DSMOE_BUILD_PLUGIN_DIR}")
target_link_libraries(test_cpu_bf16_rows PRIVATE PkgConfig::CMOCKA m ${CMAKE_DL_LIBS})
add_dependencies(test_cpu_bf16_rows dsmoe_kernel_cpu)
add_test(NAME test_cpu_bf16_rows COMMAND test_cpu_bf16_rows)
set_tests_properties(test_cpu_bf16_rows PROPERTIES TIMEOUT 120 LABELS cpu
                     ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=")
