# run.mode = generate end to end (tests/cli/generate_test.sh): greedy tokens equal on 1 and 4 ranks (ep 4,
# ep 2 x data 2, hierarchical all-to-all) and any batch; seeded sampling independent of batch and rank;
# the JSON-lines output; stop sequences; bad input refused before any work.
add_test(NAME generate COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/cli/generate_test.sh $<TARGET_FILE:dsmoe>
                               ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(generate PROPERTIES TIMEOUT 600 LABELS "cli;inference" RESOURCE_LOCK dsmoe_ranks)
# The layouts run on the JSON-lines prompts, and one of them on the text prompts (whose parsing runs in
# the reference generation before them); DSMOE_GENERATE_LAYOUT_FORMATS="txt jsonl" runs all on both.
