# The prompt file of run.mode = generate (core/io/prompts.c): text and JSON lines, defaults, the context
# limit, and every error with its file:line.
dsmoe_test(test_prompts SOURCES ${DSMOE_TEST_DIR}/io/test_prompts.c TIMEOUT 30 LABELS text)
