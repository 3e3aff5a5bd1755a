# The datasets: synthetic chains and their loss bound, text files, Megatron .bin/.idx (core/io/data.c).
dsmoe_test(test_data SOURCES ${DSMOE_TEST_DIR}/io/test_data.c TIMEOUT 60 LABELS data)
