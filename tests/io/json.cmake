# The JSON reader and writer shared by safetensors, the tokenizer and the prompt file (core/io/json.c).
dsmoe_test(test_json SOURCES ${DSMOE_TEST_DIR}/io/test_json.c TIMEOUT 30 LABELS text)
