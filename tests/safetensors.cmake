# The safetensors reader and writer (core/io/safetensors.c).
dsmoe_test(test_safetensors SOURCES test_safetensors.c TIMEOUT 30 LABELS checkpoint)
