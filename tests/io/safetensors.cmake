# The safetensors reader and writer (core/io/safetensors.c).
dsmoe_test(test_safetensors SOURCES ${DSMOE_TEST_DIR}/io/test_safetensors.c TIMEOUT 30 LABELS checkpoint)
