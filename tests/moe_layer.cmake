# The MoE layer (core/moe_layer.c) through the cpu kernel and mpi comm plugins loaded from the build
# tree: naive reference and finite differences on 1 rank, expert parallelism (ep = ranks) on 2 and 4.
foreach(ranks 1 2 4)
  dsmoe_test(test_moe_layer_np${ranks} SOURCES ${DSMOE_TEST_DIR}/test_moe_layer.c RANKS ${ranks} TIMEOUT 60
             LIBS m LABELS moe)
  add_dependencies(test_moe_layer_np${ranks} dsmoe_kernel_cpu dsmoe_comm_mpi)
endforeach()
