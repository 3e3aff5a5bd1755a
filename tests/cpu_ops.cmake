# The cpu kernel plugin's dense ops (GEMM, element-wise, GPT layer ops, AdamW). The test dlopens the
# built plugin from the build tree, as the core does, so it depends on the plugin target.
dsmoe_test(test_cpu_ops SOURCES ${DSMOE_TEST_DIR}/test_cpu_ops.c TIMEOUT 60 LABELS cpu)
add_dependencies(test_cpu_ops dsmoe_kernel_cpu)
target_link_libraries(test_cpu_ops PRIVATE OpenMP::OpenMP_C) # test_thread_pinning looks at the plugin's threads
