# The safetensors reader and writer (core/safetensors.c).
dsmoe_test(test_safetensors SOURCES test_safetensors.c TIMEOUT 30 LABELS checkpoint)
