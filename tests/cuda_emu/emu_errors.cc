// tests/cuda_emu/emu_errors.cc: the CUDA emulator's error names and texts (cudaGetErrorName,
// cudaGetErrorString), the CUDA runtime's own for the codes the emulator returns (emu_runtime.cc). Test-only.
#include <cuda_runtime_api.h>

#include <cstdio>

namespace {

struct ErrorText { cudaError_t code; const char *name, *text; };
#define E(code, text) {code, #code, text}
const ErrorText kErrors[] = {
    E(cudaSuccess, "no error"), E(cudaErrorInvalidValue, "invalid argument"),
    E(cudaErrorMemoryAllocation, "out of memory"), E(cudaErrorInvalidPitchValue, "invalid pitch argument"),
    E(cudaErrorInvalidConfiguration, "invalid configuration argument"),
    E(cudaErrorInvalidMemcpyDirection, "invalid copy direction for memcpy"),
    E(cudaErrorInvalidDevicePointer, "invalid device pointer"),
    E(cudaErrorNoDevice, "no CUDA-capable device is detected"), E(cudaErrorInvalidDevice, "invalid device ordinal"),
    E(cudaErrorInvalidResourceHandle, "invalid resource handle"), E(cudaErrorNotReady, "device not ready"),
    E(cudaErrorIllegalAddress, "an illegal memory access was encountered"),
    E(cudaErrorLaunchOutOfResources, "too many resources requested for launch"),
    E(cudaErrorLaunchTimeout, "the launch timed out and was terminated"),
    E(cudaErrorHostMemoryAlreadyRegistered, "part or all of the requested memory range is already mapped"),
    E(cudaErrorHostMemoryNotRegistered, "pointer does not correspond to a registered memory region"),
    E(cudaErrorHardwareStackError, "hardware stack error"),
    E(cudaErrorIllegalInstruction, "an illegal instruction was encountered"),
    E(cudaErrorMisalignedAddress, "misaligned address"), E(cudaErrorInvalidPc, "invalid program counter"),
    E(cudaErrorInvalidAddressSpace, "operation not supported on global/shared address space"),
    E(cudaErrorLaunchFailure, "unspecified launch failure"), E(cudaErrorAssert, "device-side assert triggered"),
    E(cudaErrorCooperativeLaunchTooLarge, "too many blocks in cooperative launch"),
    E(cudaErrorInvalidDeviceFunction, "invalid device function"),
    E(cudaErrorNotSupported, "operation not supported"), E(cudaErrorUnknown, "unknown error"),
};
#undef E

// The entry of e; for a code without one, "cudaError N" as both name and text.
const char *error_text(cudaError_t e, bool name) {
    for (const ErrorText &t : kErrors)
        if (t.code == e) return name ? t.name : t.text;
    static thread_local char buf[32];
    snprintf(buf, sizeof buf, "cudaError %d", static_cast<int>(e));
    return buf;
}

} // namespace

extern "C" {
const char *cudaGetErrorString(cudaError_t error) { return error_text(error, false); }
const char *cudaGetErrorName(cudaError_t error) { return error_text(error, true); }
}
