# dsmoeAddPlugin.cmake: dsmoe_add_plugin(), the way to build a dsmoe plugin with CMake. Installed beside
# dsmoeConfig.cmake, so an out-of-tree project gets it from find_package(dsmoe); docs/plugins.md shows
# a complete project.
#
#   dsmoe_add_plugin(<target> KIND kernel|comm NAME <name> SOURCES <files...> [DESTINATION <dir>])
#
# builds <target> as a MODULE library named libdsmoe_<kind>_<name>.so (what the loader looks for), with
# hidden visibility (only the DSMOE_PLUGIN_EXPORT entry is exported) and the dsmoe headers
# (dsmoe::plugin_headers), and installs it to <CMAKE_INSTALL_PREFIX>/lib/dsmoe, or DESTINATION. Link
# the libraries the plugin calls with target_link_libraries(<target> PRIVATE ...): the core loads with
# RTLD_NOW, so a symbol no loaded library defines makes the load fail.
include_guard(GLOBAL)

function(dsmoe_add_plugin target)
  cmake_parse_arguments(P "" "KIND;NAME;DESTINATION" "SOURCES" ${ARGN})
  if(P_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "dsmoe_add_plugin(${target}): unexpected arguments: ${P_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT P_KIND STREQUAL "kernel" AND NOT P_KIND STREQUAL "comm")
    message(FATAL_ERROR "dsmoe_add_plugin(${target}): KIND must be kernel or comm, got '${P_KIND}'")
  endif()
  # The loader's rule for plugin names (docs/plugins.md): they become part of a file name.
  if(NOT P_NAME MATCHES "^[a-z0-9_-]+$")
    message(FATAL_ERROR "dsmoe_add_plugin(${target}): NAME '${P_NAME}' is invalid: expected 1-63 characters of a-z, 0-9, '_' or '-'")
  endif()
  string(LENGTH "${P_NAME}" name_length)
  if(name_length GREATER 63)
    message(FATAL_ERROR "dsmoe_add_plugin(${target}): NAME '${P_NAME}' is longer than 63 characters")
  endif()
  if(NOT P_SOURCES)
    message(FATAL_ERROR "dsmoe_add_plugin(${target}): SOURCES is empty")
  endif()
  if(NOT P_DESTINATION)
    set(P_DESTINATION lib/dsmoe)
  endif()

  add_library(${target} MODULE ${P_SOURCES})
  set_target_properties(${target} PROPERTIES
    OUTPUT_NAME dsmoe_${P_KIND}_${P_NAME}
    PREFIX lib
    C_VISIBILITY_PRESET hidden
    CXX_VISIBILITY_PRESET hidden
    CUDA_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
  target_link_libraries(${target} PRIVATE dsmoe::plugin_headers)
  install(TARGETS ${target} LIBRARY DESTINATION ${P_DESTINATION})
endfunction()
