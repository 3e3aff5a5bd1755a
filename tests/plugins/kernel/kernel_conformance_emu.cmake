# The cuda plugin on the CUDA emulator (tests/cuda_emu/): the plugin's own sources (plugins/cuda/*.c, kernels/*.cu
# and cuda_env.c) built with the host compilers against the CUDA headers, and linked with the emulated runtime,
# cuBLAS and cuBLASLt, device and stream order (emu_runtime.cc with emu_errors.cc, emu_cublas.cc, emu_cublaslt.cc,
# emu_device.cc, emu_streams.cc: work on a created stream deferred until something needs it) instead of libcudart,
# libcublas and libcublasLt. The module is the cuda plugin whose kernels run as host fibers, under the cuda plugin's
# own file name in a directory of its own, tests/plugins/cuda_emu/libdsmoe_kernel_cuda.so: with DSMOE_PLUGIN_PATH
# naming that directory, a deck that says run.kernel_backend = cuda runs on it unchanged (its describe() line names
# the emulator as the device). The kernel conformance suite runs it against the cpu plugin on every machine, GPU or
# not.
#   test_emu_device              the emulator's own semantics and the kernel bugs it stops on
#   test_emu_wmma                the emulated WMMA (include/mma.h) against references, and the kernel bugs it stops on
#   test_emu_cublaslt            the emulated cuBLASLt against double-precision references and the emulated cuBLAS
#   test_cuda_table_emu          the plugin's table and glue, device part included (test_cuda_table.c)
#   test_emu_gemm_rows           its grouped GEMM of few rows reads only the experts that received tokens
#   conformance_kernel_cuda_emu  the suite on the emulated cuda plugin (and _tf32: its GEMM groups with TF32 on)
#   cuda_emu_train               training on it against the cpu plugin
# Needs the headers of the CUDA toolkit with cuBLAS and cuBLASLt (not its compiler or libraries: a build with
# DSMOE_WITH_CUDA=OFF, the sanitized one, has it too, its memory errors then found by AddressSanitizer) and x86-64
# (the emulator's fiber switch). After kernel_conformance.cmake, which defines test_kernel_conformance.
find_path(DSMOE_CUDA_EMU_INCLUDE_DIR NAMES cuda_runtime_api.h cublas_v2.h
          HINTS ${CUDAToolkit_INCLUDE_DIRS} ${CUDAToolkit_ROOT}/include $ENV{CUDAToolkit_ROOT}/include
                /usr/local/cuda/include)
if(NOT DSMOE_CUDA_EMU_INCLUDE_DIR OR NOT EXISTS ${DSMOE_CUDA_EMU_INCLUDE_DIR}/cublas_v2.h
   OR NOT EXISTS ${DSMOE_CUDA_EMU_INCLUDE_DIR}/cublasLt.h
   OR NOT CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  return()
endif()
get_property(dsmoe_languages GLOBAL PROPERTY ENABLED_LANGUAGES)
if(NOT "CXX" IN_LIST dsmoe_languages)
  enable_language(CXX)
endif()

set(emu_dir ${DSMOE_TEST_DIR}/cuda_emu)
# Each kernels/*.cu compiles as C++ through a generated one-line source, so that the real plugin's CUDA sources
# keep their language.
file(GLOB DSMOE_CUDA_EMU_KERNELS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/kernels/*.cu)
set(emu_kernel_sources "")
foreach(cu ${DSMOE_CUDA_EMU_KERNELS})
  get_filename_component(stem ${cu} NAME_WE)
  set(wrapper ${CMAKE_CURRENT_BINARY_DIR}/cuda_emu/${stem}.cc)
  file(CONFIGURE OUTPUT ${wrapper} CONTENT "#include \"${cu}\"\n" @ONLY)
  list(APPEND emu_kernel_sources ${wrapper})
endforeach()
file(GLOB DSMOE_CUDA_EMU_GLUE CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/plugins/cuda/*.c)

add_library(dsmoe_kernel_cuda_emu MODULE ${DSMOE_CUDA_EMU_GLUE} ${PROJECT_SOURCE_DIR}/kernels/cuda_env.c
            ${emu_kernel_sources} ${emu_dir}/emu_device.cc ${emu_dir}/emu_runtime.cc ${emu_dir}/emu_streams.cc
            ${emu_dir}/emu_errors.cc ${emu_dir}/emu_cublas.cc ${emu_dir}/emu_cublaslt.cc)
set_target_properties(dsmoe_kernel_cuda_emu PROPERTIES
  OUTPUT_NAME dsmoe_kernel_cuda
  PREFIX lib
  LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests/plugins/cuda_emu
  C_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden
  CXX_STANDARD 17
  CXX_STANDARD_REQUIRED ON)
# The emulator's stand-ins for cub and cooperative_groups come before the toolkit's headers.
target_include_directories(dsmoe_kernel_cuda_emu BEFORE PRIVATE ${emu_dir}/include)
target_include_directories(dsmoe_kernel_cuda_emu PRIVATE ${emu_dir} ${PROJECT_SOURCE_DIR}/kernels
                           ${PROJECT_SOURCE_DIR}/plugins/cuda ${PROJECT_SOURCE_DIR}/include ${DSMOE_CUDA_EMU_INCLUDE_DIR})
target_compile_definitions(dsmoe_kernel_cuda_emu PRIVATE DSMOE_CUDA_EMU)
# -fno-strict-aliasing: the kernels load and store 16-byte vectors through reinterpret_cast (moe_route.cu), which
# nvcc compiles as meant and GCC's aliasing rules would not.
set_source_files_properties(${emu_kernel_sources} PROPERTIES
  COMPILE_OPTIONS "-include;${emu_dir}/emu_device.h;-fno-strict-aliasing;-Wno-unknown-pragmas;-Wno-unused-function")
# -mpopcnt: the scheduler counts mask bits at every warp operation (every x86-64 CPU since 2008 has it).
target_compile_options(dsmoe_kernel_cuda_emu PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-O2 -Wall -mpopcnt>)
# clang's -fsanitize=undefined checks C++ dynamic types and function pointer types through a runtime that only
# clang++-linked programs carry; the programs that load this module are C.
if(DSMOE_SANITIZE)
  target_compile_options(dsmoe_kernel_cuda_emu PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fno-sanitize=vptr,function>)
endif()
find_package(Threads REQUIRED)
target_link_libraries(dsmoe_kernel_cuda_emu PRIVATE Threads::Threads ${CMAKE_DL_LIBS} m)
# -z nodelete: the emulated runtime's state lives as long as the process, as a real runtime's does (a static
# destructor of a test may still free through it); a dlclose that unmapped it would also leave its allocations
# unreachable, which the sanitized build's LeakSanitizer reports as leaks.
target_link_options(dsmoe_kernel_cuda_emu PRIVATE -Wl,-z,defs -Wl,-z,nodelete)
add_dependencies(test_kernel_conformance dsmoe_kernel_cuda_emu)

add_executable(test_emu_device ${emu_dir}/test_emu_device.cc ${emu_dir}/emu_device.cc ${emu_dir}/emu_runtime.cc
               ${emu_dir}/emu_streams.cc ${emu_dir}/emu_errors.cc)
set_target_properties(test_emu_device PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests
                      CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON)
target_include_directories(test_emu_device PRIVATE ${emu_dir} ${DSMOE_CUDA_EMU_INCLUDE_DIR})
set_source_files_properties(${emu_dir}/test_emu_device.cc PROPERTIES COMPILE_OPTIONS "-include;${emu_dir}/emu_device.h")
target_compile_options(test_emu_device PRIVATE -O2 -Wall -mpopcnt)
target_link_libraries(test_emu_device PRIVATE Threads::Threads ${CMAKE_DL_LIBS})
add_test(NAME test_emu_device COMMAND test_emu_device)
set_tests_properties(test_emu_device PROPERTIES TIMEOUT 60 LABELS "cuda_emu")

# The emulated WMMA (include/mma.h, which kernels reach as <mma.h>): products against float32 and double
# references in every layout, a lane's share of a fragment, and the misuses it stops on.
add_executable(test_emu_wmma ${emu_dir}/test_emu_wmma.cc ${emu_dir}/emu_device.cc ${emu_dir}/emu_runtime.cc
               ${emu_dir}/emu_streams.cc ${emu_dir}/emu_errors.cc)
set_target_properties(test_emu_wmma PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests
                      CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON)
target_include_directories(test_emu_wmma BEFORE PRIVATE ${emu_dir}/include)
target_include_directories(test_emu_wmma PRIVATE ${emu_dir} ${DSMOE_CUDA_EMU_INCLUDE_DIR})
set_source_files_properties(${emu_dir}/test_emu_wmma.cc PROPERTIES COMPILE_OPTIONS "-include;${emu_dir}/emu_device.h")
target_compile_options(test_emu_wmma PRIVATE -O2 -Wall -mpopcnt)
target_link_libraries(test_emu_wmma PRIVATE Threads::Threads ${CMAKE_DL_LIBS} m)
add_test(NAME test_emu_wmma COMMAND test_emu_wmma)
set_tests_properties(test_emu_wmma PROPERTIES TIMEOUT 60 LABELS "cuda_emu")

# The emulated cuBLASLt (emu_cublaslt.cc): every emulated epilogue against a double-precision reference, the
# plain matmul bitwise against the emulated cuBLAS, and the refusals.
add_executable(test_emu_cublaslt ${emu_dir}/test_emu_cublaslt.cc ${emu_dir}/emu_cublaslt.cc ${emu_dir}/emu_cublas.cc
               ${emu_dir}/emu_device.cc ${emu_dir}/emu_runtime.cc ${emu_dir}/emu_streams.cc ${emu_dir}/emu_errors.cc)
set_target_properties(test_emu_cublaslt PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests
                      CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON)
target_include_directories(test_emu_cublaslt PRIVATE ${emu_dir} ${DSMOE_CUDA_EMU_INCLUDE_DIR})
target_compile_options(test_emu_cublaslt PRIVATE -O2 -Wall -mpopcnt)
target_link_libraries(test_emu_cublaslt PRIVATE Threads::Threads ${CMAKE_DL_LIBS} m)
add_test(NAME test_emu_cublaslt COMMAND test_emu_cublaslt)
set_tests_properties(test_emu_cublaslt PROPERTIES TIMEOUT 60 LABELS "cuda_emu")

add_test(NAME conformance_kernel_cuda_emu COMMAND test_kernel_conformance)
set_tests_properties(conformance_kernel_cuda_emu PROPERTIES
  TIMEOUT 900 SKIP_RETURN_CODE 77 LABELS "conformance;cuda_emu"
  ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL_PATH=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;\
DSMOE_STRICT_BREAK=")

# TF32 on (kernel.cuda.tf32): the groups with cuBLAS GEMMs, float32 GEMM outputs at the suite's TF32 tolerance
# (the emulated cuBLAS rounds the operands to TF32 as the tensor cores do).
add_test(NAME conformance_kernel_cuda_emu_tf32 COMMAND test_kernel_conformance)
set_tests_properties(conformance_kernel_cuda_emu_tf32 PROPERTIES
  TIMEOUT 300 SKIP_RETURN_CODE 77 LABELS "conformance;cuda_emu"
  ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL_PATH=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;\
DSMOE_STRICT_BREAK=;DSMOE_CONFORMANCE_SETTINGS=tf32=true;DSMOE_CONFORMANCE_GROUPS=gemm,grouped,wgrad,fd,inference")

# Fused epilogues on (kernel.cuda.fused_epilogues): the grouped GEMMs through the emulated cuBLASLt wherever
# it takes the shape (the suite has cases for every epilogue that it takes, and cases it refuses, which fall
# back), in float32 and bfloat16, with TF32 off; the groups that call gemm_grouped.
add_test(NAME conformance_kernel_cuda_emu_fused COMMAND test_kernel_conformance)
set_tests_properties(conformance_kernel_cuda_emu_fused PROPERTIES
  TIMEOUT 300 SKIP_RETURN_CODE 77 LABELS "conformance;cuda_emu"
  ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL_PATH=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;\
DSMOE_STRICT_BREAK=;DSMOE_CONFORMANCE_SETTINGS=fused_epilogues=true;DSMOE_CONFORMANCE_GROUPS=grouped,fd,inference,sticky,errors")

# bfloat16 attention on tensor cores (kernel.cuda.attention_tensor_cores) is the default, so the suite's own run
# checks the kernels of attention_tc.cu on the emulated WMMA (tests/cuda_emu/include/mma.h); this one checks the
# CUDA-core kernels in bfloat16 too (attention_tensor_cores = false), forward and backward, against the cpu plugin.
add_test(NAME conformance_kernel_cuda_emu_attention_cc COMMAND test_kernel_conformance)
set_tests_properties(conformance_kernel_cuda_emu_attention_cc PROPERTIES
  TIMEOUT 300 SKIP_RETURN_CODE 77 LABELS "conformance;cuda_emu"
  ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL_PATH=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;\
DSMOE_STRICT_BREAK=;DSMOE_CONFORMANCE_SETTINGS=attention_tensor_cores=false;DSMOE_CONFORMANCE_GROUPS=attention")

# The table and glue test, its device part included (memory, copies, host functions on a queue, events, the pool
# limit, sticky errors): the program of cuda_table.cmake, built here alone where the real plugin is not.
if(NOT TARGET test_cuda_table)
  dsmoe_test(test_cuda_table SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_table.c LIBS ${CMAKE_DL_LIBS} NO_TEST)
endif()
add_test(NAME test_cuda_table_emu COMMAND test_cuda_table)
set_tests_properties(test_cuda_table_emu PROPERTIES TIMEOUT 120 LABELS "cuda_emu"
                     ENVIRONMENT "DSMOE_CUDA_PLUGIN=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2")

# The grouped GEMM of few rows (kernels/gemm_rows.cu): an expert that received no token reads none of its
# weights (they lie on pages with no access), the results against a double-precision reference.
dsmoe_test(test_emu_gemm_rows SOURCES ${emu_dir}/test_emu_gemm_rows.c LIBS ${CMAKE_DL_LIBS} m NO_TEST)
add_test(NAME test_emu_gemm_rows COMMAND test_emu_gemm_rows)
set_tests_properties(test_emu_gemm_rows PROPERTIES TIMEOUT 120 SKIP_RETURN_CODE 77 LABELS "cuda_emu"
                     ENVIRONMENT "DSMOE_CUDA_PLUGIN=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2")
add_dependencies(test_emu_gemm_rows dsmoe_kernel_cuda_emu)

# The GEMM groups with expert_rows_max = 256: every forward-layout grouped GEMM of the suite (m_max 6 to 150,
# k with and without whole 16-byte vectors) through gemm_rows.cu, and the default (16) sends them to cuBLAS.
add_test(NAME conformance_kernel_cuda_emu_rows COMMAND test_kernel_conformance)
set_tests_properties(conformance_kernel_cuda_emu_rows PROPERTIES
  TIMEOUT 300 SKIP_RETURN_CODE 77 LABELS "conformance;cuda_emu"
  ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL_PATH=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;\
DSMOE_STRICT_BREAK=;DSMOE_CONFORMANCE_SETTINGS=expert_rows_max=256;DSMOE_CONFORMANCE_GROUPS=grouped,fd,inference")

# Cached attention split into runs of 8 keys (kernel.cuda.decode_split_keys; the default 128 splits only the
# suite's longest cache, in 2): up to 25 runs, rows of one step ending in different runs, ragged positions.
add_test(NAME conformance_kernel_cuda_emu_split COMMAND test_kernel_conformance)
set_tests_properties(conformance_kernel_cuda_emu_split PROPERTIES
  TIMEOUT 120 SKIP_RETURN_CODE 77 LABELS "conformance;cuda_emu"
  ENVIRONMENT "DSMOE_CONFORMANCE_KERNEL_PATH=$<TARGET_FILE:dsmoe_kernel_cuda_emu>;OMP_NUM_THREADS=2;DSMOE_PLUGIN_PATH=;\
DSMOE_STRICT_BREAK=;DSMOE_CONFORMANCE_SETTINGS=decode_split_keys=8;DSMOE_CONFORMANCE_GROUPS=inference")

# Training on it against the cpu plugin (tests/cuda_emu/cuda_emu_train.sh): losses to 1e-4 in float32 and 3e-2
# in bfloat16, 1 and 2 ranks, checkpoints resumed across the two plugins. Greedy generation on it is one of
# tests/cli/generate_test.sh's layouts.
add_test(NAME cuda_emu_train COMMAND bash ${emu_dir}/cuda_emu_train.sh $<TARGET_FILE:dsmoe>
         ${CMAKE_BINARY_DIR}/tests/plugins/cuda_emu ${DSMOE_MPIEXEC} ${DSMOE_MPIEXEC_PREFLAGS})
set_tests_properties(cuda_emu_train PROPERTIES TIMEOUT 600 SKIP_RETURN_CODE 77 LABELS "cuda_emu;mpi"
                     RESOURCE_LOCK dsmoe_ranks ENVIRONMENT "${DSMOE_RANKS_ENV};${DSMOE_TEST_MPI_ENV}")
