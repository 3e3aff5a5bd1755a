# Output failures end to end (tests/cli/save_fail_test.sh): failed checkpoint saves go on, then exit 74
# after checkpoint.max_failures in a row or a failed final save; metrics.file = /dev/full exits 73 after
# a complete run; an unopenable metrics file names the reason. On 1 and 2 ranks.
add_test(NAME save_fail COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/save_fail_test.sh $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR}
                                ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(save_fail PROPERTIES TIMEOUT 300 LABELS cli RESOURCE_LOCK dsmoe_ranks)
