# The EP all-to-all (core/parallel/exchange.c): flat and hierarchical against MPI_Alltoall and the payload
# formula, and the variable exchange of rows (inference) against the formula, with pretend nodes
# (ranks_per_node 1, 2, 4, 8), through the cpu kernel and mpi comm plugins.
foreach(ranks 4 8)
  dsmoe_test(test_exchange_np${ranks} SOURCES ${DSMOE_TEST_DIR}/parallel/test_exchange.c RANKS ${ranks} TIMEOUT 60
             LABELS exchange)
  add_dependencies(test_exchange_np${ranks} dsmoe_kernel_cpu dsmoe_comm_mpi)
endforeach()
