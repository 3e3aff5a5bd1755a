# The sanitized build's test set-up (DSMOE_SANITIZE, cmake/sanitize.cmake, docs/testing.md); included by
# tests/fuzz/fuzz.cmake, in the directory that declares the tests.
#
# Every test of this directory gets the sanitizer environment (ASAN_OPTIONS, LSAN_OPTIONS with
# tests/sanitize/lsan.supp, UBSAN_OPTIONS) once all fragments have declared theirs.
cmake_language(DEFER CALL dsmoe_sanitize_tests)

if(NOT DSMOE_SANITIZE)
  return()
endif()

# Self-check: the probe (tests/sanitize/probe.c) makes one bug on purpose, on 2 ranks under the MPI
# launcher as the MPI tests run, and through bash as the script tests run; each test passes when exactly
# that bug is reported, so suppressions that grew too wide (or options that no longer reach the ranks)
# fail here. sanitize_clean passes when Open MPI and hwloc leave nothing reported.
add_executable(sanitize_probe ${CMAKE_CURRENT_LIST_DIR}/probe.c)
set_target_properties(sanitize_probe PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_link_libraries(sanitize_probe PRIVATE MPI::MPI_C PkgConfig::HWLOC)

set(probe_np2 ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} 2 ${DSMOE_MPIEXEC_PREFLAGS} $<TARGET_FILE:sanitize_probe>)
add_test(NAME sanitize_clean COMMAND ${probe_np2} clean)
add_test(NAME sanitize_leak COMMAND ${probe_np2} leak)
add_test(NAME sanitize_oob COMMAND ${probe_np2} oob)
add_test(NAME sanitize_ubsan COMMAND ${probe_np2} ubsan)
add_test(NAME sanitize_hwloc COMMAND $<TARGET_FILE:sanitize_probe> hwloc)
add_test(NAME sanitize_leak_script COMMAND bash -c "\"$0\" \"$@\"" ${probe_np2} leak)
set(probe_tests sanitize_clean sanitize_leak sanitize_oob sanitize_ubsan sanitize_hwloc sanitize_leak_script)
set_tests_properties(${probe_tests} PROPERTIES TIMEOUT 60 LABELS sanitize RESOURCE_LOCK dsmoe_ranks
                     ENVIRONMENT "${DSMOE_RANKS_ENV}")
set_tests_properties(sanitize_clean PROPERTIES PASS_REGULAR_EXPRESSION "probe clean: rank 1 of 2 done"
                     FAIL_REGULAR_EXPRESSION "Sanitizer")
# The leak on rank 0, and nothing else (4242 bytes in 1 allocation: Open MPI's thousands are suppressed).
set_tests_properties(sanitize_leak sanitize_leak_script PROPERTIES PASS_REGULAR_EXPRESSION
  "Direct leak of 4242 byte.s. in 1 object.s. allocated from:\n[^\n]*\n[^\n]*in probe_leak [^\n]*probe.c.*SUMMARY: AddressSanitizer: 4242 byte.s. leaked in 1 allocation.s.")
set_tests_properties(sanitize_oob PROPERTIES PASS_REGULAR_EXPRESSION
  "ERROR: AddressSanitizer: heap-buffer-overflow.*in probe_oob [^\n]*probe.c")
set_tests_properties(sanitize_ubsan PROPERTIES PASS_REGULAR_EXPRESSION
  "probe.c:[0-9]+:[0-9]+: runtime error: signed integer overflow")
# A topology never destroyed: its objects point at each other, so LeakSanitizer reports them as
# indirect leaks, allocated under load_topology.
set_tests_properties(sanitize_hwloc PROPERTIES PASS_REGULAR_EXPRESSION
  "ERROR: LeakSanitizer: detected memory leaks.*leak of [0-9]+ byte.s. in [0-9]+ object.s. allocated from:.*in load_topology [^\n]*probe.c")
