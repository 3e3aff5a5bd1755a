# The strict kernel plugin (tests/plugins/kernel/strict): the cpu plugin's ops on deferred queues over device
# memory the host cannot touch, to show on a machine without a GPU that the core never relies on a
# synchronous plugin or on host-readable plugin memory (the rules are at the top of strict_plugin.c).
# Test-only: built into <build>/tests/plugins, never lib/dsmoe, so only a run that names that directory
# (run.plugin_path, DSMOE_PLUGIN_PATH) can select it. The same directory as DSMOE_FAKE_PLUGIN_DIR of
# loader.cmake, defined again here so that this fragment does not depend on the order of inclusion.
set(DSMOE_STRICT_PLUGIN_DIR ${CMAKE_BINARY_DIR}/tests/plugins)

file(GLOB DSMOE_STRICT_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/strict/*.c)
add_library(dsmoe_kernel_strict MODULE ${DSMOE_STRICT_SOURCES})
set_target_properties(dsmoe_kernel_strict PROPERTIES
  OUTPUT_NAME dsmoe_kernel_strict
  PREFIX lib
  LIBRARY_OUTPUT_DIRECTORY ${DSMOE_STRICT_PLUGIN_DIR}
  C_VISIBILITY_PRESET hidden)
target_include_directories(dsmoe_kernel_strict PRIVATE ${PROJECT_SOURCE_DIR}/include)
# The cpu plugin it wraps, opened at init (DSMOE_STRICT_CPU_PLUGIN overrides): a run-time dependency only,
# so strict builds even while the cpu plugin does not.
target_compile_definitions(dsmoe_kernel_strict PRIVATE
  DSMOE_STRICT_CPU_PLUGIN_DEFAULT="${DSMOE_BUILD_PLUGIN_DIR}/libdsmoe_kernel_cpu.so")
target_link_libraries(dsmoe_kernel_strict PRIVATE ${CMAKE_DL_LIBS})
target_link_options(dsmoe_kernel_strict PRIVATE -Wl,-z,defs)

# The plugin's own tests: they dlopen both plugins from the build tree, so they need no dsmoe_core.
#   test_strict      deferral, protection faults, poison, events, errors, callbacks, frees, the knobs
#   test_strict_ops  every compute and copy member bitwise against the cpu plugin
foreach(name test_strict test_strict_ops)
  add_executable(${name} ${CMAKE_CURRENT_LIST_DIR}/${name}.c)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
  target_link_libraries(${name} PRIVATE PkgConfig::CMOCKA ${CMAKE_DL_LIBS} m)
  target_compile_definitions(${name} PRIVATE
    DSMOE_STRICT_PLUGIN_FILE="${DSMOE_STRICT_PLUGIN_DIR}/libdsmoe_kernel_strict.so"
    DSMOE_CPU_PLUGIN_FILE="${DSMOE_BUILD_PLUGIN_DIR}/libdsmoe_kernel_cpu.so")
  add_dependencies(${name} dsmoe_kernel_strict dsmoe_kernel_cpu)
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES TIMEOUT 60 SKIP_RETURN_CODE 77 LABELS "cpu;strict"
                       ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=")
endforeach()
