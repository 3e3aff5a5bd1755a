# Expert + data parallel equivalences and failure handling (dsmoe under mpiexec, 1-8 ranks).
add_executable(ckpt_compare ${CMAKE_CURRENT_LIST_DIR}/ckpt_compare.c)
target_link_libraries(ckpt_compare PRIVATE dsmoe_core)
set_target_properties(ckpt_compare PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
add_test(NAME parallel COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/parallel_test.sh
         $<TARGET_FILE:dsmoe> $<TARGET_FILE:ckpt_compare> ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(parallel PROPERTIES TIMEOUT 900 LABELS "parallel;mpi" RESOURCE_LOCK dsmoe_ranks)
