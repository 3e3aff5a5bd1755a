# Gating, dispatch and combine of the cpu kernel plugin (plugins/cpu/cpu_gating.c), through the plugin's
# table: each program dlopens the built plugin from the build tree (tests/cpu_plugin_test.h) and links no
# core library. test_gating: the gating's cases and every argument check; test_dispatch_combine: dispatch
# and combine against naive loops, and 1 against 2 compute threads.
foreach(t test_gating test_dispatch_combine)
  add_executable(${t} ${DSMOE_TEST_DIR}/model/${t}.c)
  set_target_properties(${t} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  target_include_directories(${t} PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
  target_compile_definitions(${t} PRIVATE DSMOE_BUILD_PLUGIN_DIRS="${DSMOE_BUILD_PLUGIN_DIR}")
  target_link_libraries(${t} PRIVATE PkgConfig::CMOCKA m ${CMAKE_DL_LIBS})
  add_dependencies(${t} dsmoe_kernel_cpu)
  add_test(NAME ${t} COMMAND ${t})
  set_tests_properties(${t} PROPERTIES TIMEOUT 60 LABELS "cpu;gating" ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=")
endforeach()
