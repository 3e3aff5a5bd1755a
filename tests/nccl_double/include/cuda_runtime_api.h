// tests/nccl_double/include/cuda_runtime_api.h: the few CUDA runtime declarations backends/nccl uses,
// for its test-only build against the NCCL test double (tests/nccl_double/nccl_double.c), which
// defines them. Names, types and values are the CUDA runtime's; nothing here needs CUDA installed.
#ifndef DSMOE_NCCL_DOUBLE_CUDA_RUNTIME_API_H
#define DSMOE_NCCL_DOUBLE_CUDA_RUNTIME_API_H
typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorNotReady = 600
} cudaError_t;
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
#define cudaEventDisableTiming 0x02
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
const char *cudaGetErrorString(cudaError_t error);
#endif
