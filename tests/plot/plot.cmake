# scripts/plot (docs/plots.md): the plots of a metrics file the test writes with known values, the
# "skipped" lines, the errors for malformed files (tests/plot/plot_test.sh), and the plots of a 5-step
# quickstart run (plot_run_test.sh). Both skip (77) without gnuplot (Debian: gnuplot-nox) or python3.
add_test(NAME plot COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/plot_test.sh ${PROJECT_SOURCE_DIR})
add_test(NAME plot_run COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/plot_run_test.sh $<TARGET_FILE:dsmoe>
         ${PROJECT_SOURCE_DIR})
set_tests_properties(plot plot_run PROPERTIES TIMEOUT 120 SKIP_RETURN_CODE 77 LABELS plot)
