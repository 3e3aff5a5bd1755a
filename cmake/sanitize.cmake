# sanitize.cmake: the sanitizer build and the fuzz targets (docs/testing.md). Included from the top level
# before any target is declared, so that the flags reach every one.
#
#   DSMOE_SANITIZE=ON  every C/C++ target (core, plugins, tests, bench) built and linked with
#                      AddressSanitizer + UndefinedBehaviorSanitizer, the first error fatal; every ctest
#                      test runs with the options and leak suppressions of tests/sanitize/ (leaks inside
#                      Open MPI and its libraries are not ours), and 3x its timeout.
#   DSMOE_FUZZ=ON      (clang only) the libFuzzer targets tests/fuzz/fuzz_*.c, and a ctest test fuzz_<name>
#                      per target that runs it DSMOE_FUZZ_SECONDS on its seeds (tests/fuzz/fuzz.cmake).
#
# nvcc never sees these flags (they are limited to C and C++); a sanitized or fuzz build leaves the GPU
# plugins out unless DSMOE_WITH_CUDA / DSMOE_WITH_NCCL are given explicitly.
option(DSMOE_SANITIZE "build every C/C++ target with AddressSanitizer + UndefinedBehaviorSanitizer" OFF)
option(DSMOE_FUZZ "build the libFuzzer targets of tests/fuzz (needs clang)" OFF)
set(DSMOE_FUZZ_SECONDS 15 CACHE STRING "seconds each fuzz target runs in its ctest test (DSMOE_FUZZ)")

set(DSMOE_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
# The code the fuzz targets exercise: coverage for libFuzzer plus the sanitizers that turn a bug into a crash.
set(DSMOE_FUZZ_LIB_FLAGS -fsanitize=fuzzer-no-link ${DSMOE_SANITIZE_FLAGS} -g)
set(DSMOE_FUZZ_EXE_FLAGS -fsanitize=fuzzer ${DSMOE_SANITIZE_FLAGS} -g)

if(DSMOE_FUZZ AND NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
  message(FATAL_ERROR "dsmoe: DSMOE_FUZZ=ON needs clang (libFuzzer), but the C compiler is "
          "${CMAKE_C_COMPILER_ID} (${CMAKE_C_COMPILER}). Configure a fresh build directory with CC=clang "
          "(Debian: apt-get install clang libclang-rt-14-dev libomp-14-dev), or -DDSMOE_FUZZ=OFF.")
endif()

if(DSMOE_SANITIZE OR DSMOE_FUZZ)
  foreach(gpu CUDA NCCL)
    if(NOT DEFINED CACHE{DSMOE_WITH_${gpu}})
      set(DSMOE_WITH_${gpu} OFF CACHE STRING "build the ${gpu} plugin: AUTO, ON, OFF (OFF by default in a sanitized or fuzz build)")
    endif()
  endforeach()
endif()

if(DSMOE_SANITIZE)
  message(STATUS "dsmoe: DSMOE_SANITIZE=ON: C/C++ built with ${DSMOE_SANITIZE_FLAGS}")
  # -g: reports name file:line.
  foreach(flag ${DSMOE_SANITIZE_FLAGS} -g)
    add_compile_options($<$<COMPILE_LANGUAGE:C,CXX>:${flag}>)
  endforeach()
  foreach(flag ${DSMOE_SANITIZE_FLAGS})
    add_link_options($<$<LINK_LANGUAGE:C,CXX>:${flag}>)
  endforeach()
  # clang links the sanitizer runtimes into executables only: a plugin's __asan_* / __ubsan_* references
  # resolve against the executable that dlopens it, so -z defs (every symbol defined at link time) cannot
  # hold for plugins; it is dropped from every target once all are declared.
  if(CMAKE_C_COMPILER_ID MATCHES "Clang")
    cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL dsmoe_sanitize_drop_z_defs ${CMAKE_SOURCE_DIR})
  endif()
  # hwloc's PCI discovery plugin loads libpciaccess, whose globals then hold memory, and unloads both at
  # the end of the discovery: LeakSanitizer would report that memory (about 1 KB per dsmoe under
  # mpiexec). Linked to every executable (no symbol of it is used), the library stays mapped, its
  # globals visible, and the memory reachable, so no suppression has to name hwloc.
  set(is_exe "$<STREQUAL:$<TARGET_PROPERTY:TYPE>,EXECUTABLE>")
  find_library(DSMOE_PCIACCESS_LIBRARY NAMES pciaccess libpciaccess.so.0)
  if(DSMOE_PCIACCESS_LIBRARY)
    add_link_options("$<${is_exe}:LINKER:--push-state,--no-as-needed,${DSMOE_PCIACCESS_LIBRARY},--pop-state>")
  endif()
  # What Open MPI allocates inside MPI_Init and MPI_Finalize is left out of the leak report
  # (tests/sanitize/mpi_unowned.c says why): every executable gets the wrappers and the --wrap options.
  add_library(dsmoe_mpi_unowned OBJECT ${CMAKE_SOURCE_DIR}/tests/sanitize/mpi_unowned.c)
  link_libraries("$<${is_exe}:dsmoe_mpi_unowned>")
  add_link_options("$<${is_exe}:LINKER:--wrap=MPI_Init,--wrap=MPI_Init_thread,--wrap=MPI_Finalize>")
  find_program(DSMOE_LLVM_SYMBOLIZER NAMES llvm-symbolizer llvm-symbolizer-14
               HINTS /usr/lib/llvm-14/bin)
  if(NOT DSMOE_LLVM_SYMBOLIZER)
    message(WARNING "dsmoe: llvm-symbolizer not found (Debian: llvm-14): sanitizer reports will show addresses, not file:line")
  endif()
endif()

function(dsmoe_sanitize_drop_z_defs dir)
  get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  foreach(t ${targets})
    get_target_property(opts ${t} LINK_OPTIONS)
    if(opts AND "-Wl,-z,defs" IN_LIST opts)
      list(REMOVE_ITEM opts "-Wl,-z,defs")
      set_property(TARGET ${t} PROPERTY LINK_OPTIONS "${opts}")
    endif()
  endforeach()
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  foreach(sub ${subdirs})
    dsmoe_sanitize_drop_z_defs(${sub})
  endforeach()
endfunction()

# Called (deferred) at the end of the directory that declares the tests: each test gets the sanitizer
# options in its ENVIRONMENT, which script tests and mpiexec pass on to the programs they start.
# halt_on_error: the first report ends the process with a non-zero exit; print_stacktrace: UBSan says
# where. LeakSanitizer leaves out what Open MPI allocates inside MPI_Init and MPI_Finalize (the wrappers
# above, tests/sanitize/mpi_unowned.c) and reads tests/sanitize/lsan.supp for what it allocates in the
# calls between (only Open MPI's and its libraries' frames), which needs whole allocation stacks:
# fast_unwind_on_malloc=0 (the frame-pointer unwinder stops in the libraries built without frame
# pointers, before the frame that names Open MPI).
# intercept_tls_get_addr=0: LeakSanitizer of clang 14 misreads glibc 2.36's dynamic TLS blocks (of the
# plugins' libraries: libomp, oneDNN) and its leak check crashes ("Tracer caught signal 11"); without the
# interception it scans static TLS, stacks and globals (a block held only in dynamic TLS would read as a
# leak: a false report, never a missed one).
# The layout-equivalence suites (DSMOE_SANITIZE_NO_LEAK_CHECK) start dsmoe on 1-8 ranks some 300 times
# along the same code paths, and the leak check's whole-stack unwinding at every malloc, in every step
# of every run, makes them much slower (parallel: 197 s against 121 s): they run under ASan and UBSan
# without the leak check, and so with the fast unwinder. The unit tests of the same modules and the
# other end-to-end tests keep the leak check.
set(DSMOE_SANITIZE_NO_LEAK_CHECK parallel generate strict_train)
# Left out of the sanitized build (DISABLED: ctest lists them as not run): tests whose subject is not
# code the sanitizers instrument, so that running them a second time finds nothing the plain build does
# not: the job scripts and launchers (label launch: mpiexec, PBS, Slurm), the install and modulefiles
# (site), the public headers and the CMake package (headers), the plotting and paper-experiment scripts
# (plot), the corpus script (corpus), strict_break, which shows that strict_train can fail (a property
# of the test, shown by the plain build), and cuda_emu_train, whose subject is the numbers of the emulated
# cuda plugin against cpu (its memory errors are conformance_kernel_cuda_emu's, here, and generate's). The
# dsmoe code they reach runs under the sanitizers in the unit tests and in cli, signal, watchdog, save_fail,
# ckpt_damage, parallel and generate.
set(DSMOE_SANITIZE_LEFT_OUT_LABELS launch site headers plot)
set(DSMOE_SANITIZE_LEFT_OUT corpus strict_break cuda_emu_train)
function(dsmoe_sanitize_tests)
  if(NOT DSMOE_SANITIZE)
    return()
  endif()
  set(supp ${PROJECT_SOURCE_DIR}/tests/sanitize/lsan.supp)
  set(env
    "LSAN_OPTIONS=suppressions=${supp}:print_suppressions=0"
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
  if(DSMOE_LLVM_SYMBOLIZER)
    list(APPEND env "ASAN_SYMBOLIZER_PATH=${DSMOE_LLVM_SYMBOLIZER}")
  endif()
  get_property(tests DIRECTORY PROPERTY TESTS)
  foreach(t ${tests})
    get_test_property(${t} LABELS labels)
    set(left_out 0)
    if(t IN_LIST DSMOE_SANITIZE_LEFT_OUT)
      set(left_out 1)
    endif()
    foreach(label ${labels})
      if(label IN_LIST DSMOE_SANITIZE_LEFT_OUT_LABELS)
        set(left_out 1)
      endif()
    endforeach()
    if(left_out)
      set_property(TEST ${t} PROPERTY DISABLED TRUE)
      continue()
    endif()
    set(asan "ASAN_OPTIONS=halt_on_error=1:intercept_tls_get_addr=0")
    if(t IN_LIST DSMOE_SANITIZE_NO_LEAK_CHECK)
      string(APPEND asan ":detect_leaks=0")
    else()
      string(APPEND asan ":detect_leaks=1:fast_unwind_on_malloc=0")
    endif()
    set_property(TEST ${t} APPEND PROPERTY ENVIRONMENT ${asan} ${env})
    get_test_property(${t} TIMEOUT timeout)
    if(timeout)
      math(EXPR timeout "${timeout} * 3")
      set_property(TEST ${t} PROPERTY TIMEOUT ${timeout})
    endif()
  endforeach()
endfunction()
