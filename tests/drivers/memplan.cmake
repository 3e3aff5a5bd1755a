# The memory plan (core/drivers/memplan.c) against the real allocation (a counting kernel allocator around the cpu
# plugin, mpi comm), every rank checking its own numbers: 1 rank, and 4 ranks (EP and EDP groups,
# ZeRO-1 shards, a hierarchical all-to-all over pretend nodes of 2). Also hand counts and the paper's sizes.
foreach(ranks 1 4)
  dsmoe_test(test_memplan_np${ranks} SOURCES ${DSMOE_TEST_DIR}/drivers/test_memplan.c RANKS ${ranks} TIMEOUT 60 LIBS m)
  add_dependencies(test_memplan_np${ranks} dsmoe_kernel_cpu dsmoe_comm_mpi)
endforeach()
