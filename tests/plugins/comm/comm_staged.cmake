# The core's host staging adapter (core/plugins/comm_staged.c) over the mpi plugin with a kernel plugin
# whose host crossings are counted: one-member groups stage nothing, larger ones still go through the
# host. On 1 and 2 ranks.
foreach(ranks 1 2)
  dsmoe_test(test_comm_staged_np${ranks} SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_comm_staged.c RANKS ${ranks}
             TIMEOUT 60 LABELS comm)
  add_dependencies(test_comm_staged_np${ranks} dsmoe_kernel_cpu dsmoe_comm_mpi)
endforeach()
