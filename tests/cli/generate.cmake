# run.mode = generate end to end (tests/cli/generate_test.sh): greedy tokens equal on 1 to 8 ranks (ep,
# ep x data, hierarchical all-to-all, tensor and expert slicing) and any batch, in fp32 and bf16; seeded
# sampling independent of batch and rank; the log's summary against the output.
add_test(NAME generate COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/generate_test.sh $<TARGET_FILE:dsmoe>
                               ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(generate PROPERTIES TIMEOUT 600 LABELS "cli;inference" RESOURCE_LOCK dsmoe_ranks)
# The layouts run on the JSON-lines prompts, and one of them on the text prompts (whose parsing runs in
# the reference generation before them); DSMOE_TEST_LAYOUT_FORMATS="txt jsonl" runs all on both.

# The same on one rank, the files in and out (tests/cli/generate_io_test.sh): the JSON-lines output, the
# prompts' own settings, stop sequences, --check, the GPT-2 BPE tokenizer, bad input refused before any
# work. One rank: no lock, so it runs beside the multi-rank tests.
add_test(NAME generate_io COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/generate_io_test.sh $<TARGET_FILE:dsmoe>)
set_tests_properties(generate_io PROPERTIES TIMEOUT 300 LABELS "cli;inference")

# A generation stopped by a walltime signal and resumed (tests/cli/generate_signal_test.sh): exit 75, the
# finished completions in <output>.partial, a resume on another layout that writes the uninterrupted
# run's output; resumes with another checkpoint, prompt file or a damaged .partial refused. Its waits
# are timed: it runs alone (RUN_SERIAL).
add_test(NAME generate_signal COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/generate_signal_test.sh $<TARGET_FILE:dsmoe>
                                      ${PROJECT_SOURCE_DIR} ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(generate_signal PROPERTIES TIMEOUT 300 LABELS "cli;inference" RUN_SERIAL TRUE)
