# The per-call profile (core/plugins/op_profile.c) and train.profile, through the cpu and mpi plugins.
dsmoe_test(test_op_profile SOURCES ${DSMOE_TEST_DIR}/drivers/test_op_profile.c TIMEOUT 120 LIBS m)
add_dependencies(test_op_profile dsmoe_kernel_cpu dsmoe_comm_mpi)
