# Plugin loader tests. The deliberately broken plugins of tests/plugins/loader/ go to <build>/tests/plugins,
# never to lib/dsmoe, so no real search path ever sees them; the tests pass that dir as extra_path.
set(DSMOE_FAKE_PLUGIN_DIR ${CMAKE_BINARY_DIR}/tests/plugins)

# dsmoe_fake_plugin(<kind> <name> [DEFINITIONS...]): libdsmoe_<kind>_<name>.so from tests/plugins/fake_<kind>.c
# (the switches are listed at the top of that file).
function(dsmoe_fake_plugin kind name)
  set(target dsmoe_fake_${kind}_${name})
  add_library(${target} MODULE ${CMAKE_CURRENT_LIST_DIR}/fake_${kind}.c)
  set_target_properties(${target} PROPERTIES
    OUTPUT_NAME dsmoe_${kind}_${name}
    PREFIX lib
    LIBRARY_OUTPUT_DIRECTORY ${DSMOE_FAKE_PLUGIN_DIR}
    C_VISIBILITY_PRESET hidden)
  target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR}/include)
  target_compile_definitions(${target} PRIVATE FAKE_NAME="${name}" ${ARGN})
  if(kind STREQUAL "comm" AND ("FAKE_V1" IN_LIST ARGN OR "FAKE_OWN_MPI" IN_LIST ARGN))
    target_link_libraries(${target} PRIVATE MPI::MPI_C) # mpi.h: MPI_Comm in the v1 ABI, or the MPI's name
  endif()
  set(DSMOE_FAKE_PLUGIN_TARGETS ${DSMOE_FAKE_PLUGIN_TARGETS} ${target} PARENT_SCOPE)
endfunction()

# Capability and dtype bits as numbers (kernel_plugin.h): BF16 = 0x2, INFERENCE = 0x10; dtype bits
# float32 = 0x1, float64 = 0x2, bfloat16 = 0x20. Comm: NONBLOCKING = 0x4.
set(DSMOE_FAKE_PLUGIN_TARGETS)
dsmoe_fake_plugin(kernel fakecuda)                          # valid v2, mem_kind CUDA, no optional member
dsmoe_fake_plugin(kernel fakefull FAKE_FULL FAKE_CAPS=0x12 FAKE_DTYPES=0x21 FAKE_PARAMS) # every optional member
dsmoe_fake_plugin(kernel fakev1 FAKE_V1)                    # valid v1: loads through the adapter
dsmoe_fake_plugin(kernel v1device FAKE_V1 FAKE_SET=device_count FAKE_SET2=device_pci_bus_id)
dsmoe_fake_plugin(kernel v1halfdevice FAKE_V1 FAKE_SET=device_count)
dsmoe_fake_plugin(kernel v1nullmember FAKE_V1 FAKE_CLEAR=scale)
# ABI 2: the v3 table's prefix under the v2 symbol. gate is set past the prefix: the loader must not read it.
dsmoe_fake_plugin(kernel fakev2 FAKE_FULL FAKE_CAPS=0x12 FAKE_DTYPES=0x21 FAKE_PARAMS FAKE_API_VERSION=2
                  FAKE_ENTRY=dsmoe_kernel_plugin_entry_v2)
dsmoe_fake_plugin(kernel v2nullmember FAKE_API_VERSION=2 FAKE_ENTRY=dsmoe_kernel_plugin_entry_v2 FAKE_CLEAR=gemm_grouped)
dsmoe_fake_plugin(kernel badversion FAKE_API_VERSION=4)     # the v3 symbol, a table of ABI 4
dsmoe_fake_plugin(kernel v4only FAKE_API_VERSION=4 FAKE_ENTRY=dsmoe_kernel_plugin_entry_v4)
dsmoe_fake_plugin(kernel v3saysv2 FAKE_API_VERSION=2)       # the v3 symbol, a table that says ABI 2
dsmoe_fake_plugin(kernel nosym FAKE_ENTRY=dsmoe_kernel_plugin_entry_v0)
dsmoe_fake_plugin(kernel nulltable FAKE_RETURN_NULL)
dsmoe_fake_plugin(kernel nullmember FAKE_CLEAR=gemm_grouped)
dsmoe_fake_plugin(kernel nulldescription FAKE_CLEAR=description)
dsmoe_fake_plugin(kernel undefined FAKE_UNDEFINED)          # links: no -z defs; dlopen(RTLD_NOW) fails
dsmoe_fake_plugin(kernel misnamed FAKE_TABLE_NAME="other")
dsmoe_fake_plugin(kernel zerokind FAKE_MEM_KIND=0)
dsmoe_fake_plugin(kernel halfdevice FAKE_SET=device_count)  # device_count without device_pci_bus_id
dsmoe_fake_plugin(kernel halfqueue FAKE_SET=queue_destroy)  # queue_destroy without queue_create
dsmoe_fake_plugin(kernel halfinference FAKE_SET=kv_append FAKE_SET2=sample)
dsmoe_fake_plugin(kernel capnoinference FAKE_CAPS=0x10)
dsmoe_fake_plugin(kernel inferencenocap FAKE_FULL FAKE_CAPS=0x2 FAKE_DTYPES=0x21)
dsmoe_fake_plugin(kernel infnocache FAKE_FULL FAKE_CAPS=0x12 FAKE_DTYPES=0x21 FAKE_CLEAR=attention_cached)
dsmoe_fake_plugin(kernel nofloat32 FAKE_DTYPES=0x2)
dsmoe_fake_plugin(kernel bf16nocap FAKE_DTYPES=0x21)
dsmoe_fake_plugin(kernel capnobf16 FAKE_CAPS=0x2)
dsmoe_fake_plugin(kernel badparam FAKE_PARAMS FAKE_BAD_PARAM)
dsmoe_fake_plugin(comm cudaonly)                            # valid v2, mem_kinds CUDA, no MPI
dsmoe_fake_plugin(comm ownmpi FAKE_OWN_MPI FAKE_MEM_KINDS=DSMOE_MEM_HOST) # mpi_abi = this build's MPI
dsmoe_fake_plugin(comm fakempi FAKE_MPI_ABI="Fake MPI 9.9")
dsmoe_fake_plugin(comm nobarrier FAKE_CLEAR=barrier)        # optional in v2
dsmoe_fake_plugin(comm nullmember FAKE_CLEAR=reduce_scatter)
dsmoe_fake_plugin(comm badversion FAKE_API_VERSION=3)
dsmoe_fake_plugin(comm zerokinds FAKE_MEM_KINDS=0)
dsmoe_fake_plugin(comm nbnocap FAKE_NONBLOCKING)
dsmoe_fake_plugin(comm capnonb FAKE_CAPS=0x4)
dsmoe_fake_plugin(comm nbhalf FAKE_NONBLOCKING FAKE_CAPS=0x4 FAKE_CLEAR=request_test)
dsmoe_fake_plugin(comm commv1 FAKE_V1 FAKE_MEM_KINDS=DSMOE_MEM_HOST)
dsmoe_fake_plugin(comm commv1nb FAKE_V1 FAKE_NONBLOCKING)
dsmoe_fake_plugin(comm v1nullmember FAKE_V1 FAKE_CLEAR=alltoallv)
dsmoe_fake_plugin(comm v1halfnb FAKE_V1 FAKE_NONBLOCKING FAKE_CLEAR=request_wait)

# Two programs (tests/plugins/loader/loader_test.h holds what they share): how plugins are found, and what is in
# a loaded table.
foreach(t test_loader_search test_loader_tables)
  dsmoe_test(${t} SOURCES ${CMAKE_CURRENT_LIST_DIR}/${t}.c TIMEOUT 30)
  add_dependencies(${t} dsmoe_comm_mpi ${DSMOE_FAKE_PLUGIN_TARGETS})
  target_compile_definitions(${t} PRIVATE
    DSMOE_FAKE_PLUGIN_DIR="${DSMOE_FAKE_PLUGIN_DIR}"
    DSMOE_TEST_INSTALL_PLUGIN_DIR="${DSMOE_INSTALL_PLUGIN_DIR}")
endforeach()

# The cpu plugin of ABI 1, verbatim from commit 8a2f064 (tests/plugins/loader/cpu_v1/README.md), with that
# commit's v1 header ahead of include/. Its table says "cpu", so the file is libdsmoe_kernel_cpu.so, in a
# directory of its own that only run.plugin_path / DSMOE_PLUGIN_PATH ever name. Built with the compile
# options of plugins/cpu, so that a v1 run and a v2 run can be compared bit for bit.
set(DSMOE_CPU_V1_DIR ${DSMOE_FAKE_PLUGIN_DIR}/cpu_v1)
add_library(dsmoe_kernel_cpuv1 MODULE
  ${CMAKE_CURRENT_LIST_DIR}/cpu_v1/cpu_plugin.c
  ${CMAKE_CURRENT_LIST_DIR}/cpu_v1/cpu_ops.c
  ${CMAKE_CURRENT_LIST_DIR}/cpu_v1/cpu_gating.c)
set_target_properties(dsmoe_kernel_cpuv1 PROPERTIES
  OUTPUT_NAME dsmoe_kernel_cpu
  PREFIX lib
  LIBRARY_OUTPUT_DIRECTORY ${DSMOE_CPU_V1_DIR}
  C_VISIBILITY_PRESET hidden)
target_include_directories(dsmoe_kernel_cpuv1 BEFORE PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/cpu_v1/include ${PROJECT_SOURCE_DIR}/include)
target_link_libraries(dsmoe_kernel_cpuv1 PRIVATE PkgConfig::OPENBLAS OpenMP::OpenMP_C m)
set(cpu_v1_options -O3 -march=x86-64-v3 -mtune=native -fno-trapping-math) # plugins/cpu at 8a2f064
if(TARGET dsmoe_kernel_cpu)
  get_target_property(cpu_options dsmoe_kernel_cpu COMPILE_OPTIONS)
  if(cpu_options)
    set(cpu_v1_options ${cpu_options})
  endif()
endif()
target_compile_options(dsmoe_kernel_cpuv1 PRIVATE ${cpu_v1_options})
target_link_options(dsmoe_kernel_cpuv1 PRIVATE -Wl,-z,nodelete) # libgomp stays mapped (plugins/cpu)

dsmoe_test(test_adapt_v1 SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_adapt_v1.c TIMEOUT 60)
add_dependencies(test_adapt_v1 dsmoe_kernel_cpuv1)
target_compile_definitions(test_adapt_v1 PRIVATE DSMOE_CPU_V1_DIR="${DSMOE_CPU_V1_DIR}")

# The mpi comm plugin of ABI 1, verbatim from commit 8a2f064 (tests/plugins/loader/mpi_v1/README.md), with
# that commit's v1 header ahead of include/; libdsmoe_comm_mpi.so in a directory of its own, like cpu_v1.
set(DSMOE_MPI_V1_DIR ${DSMOE_FAKE_PLUGIN_DIR}/mpi_v1)
add_library(dsmoe_comm_mpiv1 MODULE ${CMAKE_CURRENT_LIST_DIR}/mpi_v1/comm_mpi.c)
set_target_properties(dsmoe_comm_mpiv1 PROPERTIES
  OUTPUT_NAME dsmoe_comm_mpi
  PREFIX lib
  LIBRARY_OUTPUT_DIRECTORY ${DSMOE_MPI_V1_DIR}
  C_VISIBILITY_PRESET hidden)
target_include_directories(dsmoe_comm_mpiv1 BEFORE PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/mpi_v1/include ${PROJECT_SOURCE_DIR}/include)
target_link_libraries(dsmoe_comm_mpiv1 PRIVATE MPI::MPI_C)
target_link_options(dsmoe_comm_mpiv1 PRIVATE -Wl,-z,defs)

# The comm conformance suite (tests/plugins/comm/test_comm_mpi.c) through the core's loader, so that the
# v1 plugin runs behind core/plugins/comm_adapt_v1.c and the adapter is held to the v2 contract with real
# collectives (the fake v1 plugins above only show what the loader makes of a table).
add_executable(test_comm_adapted ${DSMOE_TEST_DIR}/plugins/comm/test_comm_mpi.c
               ${DSMOE_TEST_DIR}/plugins/comm/comm_mpi_reductions.c)
set_target_properties(test_comm_adapted PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_comm_adapted PRIVATE ${DSMOE_TEST_DIR})
target_link_libraries(test_comm_adapted PRIVATE dsmoe_core MPI::MPI_C PkgConfig::CMOCKA ${CMAKE_DL_LIBS} m)
target_compile_definitions(test_comm_adapted PRIVATE CONF_VIA_LOADER DSMOE_CONFORMANCE_DEFAULT_DIRS="")
add_dependencies(test_comm_adapted dsmoe_comm_mpiv1)
foreach(ranks 1 2 4)
  set(name test_comm_mpiv1_np${ranks})
  add_test(NAME ${name} COMMAND ${DSMOE_MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${DSMOE_MPIEXEC_PREFLAGS}
           $<TARGET_FILE:test_comm_adapted>)
  set_tests_properties(${name} PROPERTIES TIMEOUT 60 SKIP_RETURN_CODE 77 LABELS "conformance;comm;plugins"
                       RESOURCE_LOCK dsmoe_ranks
                       ENVIRONMENT "OMP_NUM_THREADS=2;DSMOE_CONFORMANCE_DEFAULT_COMM=mpi;DSMOE_CONFORMANCE_PLUGIN_DIRS=${DSMOE_MPI_V1_DIR};${DSMOE_RANKS_ENV}")
endforeach()

# The kernel conformance suite (tests/plugins/kernel/test_kernel_conformance.c) on the cpu plugin of ABI 1
# through the core's loader and its adapter, against this tree's cpu plugin: every member the adapted
# table has, with the suite's tolerances; the groups of members v1 lacks (bf16, inference, distillation,
# the fused gate) are skipped by the suite itself.
add_executable(test_kernel_conformance_adapted ${DSMOE_TEST_DIR}/plugins/kernel/test_kernel_conformance.c
               ${DSMOE_CONFORMANCE_SOURCES})
set_target_properties(test_kernel_conformance_adapted PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
target_include_directories(test_kernel_conformance_adapted PRIVATE ${DSMOE_TEST_DIR})
target_link_libraries(test_kernel_conformance_adapted PRIVATE dsmoe_core ${CMAKE_DL_LIBS} m)
target_compile_definitions(test_kernel_conformance_adapted PRIVATE CONF_VIA_LOADER
  DSMOE_CONFORMANCE_PLUGIN_DIR="${DSMOE_BUILD_PLUGIN_DIR}"
  DSMOE_CONFORMANCE_TEST_PLUGIN_DIR="${CMAKE_BINARY_DIR}/tests/plugins")
add_dependencies(test_kernel_conformance_adapted dsmoe_kernel_cpu dsmoe_kernel_cpuv1)
add_test(NAME conformance_kernel_cpuv1 COMMAND test_kernel_conformance_adapted)
set_tests_properties(conformance_kernel_cpuv1 PROPERTIES
  TIMEOUT 600 SKIP_RETURN_CODE 77 LABELS "conformance;plugins"
  ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL=cpu;DSMOE_CONFORMANCE_KERNEL_PATH=${DSMOE_CPU_V1_DIR}/libdsmoe_kernel_cpu.so;DSMOE_CONFORMANCE_REFERENCE_PATH=$<TARGET_FILE:dsmoe_kernel_cpu>;OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=")
