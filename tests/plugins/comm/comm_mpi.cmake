# The comm conformance suite (tests/plugins/comm/test_comm_mpi.c, comm_mpi_reductions.c) on 1, 2 and 4 ranks, for the host-progressed "mpi"
# plugin and for "mpistream", the same source built stream-ordered (the strict comm check).
#
# Point it at another comm plugin (found in DSMOE_CONFORMANCE_PLUGIN_DIRS, default $DSMOE_PLUGIN_PATH, then
# <build>/lib/dsmoe, then <build>/tests/plugins):
#     DSMOE_CONFORMANCE_COMM=nccl ctest -L conformance
# DSMOE_CONFORMANCE_COMM overrides every entry's own plugin (DSMOE_CONFORMANCE_DEFAULT_COMM below).
#
# The suite links no dsmoe_core (it dlopens the plugin itself), so it has its own add_executable and
# add_test here, under the same launcher as dsmoe_test().

# "mpistream": test-only, never installed, beside the loader's fake plugins (not in lib/dsmoe, so no
# real search path ever sees it).
add_library(dsmoe_comm_mpistream MODULE ${PROJECT_SOURCE_DIR}/backends/mpi/comm_mpi.c
            ${PROJECT_SOURCE_DIR}/backends/mpi/comm_mpi_reduce.c)
set_target_properties(dsmoe_comm_mpistream PROPERTIES
  OUTPUT_NAME dsmoe_comm_mpistream
  PREFIX lib
  LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests/plugins
  C_VISIBILITY_PRESET hidden)
target_include_directories(dsmoe_comm_mpistream PRIVATE ${PROJECT_SOURCE_DIR}/include)
target_compile_definitions(dsmoe_comm_mpistream PRIVATE COMM_MPI_STREAM_ORDERED)
target_link_libraries(dsmoe_comm_mpistream PRIVATE MPI::MPI_C)
target_link_options(dsmoe_comm_mpistream PRIVATE -Wl,-z,defs)

add_executable(test_comm_mpi ${CMAKE_CURRENT_LIST_DIR}/test_comm_mpi.c ${CMAKE_CURRENT_LIST_DIR}/comm_mpi_reductions.c)
set_target_properties(test_comm_mpi PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_comm_mpi PRIVATE ${PROJECT_SOURCE_DIR}/include ${DSMOE_TEST_DIR})
target_link_libraries(test_comm_mpi PRIVATE MPI::MPI_C PkgConfig::CMOCKA ${CMAKE_DL_LIBS} m)
target_compile_definitions(test_comm_mpi PRIVATE
  DSMOE_CONFORMANCE_DEFAULT_DIRS="${DSMOE_BUILD_PLUGIN_DIR}:${CMAKE_BINARY_DIR}/tests/plugins")
add_dependencies(test_comm_mpi dsmoe_comm_mpi dsmoe_comm_mpistream)

foreach(comm mpi mpistream)
  foreach(ranks 1 2 4)
    set(name test_comm_${comm}_np${ranks})
    add_test(NAME ${name} COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${DSMOE_MPIEXEC_PREFLAGS}
             $<TARGET_FILE:test_comm_mpi>)
    set_tests_properties(${name} PROPERTIES TIMEOUT 60 SKIP_RETURN_CODE 77 LABELS "conformance;comm"
                         RESOURCE_LOCK dsmoe_ranks
                         ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_CONFORMANCE_DEFAULT_COMM=${comm};${DSMOE_RANKS_ENV}")
  endforeach()
endforeach()
