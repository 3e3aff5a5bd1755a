# Site integration (docs/install.md): `cmake --install` of this build tree into a prefix under the build
# directory, the modulefiles loaded in clean shells (Lmod with the Lua and the Tcl file, Environment
# Modules with the Tcl file), `dsmoe --config` against facts found another way, the man page against
# --help, and the Spack recipe against the CMake options. Scripts in tests/site/.
set(DSMOE_SITE_PREFIX ${CMAKE_BINARY_DIR}/site/prefix)
set(DSMOE_SITE_CACHE ${CMAKE_BINARY_DIR}/site/cache) # the unpacked environment-modules package, kept
set(site ${CMAKE_CURRENT_LIST_DIR})

add_test(NAME site_install COMMAND bash ${site}/install_test.sh ${CMAKE_BINARY_DIR} ${PROJECT_SOURCE_DIR} ${DSMOE_SITE_PREFIX})
set_tests_properties(site_install PROPERTIES FIXTURES_SETUP dsmoe_site_prefix TIMEOUT 180)

foreach(flavour lmod-lua lmod-tcl envmodules)
  string(REPLACE "-" "_" name "site_${flavour}")
  add_test(NAME ${name} COMMAND bash ${site}/module_test.sh ${flavour} ${DSMOE_SITE_PREFIX} ${PROJECT_SOURCE_DIR}
           ${DSMOE_SITE_CACHE})
  set_tests_properties(${name} PROPERTIES FIXTURES_REQUIRED dsmoe_site_prefix TIMEOUT 180 SKIP_RETURN_CODE 77)
endforeach()

add_test(NAME site_config COMMAND bash ${site}/config_test.sh ${DSMOE_SITE_PREFIX} ${CMAKE_BINARY_DIR} ${PROJECT_SOURCE_DIR})
set_tests_properties(site_config PROPERTIES FIXTURES_REQUIRED dsmoe_site_prefix TIMEOUT 120)

add_test(NAME site_man COMMAND bash ${site}/man_test.sh $<TARGET_FILE:dsmoe> ${PROJECT_SOURCE_DIR})
set_tests_properties(site_man PROPERTIES TIMEOUT 60)

add_test(NAME site_spack COMMAND python3 ${site}/spack_test.py ${PROJECT_SOURCE_DIR})
set_tests_properties(site_spack PROPERTIES TIMEOUT 60)

set_tests_properties(site_install site_lmod_lua site_lmod_tcl site_envmodules site_config site_man site_spack
                     PROPERTIES LABELS site)
