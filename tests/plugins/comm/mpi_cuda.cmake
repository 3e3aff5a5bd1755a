# The mpi_cuda comm plugin (backends/mpi, COMM_MPI_CUDA_AWARE: device buffers straight to a CUDA-aware
# MPI) without a CUDA-aware MPI or a GPU (docs/nccl.md):
#   test_mpi_cuda_aware_refused   on this machine's Open MPI (not CUDA-aware): init refused, naming it
#   test_mpi_cuda_aware_fake      under the fake CUDA-aware MPI: init succeeds; the tables of both plugins
#   test_comm_mpi_cuda_np{1,2,4}  the host-buffer comm conformance suite (comm_mpi.cmake) under the fake
#   test_comm_device_strict_mpi_cuda_*  the device-buffer conformance suite on strict's device memory,
#                                 closed to the host except inside the fake MPI's collectives
# The fake (tests/plugins/comm/fake_cuda_aware_mpi.c) is preloaded: it says yes to MPIX_Query_cuda_support and
# opens strict's device memory to MPI inside its collectives only. Built without the sanitizers and
# without linking MPI, so that preloading it into mpiexec (not instrumented, no MPI calls) is harmless.
add_library(dsmoe_fake_cuda_aware_mpi SHARED ${CMAKE_CURRENT_LIST_DIR}/fake_cuda_aware_mpi.c)
set_target_properties(dsmoe_fake_cuda_aware_mpi PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests/plugins
                      C_VISIBILITY_PRESET hidden)
target_include_directories(dsmoe_fake_cuda_aware_mpi PRIVATE
                           $<TARGET_PROPERTY:MPI::MPI_C,INTERFACE_INCLUDE_DIRECTORIES>)
target_compile_options(dsmoe_fake_cuda_aware_mpi PRIVATE -fno-sanitize=all)
target_link_options(dsmoe_fake_cuda_aware_mpi PRIVATE -fno-sanitize=all)
set(DSMOE_FAKE_CUDA_MPI_ENV LD_PRELOAD=$<TARGET_FILE:dsmoe_fake_cuda_aware_mpi>
    OMPI_MCA_btl_vader_single_copy_mechanism=none) # a peer's direct read would bypass the double

add_executable(test_mpi_cuda_aware ${CMAKE_CURRENT_LIST_DIR}/test_mpi_cuda_aware.c)
set_target_properties(test_mpi_cuda_aware PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_mpi_cuda_aware PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
target_link_libraries(test_mpi_cuda_aware PRIVATE MPI::MPI_C ${CMAKE_DL_LIBS})
target_compile_definitions(test_mpi_cuda_aware PRIVATE DSMOE_CONFORMANCE_DEFAULT_DIRS="${DSMOE_BUILD_PLUGIN_DIR}")
add_dependencies(test_mpi_cuda_aware dsmoe_comm_mpi dsmoe_comm_mpi_cuda dsmoe_fake_cuda_aware_mpi)
foreach(mpi refused fake)
  set(env ${DSMOE_RANKS_ENV} DSMOE_EXPECT_CUDA_AWARE=0)
  if(mpi STREQUAL fake)
    set(env ${DSMOE_RANKS_ENV} DSMOE_EXPECT_CUDA_AWARE=1 ${DSMOE_FAKE_CUDA_MPI_ENV})
  endif()
  add_test(NAME test_mpi_cuda_aware_${mpi} COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} 1 ${DSMOE_MPIEXEC_PREFLAGS}
           $<TARGET_FILE:test_mpi_cuda_aware>)
  set_tests_properties(test_mpi_cuda_aware_${mpi} PROPERTIES TIMEOUT 30 LABELS "comm" ENVIRONMENT "${env}")
endforeach()

add_dependencies(test_comm_mpi dsmoe_comm_mpi_cuda dsmoe_fake_cuda_aware_mpi)
foreach(ranks 1 2 4)
  add_test(NAME test_comm_mpi_cuda_np${ranks} COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} ${ranks}
           ${DSMOE_MPIEXEC_PREFLAGS} $<TARGET_FILE:test_comm_mpi>)
  set_tests_properties(test_comm_mpi_cuda_np${ranks} PROPERTIES TIMEOUT 60 LABELS "conformance;comm"
    RESOURCE_LOCK dsmoe_ranks
    ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_CONFORMANCE_DEFAULT_COMM=mpi_cuda;${DSMOE_RANKS_ENV};${DSMOE_FAKE_CUDA_MPI_ENV}")
endforeach()

# strict declaring device memory and keeping it closed to the host: mpi_cuda takes its buffers without
# the core's staging. MPI's own float sums (within the bound of any order) on 1, 2 and 4 ranks, the 4
# with max_count = 7 (longer blocks as derived datatypes, reductions in pieces: reduce_scatter's
# per-root MPI_Reduce); with the core's fixed-order sums in front on 4 ranks (bitwise the member-order
# sums; the all-to-alls go through mpi_cuda, the additions are strict's axpy).
add_dependencies(test_comm_device dsmoe_comm_mpi_cuda dsmoe_fake_cuda_aware_mpi)
foreach(ranks 1 2 4)
  set(pieces "")
  if(ranks EQUAL 4)
    set(pieces DSMOE_COMM_MPI_CUDA_MAX_COUNT=7)
  endif()
  comm_device_entry(test_comm_device_strict_mpi_cuda_np${ranks} strict mpi_cuda ${ranks}
                    DSMOE_STRICT_MEM_KIND=device DSMOE_STRICT_ALWAYS_CLOSED=1 ${pieces} ${DSMOE_FAKE_CUDA_MPI_ENV})
endforeach()
comm_device_entry(test_comm_device_strict_mpi_cuda_ordered_np4 strict mpi_cuda 4
                  DSMOE_STRICT_MEM_KIND=device DSMOE_STRICT_ALWAYS_CLOSED=1 DSMOE_RUN_FIXED_ORDER_SUMS=true
                  ${DSMOE_FAKE_CUDA_MPI_ENV})
