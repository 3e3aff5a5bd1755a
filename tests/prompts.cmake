# The prompt file of run.mode = generate (core/io/prompts.c): text and JSON lines, defaults, the context
# limit, and every error with its file:line.
dsmoe_test(test_prompts SOURCES test_prompts.c TIMEOUT 30 LABELS text)
