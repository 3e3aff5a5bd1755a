# A stopped generation's <output>.partial (core/drivers/generate_partial.c) read back against a prompt
# file: the header and kept lines as written, each kind of damage or mismatch refused with its message.
dsmoe_test(test_generate_partial SOURCES ${DSMOE_TEST_DIR}/drivers/test_generate_partial.c TIMEOUT 30 LABELS inference)
