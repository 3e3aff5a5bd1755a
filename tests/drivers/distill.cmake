# Knowledge distillation (Mixture-of-Students, docs/distill.md) through the training driver: beta = 0 is
# plain training bitwise, a student equal to its teacher has KL 0, alpha = 0 drives KL down, staged KD
# stops, resume mid-distillation is bitwise, bad teachers are refused. (The plugin ops: test_cpu_distill,
# in cpu_ops.cmake.)
dsmoe_test(test_distill SOURCES ${DSMOE_TEST_DIR}/drivers/test_distill.c TIMEOUT 300 LIBS m)
add_dependencies(test_distill dsmoe_kernel_cpu dsmoe_comm_mpi)
