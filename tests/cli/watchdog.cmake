# run.watchdog end to end (tests/cli/watchdog_test.sh): a stopped rank ends the job with exit code 70 and a
# message naming the phase and step; healthy runs are not disturbed.
add_test(NAME watchdog COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/watchdog_test.sh $<TARGET_FILE:dsmoe>
                               ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(watchdog PROPERTIES TIMEOUT 180 LABELS cli RUN_SERIAL TRUE)
