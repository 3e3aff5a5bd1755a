# The dsmoe command end to end: options, error messages and exit codes, outputs of a short run.
add_test(NAME cli COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/cli_test.sh $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR})
set_tests_properties(cli PROPERTIES TIMEOUT 300 LABELS cli)
