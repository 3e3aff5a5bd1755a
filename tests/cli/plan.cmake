# dsmoe --plan end to end (tests/cli/plan_test.sh): hand-computed placement, memory and all-to-all numbers
# on inputs/topologies/test-4gpu.xml, refusals with their numbers, and the paper's decks (inputs/paper/).
add_test(NAME plan COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/plan_test.sh $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR})
set_tests_properties(plan PROPERTIES TIMEOUT 120 LABELS cli)
