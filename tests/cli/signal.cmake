# Walltime signals end to end (tests/cli/signal_test.sh): SIGUSR1/SIGTERM mid-run on 1 and 2 ranks (to the
# process, to mpiexec, to one rank), exit code 75, the checkpoint of the named step, a bit-exact resume
# with every metrics row once; a second signal's 76; rows after the checkpoint dropped on resume.
add_test(NAME signal COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/signal_test.sh $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR}
                             ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
# Its waits are timed: it runs alone (RUN_SERIAL), as the other timed multi-rank scripts do.
set_tests_properties(signal PROPERTIES TIMEOUT 300 LABELS cli RUN_SERIAL TRUE)
