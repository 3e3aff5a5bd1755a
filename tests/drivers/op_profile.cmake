# The per-call profile (core/plugins/op_profile.c) and train.profile, through the cpu and mpi plugins, on
# 1 rank and on 2 (every rank's rows merged on rank 0).
foreach(ranks 1 2)
  dsmoe_test(test_op_profile_np${ranks} SOURCES ${DSMOE_TEST_DIR}/drivers/test_op_profile.c RANKS ${ranks} TIMEOUT 120
             LIBS m)
  add_dependencies(test_op_profile_np${ranks} dsmoe_kernel_cpu dsmoe_comm_mpi)
endforeach()
