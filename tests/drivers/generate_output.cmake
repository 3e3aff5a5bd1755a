# Where a completion ends (core/drivers/generate_output.c): before the earliest match of any stop sequence.
dsmoe_test(test_generate_output SOURCES ${DSMOE_TEST_DIR}/drivers/test_generate_output.c TIMEOUT 30 LABELS inference)
