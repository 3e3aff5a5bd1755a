# scripts/gpu-check end to end on the CPU (tests/cli/gpu_check_emu_test.sh): this build bundled as for a
# GPU machine, then run from the bundle with GPU_CHECK_DRY=emu (the cuda and nccl plugins built for the
# CUDA emulator) over the steps table, generate, nccl and ranks, each of whose checks must pass. Needs the
# real cuda plugin (the bundle packs it) and the emulated one; the script skips without them.
if(TARGET dsmoe_kernel_cuda)
  add_test(NAME gpu_check_emu COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/gpu_check_emu_test.sh
                                      ${PROJECT_SOURCE_DIR} ${CMAKE_BINARY_DIR})
  set_tests_properties(gpu_check_emu PROPERTIES TIMEOUT 900 SKIP_RETURN_CODE 77 LABELS "cuda_emu;mpi"
                       RESOURCE_LOCK dsmoe_ranks ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=")
endif()
