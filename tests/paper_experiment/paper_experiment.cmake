# scripts/paper-experiment --quick (docs/paper-claims.md): every run of inputs/paper-claims/ for 4 steps, the
# plots and the report, whose tables check_report.py recomputes from the runs' metrics.csv, resolved.deck
# and logs (tests/paper_experiment/). Two single-rank runs at a time: the multi-rank lock. Skips (77)
# without gnuplot or python3.
add_test(NAME paper_experiment COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/paper_experiment_test.sh
         $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR})
set_tests_properties(paper_experiment PROPERTIES TIMEOUT 120 SKIP_RETURN_CODE 77 LABELS plot
                     RESOURCE_LOCK dsmoe_ranks ENVIRONMENT "DSMOE_PLUGIN_PATH=")
