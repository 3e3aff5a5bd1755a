# Gating, dispatch and combine of the cpu kernel plugin (plugins/cpu/cpu_gating.c), compiled into the
# test and called directly, with the plugin's own optimisation flags.
dsmoe_test(test_gating
  SOURCES ${PROJECT_SOURCE_DIR}/tests/test_gating.c ${PROJECT_SOURCE_DIR}/plugins/cpu/cpu_gating.c
  LIBS OpenMP::OpenMP_C m
  TIMEOUT 60
  LABELS cpu gating)
target_include_directories(test_gating PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/plugins/cpu)
target_compile_options(test_gating PRIVATE -O3 -march=x86-64-v3)
