# Comm-plugin conformance on DEVICE buffers (tests/plugins/comm/test_comm_device.c): every collective on buffers
# from a kernel plugin's alloc(), moved with its copies on its queue, the runtime opened as the core does.
# The plugins come from the environment: DSMOE_COMM_DEVICE_KERNEL (default cpu), DSMOE_COMM_DEVICE_COMM
# (default mpi), found on the core's search path (DSMOE_PLUGIN_PATH first). Here, without a GPU:
#   strict + ncclsim  on 1, 2, 4 ranks  comm_nccl.c over the NCCL double, collectives inside the deferred
#                                       strict queue; device memory closed to the host outside it
#   strict + mpi      on 2 ranks        host-progressed, after the core's wait
#   strict(device) + mpi on 1, 2 ranks  the core's host staging (comm_staged.c), as cuda + mpi on a GPU (on 1
#                                       rank, and in one-member groups, its copies within the device)
#   cpu + mpistream   on 2 ranks        stream-ordered on the cpu plugin's synchronous queue
# and cuda + nccl on 1 rank where both plugins are built (skipped, 77, without a GPU). docs/nccl.md.
add_executable(test_comm_device ${CMAKE_CURRENT_LIST_DIR}/test_comm_device.c)
set_target_properties(test_comm_device PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_comm_device PRIVATE ${DSMOE_TEST_DIR}) # comm_inputs.h
target_link_libraries(test_comm_device PRIVATE dsmoe_core m)
# Loaded at run time: built before the test, so that its entries find them.
add_dependencies(test_comm_device dsmoe_kernel_cpu dsmoe_kernel_strict dsmoe_comm_mpi dsmoe_comm_mpistream
                 dsmoe_comm_ncclsim)

# comm_device_entry(<name> <kernel> <comm> <ranks> [ENV...])
function(comm_device_entry name kernel comm ranks)
  set(env OMP_NUM_THREADS=2 DSMOE_PLUGIN_PATH=${CMAKE_BINARY_DIR}/tests/plugins DSMOE_COMM_DEVICE_KERNEL=${kernel}
      DSMOE_COMM_DEVICE_COMM=${comm} ${ARGN} ${DSMOE_RANKS_ENV})
  add_test(NAME ${name} COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${DSMOE_MPIEXEC_PREFLAGS}
           $<TARGET_FILE:test_comm_device>)
  set_tests_properties(${name} PROPERTIES TIMEOUT 60 SKIP_RETURN_CODE 77 LABELS "conformance;comm"
    RESOURCE_LOCK dsmoe_ranks ENVIRONMENT "${env}")
endfunction()

foreach(ranks 1 2 4)
  comm_device_entry(test_comm_device_strict_ncclsim_np${ranks} strict ncclsim ${ranks} DSMOE_STRICT_ALWAYS_CLOSED=1)
endforeach()
# The core's fixed-order float sums (comm_ordered.c) in front of ncclsim, whose double adds from the last
# rank down: the sums must be bitwise the member-order ones (uneven chunks: 4097 over 4 ranks).
comm_device_entry(test_comm_device_strict_ncclsim_ordered_np4 strict ncclsim 4 DSMOE_STRICT_ALWAYS_CLOSED=1
                  DSMOE_RUN_FIXED_ORDER_SUMS=true DSMOE_NCCLSIM_SUM_ORDER=reverse)
comm_device_entry(test_comm_device_strict_mpi_np2 strict mpi 2)
foreach(ranks 1 2) # on 1 rank every group has one member: the adapter's copies within the device
  comm_device_entry(test_comm_device_strict_staged_mpi_np${ranks} strict mpi ${ranks}
                    DSMOE_STRICT_MEM_KIND=device DSMOE_STRICT_ALWAYS_CLOSED=1)
endforeach()
comm_device_entry(test_comm_device_cpu_mpistream_np2 cpu mpistream 2)
if(TARGET dsmoe_kernel_cuda AND TARGET dsmoe_comm_nccl)
  comm_device_entry(test_comm_device_cuda_nccl_np1 cuda nccl 1)
endif()
