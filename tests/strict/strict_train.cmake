# The whole training path on the strict asynchronous kernel plugin, bitwise against the cpu plugin
# (tests/strict/strict_train.sh): 1, 2 and 4 ranks, ep, ZeRO-1, overlap, dropless, residual, PR-MoE,
# hierarchical all-to-all, jitter, bf16, eval, checkpoint save and resume; host-progressed and stream-ordered
# comm plugins, host staging, and mpi_cuda under the fake CUDA-aware MPI. Skips (77) when the strict plugin
# was not built.
add_test(NAME strict_train COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/strict_train.sh
         $<TARGET_FILE:dsmoe> ${CMAKE_BINARY_DIR}/tests/plugins ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(strict_train PROPERTIES TIMEOUT 900 LABELS "strict;mpi" RESOURCE_LOCK dsmoe_ranks SKIP_RETURN_CODE 77)
# Under the sanitizers, 4 of its 12 configurations: ordering is the subject here and the plain build
# checks every configuration; the sanitized build looks for memory errors, and these 4 take the paths
# the others add (4 ranks with ZeRO-1 and overlap, dropless top-2, PR-MoE, bf16, mpi_cuda).
if(DSMOE_SANITIZE)
  set_property(TEST strict_train APPEND PROPERTY ENVIRONMENT "STRICT_ONLY=ep2_zero1 dropless_top2 pyramid bf16_ep2_zero1")
endif()
# ... and it can fail: dropping events or copies in the strict plugin must make it report differences.
add_test(NAME strict_break COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/strict_break.sh
         ${CMAKE_CURRENT_LIST_DIR}/strict_train.sh $<TARGET_FILE:dsmoe> ${CMAKE_BINARY_DIR}/tests/plugins
         ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(strict_break PROPERTIES TIMEOUT 300 LABELS "strict;mpi" RESOURCE_LOCK dsmoe_ranks SKIP_RETURN_CODE 77)
