# The "mpi" comm plugin, loaded through the loader from the build tree, on 1, 2 and 4 ranks.
foreach(ranks 1 2 4)
  dsmoe_test(test_comm_mpi_np${ranks} SOURCES ${DSMOE_TEST_DIR}/test_comm_mpi.c RANKS ${ranks} TIMEOUT 30)
  add_dependencies(test_comm_mpi_np${ranks} dsmoe_comm_mpi)
endforeach()
