# Gating, dispatch and combine of the cpu kernel plugin (plugins/cpu/cpu_gating.c), through the plugin's
# table: the program dlopens the built plugin from the build tree (tests/cpu_plugin_test.h) and links no
# core library.
add_executable(test_gating ${DSMOE_TEST_DIR}/model/test_gating.c)
set_target_properties(test_gating PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_gating PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
target_compile_definitions(test_gating PRIVATE DSMOE_BUILD_PLUGIN_DIRS="${DSMOE_BUILD_PLUGIN_DIR}")
target_link_libraries(test_gating PRIVATE PkgConfig::CMOCKA m ${CMAKE_DL_LIBS})
add_dependencies(test_gating dsmoe_kernel_cpu)
add_test(NAME test_gating COMMAND test_gating)
set_tests_properties(test_gating PROPERTIES TIMEOUT 60 LABELS "cpu;gating" ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=")
