// tests/cuda_emu/emu_runtime.h: what the host emulation of the CUDA runtime (emu_runtime.cc) exports
// besides the runtime API itself. Test-only, never installed; C and C++.
#ifndef DSMOE_TESTS_CUDA_EMU_RUNTIME_H
#define DSMOE_TESTS_CUDA_EMU_RUNTIME_H
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Sets the calling thread's last error (what cudaGetLastError returns next), as a failed kernel launch
// does. An error that breaks a CUDA context on a GPU (cudaErrorIllegalAddress, cudaErrorLaunchFailure,
// cudaErrorAssert, ...) also becomes the process's sticky error: every later synchronisation returns it.
// cudaSuccess is ignored.
void dsmoe_emu_set_last_error(cudaError_t e);

// The dynamic shared memory a launch of `func` may ask for: 48 KiB, or what
// cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, n) set last. A GPU refuses a
// launch past it (cudaErrorInvalidValue) even where the device could hold that much.
size_t dsmoe_emu_dynamic_shared_limit(const void *func);

#ifdef __cplusplus
}
#endif

#endif
