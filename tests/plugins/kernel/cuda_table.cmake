# The cuda kernel plugin's table and glue (tests/plugins/kernel/test_cuda_table.c), when the plugin is built. Without a
# GPU it checks the table, the settings and init's clean refusal, then exits 77 (skipped) for the rest. The same
# program runs whole on the CUDA emulator's build of the plugin (test_cuda_table_emu, kernel_conformance_emu.cmake).
if(TARGET dsmoe_kernel_cuda)
  dsmoe_test(test_cuda_table SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_table.c TIMEOUT 120 LABELS cuda)
  add_dependencies(test_cuda_table dsmoe_kernel_cuda)
  target_link_libraries(test_cuda_table PRIVATE ${CMAKE_DL_LIBS})
endif()
