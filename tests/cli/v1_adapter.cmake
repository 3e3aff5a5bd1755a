# A training run through the v1 kernel adapter (the cpu plugin of ABI 1, tests/plugins/loader/cpu_v1, built by
# tests/plugins/loader/loader.cmake) is bitwise the run of the v2 cpu plugin, and a 2-rank run through the v1
# comm adapter (the mpi plugin of ABI 1, tests/plugins/loader/mpi_v1) bitwise the run of the v2 mpi plugin:
# metrics and checkpoints (tests/cli/v1_adapter_test.sh).
if(TARGET dsmoe)
  add_test(NAME v1_adapter COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/v1_adapter_test.sh $<TARGET_FILE:dsmoe>
           ${PROJECT_SOURCE_DIR} ${DSMOE_CPU_V1_DIR} ${DSMOE_MPI_V1_DIR} ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
  set_tests_properties(v1_adapter PROPERTIES TIMEOUT 300 LABELS "cli;mpi" RESOURCE_LOCK dsmoe_ranks)
endif()
