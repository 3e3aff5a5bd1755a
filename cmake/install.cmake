# cmake/install.cmake: what `cmake --install` adds for sites beyond the program, its plugins and the
# CMake package: environment modules for the install prefix (Lmod .lua and Environment Modules Tcl), the
# man page dsmoe(1), and the documentation in share/doc/dsmoe. Included from the top-level
# CMakeLists.txt (after DSMOE_PLUGIN_SUBDIR is set). docs/install.md says how sites use them.
#
#   <prefix>/share/modulefiles/lua/dsmoe/<version>.lua   Lmod
#   <prefix>/share/modulefiles/tcl/dsmoe/<version>       Environment Modules (Lmod reads it too)
#   <prefix>/share/man/man1/dsmoe.1
#   <prefix>/share/doc/dsmoe/README.md, docs/*.md
#
# The modulefiles name the prefix of the install itself, which `cmake --install build --prefix X` may
# change after the configure: they are written by install(CODE) when the install runs, from
# CMAKE_INSTALL_PREFIX as it is then, into the build tree, and installed from there as plain files
# (so DESTDIR staging works: the files name the prefix, never DESTDIR).

set(DSMOE_MODULE_STAGING ${CMAKE_BINARY_DIR}/packaging/modulefiles)

# What the help text says the program was built with: the MPI implementation and version from its
# mpi.h (Open MPI, MPICH; else the standard version), its library, and the compiler.
set(dsmoe_module_mpi "MPI ${MPI_C_VERSION}")
file(STRINGS "${MPI_C_HEADER_DIR}/mpi.h" mpi_lines REGEX "^#define (OMPI_(MAJOR|MINOR|RELEASE)_VERSION|MPICH_VERSION) ")
if(mpi_lines MATCHES "OMPI_MAJOR_VERSION ([0-9]+).*OMPI_MINOR_VERSION ([0-9]+).*OMPI_RELEASE_VERSION ([0-9]+)")
  set(dsmoe_module_mpi "Open MPI ${CMAKE_MATCH_1}.${CMAKE_MATCH_2}.${CMAKE_MATCH_3}")
elseif(mpi_lines MATCHES "MPICH_VERSION \"([^\"]+)\"")
  set(dsmoe_module_mpi "MPICH ${CMAKE_MATCH_1}")
endif()
list(GET MPI_C_LIBRARIES 0 mpi_library)
string(APPEND dsmoe_module_mpi " (${mpi_library})")

install(CODE "
  get_filename_component(DSMOE_MODULE_PREFIX \"\${CMAKE_INSTALL_PREFIX}\" ABSOLUTE)
  set(DSMOE_MODULE_VERSION \"${PROJECT_VERSION}\")
  set(DSMOE_PLUGIN_SUBDIR \"${DSMOE_PLUGIN_SUBDIR}\")
  set(DSMOE_MODULE_MPI \"${dsmoe_module_mpi}\")
  set(DSMOE_MODULE_COMPILER \"${CMAKE_C_COMPILER_ID} ${CMAKE_C_COMPILER_VERSION}\")
  configure_file(\"${PROJECT_SOURCE_DIR}/packaging/modulefiles/dsmoe.lua.in\"
                 \"${DSMOE_MODULE_STAGING}/lua/${PROJECT_VERSION}.lua\" @ONLY)
  configure_file(\"${PROJECT_SOURCE_DIR}/packaging/modulefiles/dsmoe.tcl.in\"
                 \"${DSMOE_MODULE_STAGING}/tcl/${PROJECT_VERSION}\" @ONLY)
  message(STATUS \"dsmoe: modulefiles for \${DSMOE_MODULE_PREFIX}: module use \${DSMOE_MODULE_PREFIX}/share/modulefiles/lua (Lmod) or .../tcl\")
")
install(FILES ${DSMOE_MODULE_STAGING}/lua/${PROJECT_VERSION}.lua DESTINATION share/modulefiles/lua/dsmoe)
install(FILES ${DSMOE_MODULE_STAGING}/tcl/${PROJECT_VERSION} DESTINATION share/modulefiles/tcl/dsmoe)

install(FILES ${PROJECT_SOURCE_DIR}/packaging/man/dsmoe.1 DESTINATION share/man/man1)
# README.md links docs/<page>.md: the same layout keeps its links working.
install(FILES ${PROJECT_SOURCE_DIR}/README.md DESTINATION share/doc/dsmoe)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/docs/ DESTINATION share/doc/dsmoe/docs FILES_MATCHING PATTERN "*.md")
