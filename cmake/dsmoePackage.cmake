# dsmoePackage.cmake: the exported CMake package `dsmoe` (dsmoeConfig.cmake.in says what it gives), for
# the install tree (<prefix>/lib/cmake/dsmoe, component "dev") and the build tree (-Ddsmoe_DIR=<build>).
# Included from the top-level CMakeLists.txt.
include(CMakePackageConfigHelpers)

# The ABI versions, read from the headers (the headers are the contract; nothing here restates them).
foreach(kind KERNEL COMM)
  string(TOLOWER ${kind} lower)
  file(STRINGS ${PROJECT_SOURCE_DIR}/include/dsmoe/${lower}_plugin.h line
       REGEX "^#define DSMOE_${kind}_API_VERSION [0-9]+")
  string(REGEX REPLACE ".* ([0-9]+)$" "\\1" DSMOE_${kind}_API_VERSION "${line}")
endforeach()

add_library(dsmoe_plugin_headers INTERFACE)
add_library(dsmoe::plugin_headers ALIAS dsmoe_plugin_headers)
set_target_properties(dsmoe_plugin_headers PROPERTIES EXPORT_NAME plugin_headers)
target_include_directories(dsmoe_plugin_headers INTERFACE
  $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
  $<INSTALL_INTERFACE:include>)

set(DSMOE_CMAKE_INSTALL_DIR lib/cmake/dsmoe)
install(TARGETS dsmoe_plugin_headers EXPORT dsmoeTargets COMPONENT dev)
install(EXPORT dsmoeTargets NAMESPACE dsmoe:: DESTINATION ${DSMOE_CMAKE_INSTALL_DIR} COMPONENT dev)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/dsmoe DESTINATION include COMPONENT dev)

write_basic_package_version_file(${CMAKE_BINARY_DIR}/dsmoeConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)

# Install tree: PACKAGE_PREFIX_DIR is found from the config file's own location, so it relocates.
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/dsmoeConfig.cmake.in
  ${CMAKE_BINARY_DIR}/cmake/install/dsmoeConfig.cmake
  INSTALL_DESTINATION ${DSMOE_CMAKE_INSTALL_DIR})
install(FILES ${CMAKE_BINARY_DIR}/cmake/install/dsmoeConfig.cmake ${CMAKE_BINARY_DIR}/dsmoeConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/dsmoeAddPlugin.cmake
        DESTINATION ${DSMOE_CMAKE_INSTALL_DIR} COMPONENT dev)

# Build tree: the config sits at the top of the build directory, which is then the "prefix" (bin/,
# lib/dsmoe as installed); the headers target points into the source tree.
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/dsmoeConfig.cmake.in
  ${CMAKE_BINARY_DIR}/dsmoeConfig.cmake
  INSTALL_DESTINATION ${CMAKE_BINARY_DIR} INSTALL_PREFIX ${CMAKE_BINARY_DIR})
configure_file(${PROJECT_SOURCE_DIR}/cmake/dsmoeAddPlugin.cmake ${CMAKE_BINARY_DIR}/dsmoeAddPlugin.cmake COPYONLY)
export(EXPORT dsmoeTargets NAMESPACE dsmoe:: FILE ${CMAKE_BINARY_DIR}/dsmoeTargets.cmake)
