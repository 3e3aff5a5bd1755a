# The nccl comm plugin's logic without a GPU (docs/nccl.md): backends/nccl/ built as the
# test-only plugin "ncclsim" against tests/nccl_double (NCCL's and the CUDA runtime's calls over MPI on
# host memory), so it needs neither CUDA nor NCCL. On it: the comm conformance suite on 1, 2 and 4 ranks,
# and a failure test (a stopped rank ends the others within seconds, with a message).
# The real "nccl" plugin is skipped by the conformance suite here (it takes device memory only); run it
# on a GPU machine with the device-buffer harness tests/plugins/comm/test_comm_device.c (comm_device.cmake).

add_library(dsmoe_nccl_double SHARED ${DSMOE_TEST_DIR}/nccl_double/nccl_double.c)
set_target_properties(dsmoe_nccl_double PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests/plugins
                      C_VISIBILITY_PRESET hidden)
target_include_directories(dsmoe_nccl_double PRIVATE ${DSMOE_TEST_DIR}/nccl_double/include)
target_link_libraries(dsmoe_nccl_double PRIVATE MPI::MPI_C m)
target_link_options(dsmoe_nccl_double PRIVATE -Wl,-z,defs)

# nccl_double_plugin(<target> <output name> <output directory> <definition>): backends/nccl built against the
# double's nccl.h and cuda_runtime_api.h (never the real ones) and linked with it; here as ncclsim, and as nccl
# beside the emulated cuda plugin (nccl_emu.cmake).
find_package(Threads REQUIRED)
function(nccl_double_plugin target name dir definition)
  add_library(${target} MODULE ${PROJECT_SOURCE_DIR}/backends/nccl/comm_nccl.c
              ${PROJECT_SOURCE_DIR}/backends/nccl/nccl_comms.c)
  set_target_properties(${target} PROPERTIES OUTPUT_NAME ${name} PREFIX lib LIBRARY_OUTPUT_DIRECTORY ${dir}
                        C_VISIBILITY_PRESET hidden BUILD_RPATH ${CMAKE_BINARY_DIR}/tests/plugins)
  target_include_directories(${target} BEFORE PRIVATE ${DSMOE_TEST_DIR}/nccl_double/include
                             ${PROJECT_SOURCE_DIR}/include)
  target_compile_definitions(${target} PRIVATE ${definition})
  target_link_libraries(${target} PRIVATE dsmoe_nccl_double Threads::Threads)
  target_link_options(${target} PRIVATE -Wl,-z,defs)
endfunction()
nccl_double_plugin(dsmoe_comm_ncclsim dsmoe_comm_ncclsim ${CMAKE_BINARY_DIR}/tests/plugins COMM_NCCL_SIM)
add_dependencies(test_comm_mpi dsmoe_comm_ncclsim)

foreach(ranks 1 2 4)
  set(name test_comm_ncclsim_np${ranks})
  add_test(NAME ${name} COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${DSMOE_MPIEXEC_PREFLAGS}
           $<TARGET_FILE:test_comm_mpi>)
  set_tests_properties(${name} PROPERTIES TIMEOUT 60 SKIP_RETURN_CODE 77 LABELS "conformance;comm;nccl"
                       RESOURCE_LOCK dsmoe_ranks FAIL_REGULAR_EXPRESSION "NCCL MISUSE"
                       ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_CONFORMANCE_DEFAULT_COMM=ncclsim;${DSMOE_RANKS_ENV}")
endforeach()

add_executable(test_nccl_fail ${DSMOE_TEST_DIR}/nccl_double/test_nccl_fail.c)
set_target_properties(test_nccl_fail PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_nccl_fail PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
target_link_libraries(test_nccl_fail PRIVATE MPI::MPI_C ${CMAKE_DL_LIBS})
target_compile_definitions(test_nccl_fail PRIVATE
  DSMOE_CONFORMANCE_DEFAULT_DIRS="${CMAKE_BINARY_DIR}/tests/plugins")
add_dependencies(test_nccl_fail dsmoe_comm_ncclsim)
# Passes on the survivor's message (the job's exit status is MPI_Abort's); TIMEOUT catches a hang.
add_test(NAME test_nccl_fail_np2 COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} 2 ${DSMOE_MPIEXEC_PREFLAGS}
         $<TARGET_FILE:test_nccl_fail>)
# The failing call lingers 600 ms after it has set the asynchronous error, so the watchdog (100 ms) sees
# the error while the caller is still inside that call: an abort then would free what the call uses,
# and the double stops the test with "NCCL MISUSE" (docs/nccl.md, Threads).
set_tests_properties(test_nccl_fail_np2 PROPERTIES TIMEOUT 30 LABELS "comm;nccl" RESOURCE_LOCK dsmoe_ranks
  ENVIRONMENT "DSMOE_NCCLSIM_TIMEOUT=2;DSMOE_NCCLSIM_LINGER_MS=600;${DSMOE_RANKS_ENV}"
  PASS_REGULAR_EXPRESSION "rank 0: ended after [0-9.]+ s: comm ncclsim: .*communicator of this process was aborted"
  FAIL_REGULAR_EXPRESSION "NOT DETECTED;NCCL MISUSE")
# A group set-up that must fail on every rank at once, each saying why, none left waiting (the TIMEOUT
# catches a hang): <name> <environment>.
# - setup_fail: a local failure in the middle of it (rank 1's event creation);
# - init_fail: rank 1's NCCL set-up fails (non-blocking: the error comes through the state it polls) while
#   rank 0's succeeds: rank 0 must abort its communicator and name member 1;
# - init_timeout: a set-up that never settles (its state reads ncclInProgress for 10^9 polls): with
#   wait_timeout = 1 every rank's group_create gives up after 1 s, saying so, and aborts its communicator.
function(nccl_setup_test name env)
  add_test(NAME test_nccl_${name}_np2 COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} 2 ${DSMOE_MPIEXEC_PREFLAGS}
           $<TARGET_FILE:test_nccl_fail>)
  set_tests_properties(test_nccl_${name}_np2 PROPERTIES TIMEOUT 30 LABELS "comm;nccl" RESOURCE_LOCK dsmoe_ranks
    ENVIRONMENT "${env};${DSMOE_RANKS_ENV}" FAIL_REGULAR_EXPRESSION "NCCL MISUSE")
endfunction()
nccl_setup_test(setup_fail "DSMOE_NCCLSIM_TIMEOUT=5;DSMOE_NCCLSIM_FAIL_EVENT_CREATE=1")
nccl_setup_test(init_fail "DSMOE_NCCLSIM_TIMEOUT=5;DSMOE_NCCLSIM_FAIL_INIT=1")
nccl_setup_test(init_timeout "DSMOE_NCCLSIM_INPROGRESS_POLLS=1000000000;DSMOE_TEST_NCCL_WAIT_TIMEOUT=1")

# Swapping comm backends end to end (tests/nccl_double/comm_swap_test.sh): the same dsmoe trains one deck
# on mpi, ncclsim and strict + ncclsim (2 and 4 ranks), and strict + mpi_cuda under the fake CUDA-aware
# MPI (4 ranks; mpi_cuda.cmake), to the same metrics; a stopped or killed rank of
# an ncclsim run ends the job within seconds (it takes 2-4 s; the limit is 30 s, so the test needs no
# machine of its own, only no other multi-rank test beside it).
add_test(NAME comm_swap COMMAND bash ${DSMOE_TEST_DIR}/nccl_double/comm_swap_test.sh $<TARGET_FILE:dsmoe>
         ${CMAKE_BINARY_DIR}/tests/plugins ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(comm_swap PROPERTIES TIMEOUT 300 LABELS "cli;comm;nccl" RESOURCE_LOCK dsmoe_ranks)

# backends/nccl against the nccl.h of NCCL 2.14-2.23 (the oldest accepted is 2.14), where a C file sees no
# ncclBfloat16: those headers declare it only beside cuda_bf16.h's C++ types. This build's nccl.h with that
# name taken out and a 2.23 version code; the plugin must compile against it.
if(DSMOE_BUILD_NCCL_PLUGIN)
  file(READ ${DSMOE_NCCL_INCLUDE_DIR}/nccl.h nccl_header)
  string(REGEX REPLACE "ncclBfloat16 *= *9," "" nccl_2_23 "${nccl_header}")
  string(REGEX REPLACE "#define NCCL_VERSION_CODE [0-9]+" "#define NCCL_VERSION_CODE 22304" nccl_2_23 "${nccl_2_23}")
  if(nccl_2_23 STREQUAL nccl_header OR nccl_2_23 MATCHES "ncclBfloat16 *=")
    message(FATAL_ERROR "tests/plugins/comm/nccl.cmake: ${DSMOE_NCCL_INCLUDE_DIR}/nccl.h declares ncclBfloat16 "
                        "in a way this test does not know: update the test")
  endif()
  file(WRITE ${CMAKE_BINARY_DIR}/tests/nccl_2_23/nccl.h "${nccl_2_23}")
  set(cuda_includes "")
  foreach(dir ${CUDAToolkit_INCLUDE_DIRS})
    list(APPEND cuda_includes -isystem ${dir})
  endforeach()
  add_test(NAME nccl_header_2_23 COMMAND ${CMAKE_C_COMPILER} -fsyntax-only -std=gnu11 -Werror
           -I${CMAKE_BINARY_DIR}/tests/nccl_2_23 -I${PROJECT_SOURCE_DIR}/include ${cuda_includes}
           ${PROJECT_SOURCE_DIR}/backends/nccl/comm_nccl.c ${PROJECT_SOURCE_DIR}/backends/nccl/nccl_comms.c)
  set_tests_properties(nccl_header_2_23 PROPERTIES TIMEOUT 60 LABELS "nccl;build")
endif()
