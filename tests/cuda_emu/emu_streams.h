// tests/cuda_emu/emu_streams.h: stream order for the CUDA emulator (emu_streams.cc). Test-only; C and C++.
//
// Work queued on a stream the program created is DEFERRED: it runs, in the stream's order, only when
// something needs it done (a synchronisation, a query, an event another stream waits on, a copy to
// pageable host memory, a free that CUDA makes wait), as late as CUDA allows; so a missing wait shows: a
// host read of a result not yet computed, a buffer reused while a queued copy still reads it. Work on the
// default streams (NULL, cudaStreamLegacy, cudaStreamPerThread) runs at once, the legacy one after the
// created streams that are not cudaStreamNonBlocking, as CUDA orders them.
// DSMOE_EMU_STREAMS=immediate (read once) runs all work at once instead: for a library beside the
// emulator that knows nothing of its streams (the NCCL test double of tests/nccl_double).
#ifndef DSMOE_TESTS_CUDA_EMU_STREAMS_H
#define DSMOE_TESTS_CUDA_EMU_STREAMS_H
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Whether work on created streams is deferred (the default) or run at once (DSMOE_EMU_STREAMS=immediate).
int dsmoe_emu_deferred(void);

// Whether work enqueued on the stream now waits in a queue (a created stream, streams deferred).
int dsmoe_emu_defers(cudaStream_t stream);

// Runs fn(arg) in stream order: queued on a created stream (deferred), at once on a default stream. fn
// owns arg (frees it). The caller has checked the stream handle.
void dsmoe_emu_enqueue(cudaStream_t stream, void (*fn)(void *arg), void *arg);

// Runs what is queued on the stream (a default stream: the created blocking streams, as the legacy
// stream waits for them); all streams for dsmoe_emu_drain_all. Return whether anything was queued.
int dsmoe_emu_drain(cudaStream_t stream);
int dsmoe_emu_drain_all(void);

// Streams and events, for emu_runtime.cc: a created stream (blocking: not cudaStreamNonBlocking) and its
// end (its queued work runs first, as CUDA completes it); an event's record on a stream (complete once
// the work queued before it has run; at once on a default stream); whether it is complete, running the
// work before it when asked to; its end; a wait of a stream for an event's last record.
void dsmoe_emu_stream_created(cudaStream_t stream, int blocking);
void dsmoe_emu_stream_destroyed(cudaStream_t stream);
void dsmoe_emu_event_record(cudaEvent_t event, cudaStream_t stream);
int dsmoe_emu_event_complete(cudaEvent_t event, int run_to_it);
void dsmoe_emu_event_destroyed(cudaEvent_t event);
void dsmoe_emu_stream_wait_event(cudaStream_t stream, cudaEvent_t event);

#ifdef __cplusplus
}
#endif

#endif
