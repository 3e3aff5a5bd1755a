# Fuzz targets (DSMOE_FUZZ=ON, clang; cmake/sanitize.cmake, docs/testing.md). Every tests/fuzz/fuzz_<name>.c
# defines LLVMFuzzerTestOneInput and becomes the program tests/fuzz/fuzz_<name> and the ctest test
# fuzz_<name>: DSMOE_FUZZ_SECONDS of fuzzing from a temporary copy of the seeds in tests/fuzz/seeds/<name>/
# (and of the files in the directories DSMOE_FUZZ_SEEDS_<name> lists); a finding fails the test and
# leaves its input in <build>/tests/fuzz/artifacts/<name>/. A new target needs only its file and seeds.

# The sanitized build's environment for every test, and its self-check (DSMOE_SANITIZE).
include(${DSMOE_TEST_DIR}/sanitize/sanitize.cmake)

if(NOT DSMOE_FUZZ)
  return()
endif()

# Seeds the repository holds anyway, read in place (so they never go stale); scripts/fuzz lists the same.
set(DSMOE_FUZZ_SEEDS_deck ${DSMOE_TEST_DIR}/decks ${PROJECT_SOURCE_DIR}/inputs ${PROJECT_SOURCE_DIR}/inputs/paper)

# The code under test, built again with coverage for libFuzzer and the sanitizers (dsmoe_core itself and
# the rest of the suite stay as configured).
get_target_property(dsmoe_fuzz_sources dsmoe_core SOURCES)
get_target_property(dsmoe_fuzz_includes dsmoe_core INCLUDE_DIRECTORIES)
get_target_property(dsmoe_fuzz_definitions dsmoe_core COMPILE_DEFINITIONS)
get_target_property(dsmoe_fuzz_libs dsmoe_core LINK_LIBRARIES)
add_library(dsmoe_fuzz_core STATIC ${dsmoe_fuzz_sources})
target_include_directories(dsmoe_fuzz_core PUBLIC ${dsmoe_fuzz_includes})
target_compile_definitions(dsmoe_fuzz_core PRIVATE ${dsmoe_fuzz_definitions})
target_link_libraries(dsmoe_fuzz_core PUBLIC ${dsmoe_fuzz_libs})
target_compile_options(dsmoe_fuzz_core PRIVATE ${DSMOE_FUZZ_LIB_FLAGS})

file(GLOB DSMOE_FUZZ_TARGETS CONFIGURE_DEPENDS ${DSMOE_TEST_DIR}/fuzz/fuzz_*.c)
list(SORT DSMOE_FUZZ_TARGETS)
foreach(src ${DSMOE_FUZZ_TARGETS})
  get_filename_component(target ${src} NAME_WE)
  string(REGEX REPLACE "^fuzz_" "" name ${target})
  add_executable(${target} ${src})
  set_target_properties(${target} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests/fuzz)
  target_link_libraries(${target} PRIVATE dsmoe_fuzz_core)
  target_compile_options(${target} PRIVATE ${DSMOE_FUZZ_EXE_FLAGS})
  target_link_options(${target} PRIVATE ${DSMOE_FUZZ_EXE_FLAGS})
  target_compile_definitions(${target} PRIVATE DSMOE_TEST_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  add_test(NAME ${target}
           COMMAND bash ${DSMOE_TEST_DIR}/fuzz/run_fuzz.sh $<TARGET_FILE:${target}> ${DSMOE_FUZZ_SECONDS} -
                   ${CMAKE_BINARY_DIR}/tests/fuzz/artifacts/${name} ${DSMOE_TEST_DIR}/fuzz/seeds/${name}
                   ${DSMOE_FUZZ_SEEDS_${name}})
  math(EXPR fuzz_timeout "${DSMOE_FUZZ_SECONDS} + 120")
  set_tests_properties(${target} PROPERTIES TIMEOUT ${fuzz_timeout} LABELS fuzz ENVIRONMENT "OMP_NUM_THREADS=1")
endforeach()

# The seed generator (tests/fuzz/make_seeds.c): not built by default; docs/testing.md says when to run it.
add_executable(dsmoe_fuzz_make_seeds EXCLUDE_FROM_ALL ${DSMOE_TEST_DIR}/fuzz/make_seeds.c)
set_target_properties(dsmoe_fuzz_make_seeds PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests/fuzz)
target_link_libraries(dsmoe_fuzz_make_seeds PRIVATE dsmoe_core)
