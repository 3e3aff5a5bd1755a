# The real "nccl" plugin's code paths beside the cuda plugin on the CUDA emulator (kernel_conformance_emu.cmake):
# backends/nccl built without COMM_NCCL_SIM (device memory, every collective issued on the kernel queue's
# cudaStream_t), against the NCCL test double of nccl.cmake, as tests/plugins/cuda_emu/libdsmoe_comm_nccl.so
# beside the emulated libdsmoe_kernel_cuda.so. With that directory on the plugin path, run.kernel_backend = cuda
# and run.comm_backend = nccl pair as on a GPU: the cuda plugin's buffers go to the nccl plugin without staging,
# and the core's device-memory paths (fixed-order sums by the kernel plugin's ops, the ZeRO shards) run on the
# cuda plugin's own kernels. The double's events ignore the stream, which is right only when the emulator's
# streams finish every operation before its calls return: these entries run it so (DSMOE_EMU_STREAMS=immediate).
#   test_comm_device_cuda_emu_nccl_np{1,2,4}  the device-buffer comm conformance suite (what gpu-check runs on
#                                             the GPU with 1 rank), ranks sharing the emulated device
#   test_comm_device_cuda_emu_nccl_ordered_np4  the same with the core's fixed-order sums (the cuda plugin's
#                                             kernels add) in front of the double's reverse-order ones
#   test_comm_device_cuda_emu_mpi_np2         cuda + mpi through the core's pinned host staging
#   (cuda_emu_train trains on cuda + nccl against cpu + mpi)
if(NOT TARGET dsmoe_kernel_cuda_emu OR NOT TARGET dsmoe_nccl_double)
  return()
endif()
nccl_double_plugin(dsmoe_comm_nccl_emu dsmoe_comm_nccl ${CMAKE_BINARY_DIR}/tests/plugins/cuda_emu COMM_NCCL_EMU)
add_dependencies(test_comm_device dsmoe_comm_nccl_emu dsmoe_kernel_cuda_emu)

foreach(ranks 1 2 4)
  comm_device_entry(test_comm_device_cuda_emu_nccl_np${ranks} cuda nccl ${ranks}
                    DSMOE_PLUGIN_PATH=${CMAKE_BINARY_DIR}/tests/plugins/cuda_emu DSMOE_EMU_STREAMS=immediate)
endforeach()
# The core's fixed-order float sums done by the cuda plugin's kernels, in front of the double's reverse-order
# ones: bitwise the member-order sums.
comm_device_entry(test_comm_device_cuda_emu_nccl_ordered_np4 cuda nccl 4
                  DSMOE_PLUGIN_PATH=${CMAKE_BINARY_DIR}/tests/plugins/cuda_emu DSMOE_RUN_FIXED_ORDER_SUMS=true
                  DSMOE_NCCLSIM_SUM_ORDER=reverse DSMOE_EMU_STREAMS=immediate)
comm_device_entry(test_comm_device_cuda_emu_mpi_np2 cuda mpi 2 DSMOE_PLUGIN_PATH=${CMAKE_BINARY_DIR}/tests/plugins/cuda_emu)
