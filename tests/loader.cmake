# Plugin loader tests. The deliberately broken plugins of tests/plugins/ go to <build>/tests/plugins,
# never to lib/dsmoe, so no real search path ever sees them; the tests pass that dir as extra_path.
set(DSMOE_FAKE_PLUGIN_DIR ${CMAKE_BINARY_DIR}/tests/plugins)

# dsmoe_fake_plugin(<kind> <name> [DEFINITIONS...]): libdsmoe_<kind>_<name>.so from tests/plugins/fake_<kind>.c.
function(dsmoe_fake_plugin kind name)
  set(target dsmoe_fake_${kind}_${name})
  add_library(${target} MODULE ${DSMOE_TEST_DIR}/plugins/fake_${kind}.c)
  set_target_properties(${target} PROPERTIES
    OUTPUT_NAME dsmoe_${kind}_${name}
    PREFIX lib
    LIBRARY_OUTPUT_DIRECTORY ${DSMOE_FAKE_PLUGIN_DIR}
    C_VISIBILITY_PRESET hidden)
  target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR}/include)
  target_compile_definitions(${target} PRIVATE FAKE_NAME="${name}" ${ARGN})
  if(kind STREQUAL "comm")
    target_link_libraries(${target} PRIVATE MPI::MPI_C) # mpi.h, for MPI_Comm in the ABI
  endif()
  set(DSMOE_FAKE_PLUGIN_TARGETS ${DSMOE_FAKE_PLUGIN_TARGETS} ${target} PARENT_SCOPE)
endfunction()

set(DSMOE_FAKE_PLUGIN_TARGETS)
dsmoe_fake_plugin(kernel fakecuda)                          # valid, mem_kind CUDA, no device_pci_bus_id
dsmoe_fake_plugin(kernel badversion FAKE_API_VERSION=7)
dsmoe_fake_plugin(kernel nosym FAKE_NO_SYMBOL)
dsmoe_fake_plugin(kernel nulltable FAKE_RETURN_NULL)
dsmoe_fake_plugin(kernel nullmember FAKE_NULL_MEMBER)
dsmoe_fake_plugin(kernel undefined FAKE_UNDEFINED)          # links: no -z defs; dlopen(RTLD_NOW) fails
dsmoe_fake_plugin(kernel misnamed FAKE_TABLE_NAME="other")
dsmoe_fake_plugin(kernel zerokind FAKE_MEM_KIND=0)
dsmoe_fake_plugin(kernel halfdevice FAKE_HALF_DEVICE)        # device_count without device_pci_bus_id
dsmoe_fake_plugin(comm cudaonly)                            # valid, mem_kinds CUDA
dsmoe_fake_plugin(comm nullmember FAKE_NULL_MEMBER)
dsmoe_fake_plugin(comm badversion FAKE_API_VERSION=2)

dsmoe_test(test_loader SOURCES ${DSMOE_TEST_DIR}/test_loader.c TIMEOUT 30)
add_dependencies(test_loader dsmoe_comm_mpi ${DSMOE_FAKE_PLUGIN_TARGETS})
target_compile_definitions(test_loader PRIVATE
  DSMOE_FAKE_PLUGIN_DIR="${DSMOE_FAKE_PLUGIN_DIR}"
  DSMOE_TEST_INSTALL_PLUGIN_DIR="${DSMOE_INSTALL_PLUGIN_DIR}")
