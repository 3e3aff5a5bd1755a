# The kernel-plugin conformance suite (tests/plugins/kernel/test_kernel_conformance.c, tests/conformance/): a candidate
# plugin against the cpu plugin, op by op. A plain C program (no cmocka: one wrong op must not stop the
# others), loading both plugins with dlopen as the core does, so it needs no dsmoe_core and travels in
# scripts/gpu-check's bundle (DSMOE_CONFORMANCE_KERNEL_PATH names the candidate's file there).
#   conformance_kernel_strict  the strict test plugin (deferred queues, memory the host cannot touch)
#   conformance_kernel_cpu     cpu against itself: the suite's own sanity
#   conformance_kernel_cuda    the cuda plugin, when it is built; skipped (77) without a GPU
file(GLOB DSMOE_CONFORMANCE_SOURCES CONFIGURE_DEPENDS ${DSMOE_TEST_DIR}/conformance/*.c)
add_executable(test_kernel_conformance ${CMAKE_CURRENT_LIST_DIR}/test_kernel_conformance.c ${DSMOE_CONFORMANCE_SOURCES})
set_target_properties(test_kernel_conformance PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_kernel_conformance PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
target_link_libraries(test_kernel_conformance PRIVATE ${CMAKE_DL_LIBS} m)
target_compile_definitions(test_kernel_conformance PRIVATE
  DSMOE_CONFORMANCE_PLUGIN_DIR="${DSMOE_BUILD_PLUGIN_DIR}"
  DSMOE_CONFORMANCE_TEST_PLUGIN_DIR="${CMAKE_BINARY_DIR}/tests/plugins")
# dsmoe_kernel_strict is defined by strict.cmake (included after this fragment): resolved at generation.
add_dependencies(test_kernel_conformance dsmoe_kernel_cpu dsmoe_kernel_strict)

set(DSMOE_CONFORMANCE_CANDIDATES strict cpu)
# No build dependency on the cuda plugin: the suite loads it at run time (missing: the test is skipped).
if(TARGET dsmoe_kernel_cuda)
  list(APPEND DSMOE_CONFORMANCE_CANDIDATES cuda)
endif()
foreach(candidate ${DSMOE_CONFORMANCE_CANDIDATES})
  add_test(NAME conformance_kernel_${candidate} COMMAND test_kernel_conformance)
  set_tests_properties(conformance_kernel_${candidate} PROPERTIES
    TIMEOUT 600 SKIP_RETURN_CODE 77 LABELS "conformance"
    ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL=${candidate};OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;DSMOE_STRICT_BREAK=")
endforeach()
