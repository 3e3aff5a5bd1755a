// tests/cuda_emu/test_emu_device.cc: the CUDA emulator's own semantics (emu_device.h), on small kernels whose
// results are known in closed form: shuffles, ballots, the counting barriers and shared memory within a block;
// every block of a grid run once, in an order that changes between launches; a cooperative grid whose blocks
// see each other's writes after grid.sync() and keep their own shared memory; launch errors as the runtime
// reports them; stream order (queued work deferred until needed, events across streams, pageable and
// pinned copies, host functions, cudaFreeAsync); and the kernel bugs it must stop on (a deadlock, a shuffle naming an exited lane, barriers of
// different kinds, grid.sync() without a cooperative launch), each in a child process that must abort with
// the emulator's message. Built with emu_device.h included first, as kernels/*.cu are.
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "emu_check.h" // CHECK, failures, checks

// ---------------------------------------------------------------------------------------------------
// Warp operations: out[t * 8 + k] for the k-th result of thread t.

__global__ void warp_ops_kernel(int *out) {
    const int t = threadIdx.x, lane = t & 31;
    const int v = 1000 + t;
    int *o = out + t * 8;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[1] = __shfl_down_sync(0xffffffffu, v, 3);
    o[2] = __shfl_up_sync(0xffffffffu, v, 2);
    o[3] = __shfl_sync(0xffffffffu, v, 7);
    o[4] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
    double d = 0.5 * t; // 8-byte values move whole
    o[5] = (int)(2.0 * __shfl_xor_sync(0xffffffffu, d, 1));
    o[6] = __shfl_xor_sync(0xffffffffu, v, 1, 8); // within segments of 8 lanes
    o[7] = __shfl_down_sync(0xffffffffu, v, 6, 8);
}

static void test_warp_ops(void) {
    const int n = 64;
    std::vector<int> out((size_t)n * 8, -1);
    cudaError_t e = dsmoe_emu_launch(warp_ops_kernel, dim3(1), dim3(n), 0, 0, 0, out.data());
    CHECK(e == cudaSuccess, "launch: %d", (int)e);
    unsigned ballot = 0;
    for (int l = 0; l < 32; l++) ballot |= (l % 3 == 0 ? 1u : 0u) << l;
    for (int t = 0; t < n; t++) {
        const int lane = t & 31, base = t - lane, *o = &out[(size_t)t * 8];
        CHECK(o[0] == 1000 + base + (lane ^ 5), "xor t=%d: %d", t, o[0]);
        CHECK(o[1] == 1000 + (lane + 3 < 32 ? t + 3 : t), "down t=%d: %d", t, o[1]);
        CHECK(o[2] == 1000 + (lane >= 2 ? t - 2 : t), "up t=%d: %d", t, o[2]);
        CHECK(o[3] == 1000 + base + 7, "idx t=%d: %d", t, o[3]);
        CHECK((unsigned)o[4] == ballot, "ballot t=%d: %x", t, (unsigned)o[4]);
        CHECK(o[5] == (t ^ 1), "double xor t=%d: %d", t, o[5]);
        CHECK(o[6] == 1000 + (t ^ 1), "xor width 8 t=%d: %d", t, o[6]);
        CHECK(o[7] == 1000 + ((lane & 7) + 6 < 8 ? t + 6 : t), "down width 8 t=%d: %d", t, o[7]);
    }
}

// ---------------------------------------------------------------------------------------------------
// Barriers and shared memory: a block sum through shared memory that every thread must see whole, the
// counting barriers, and threads that exit early (the others' barriers still complete).

__global__ void barriers_kernel(int *out, int exit_from) {
    __shared__ int part[8];
    const int t = threadIdx.x;
    if (t < 8) part[t] = 0;
    __syncthreads();
    atomicAdd(&part[t % 8], t);
    __syncthreads();
    int sum = 0;
    for (int i = 0; i < 8; i++) sum += part[i];
    out[t * 4 + 0] = sum;
    out[t * 4 + 1] = __syncthreads_count(t % 5 == 0);
    out[t * 4 + 2] = __syncthreads_or(t == 77);
    out[t * 4 + 3] = __syncthreads_and(t != 3);
    if (t >= exit_from) return;
    __syncthreads(); // completes without the threads that returned
    out[t * 4 + 0] += 1;
}

static void test_barriers(void) {
    const int n = 96, exit_from = 50;
    std::vector<int> out((size_t)n * 4, -1);
    cudaError_t e = dsmoe_emu_launch(barriers_kernel, dim3(1), dim3(n), 0, 0, 0, out.data(), exit_from);
    CHECK(e == cudaSuccess, "launch: %d", (int)e);
    const int sum = n * (n - 1) / 2, count = (n + 4) / 5;
    for (int t = 0; t < n; t++) {
        CHECK(out[t * 4 + 0] == sum + (t < exit_from), "sum t=%d: %d (want %d)", t, out[t * 4], sum + (t < exit_from));
        CHECK(out[t * 4 + 1] == count, "count t=%d: %d (want %d)", t, out[t * 4 + 1], count);
        CHECK(out[t * 4 + 2] == 1, "or t=%d: %d", t, out[t * 4 + 2]);
        CHECK(out[t * 4 + 3] == 0, "and t=%d: %d", t, out[t * 4 + 3]);
    }
}

// ---------------------------------------------------------------------------------------------------
// Blocks: each of a 2-D grid runs once, with its own ids; the order they ran in is recorded.

__global__ void blocks_kernel(int *seen, int *order, int *next) {
    const int b = blockIdx.y * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) {
        atomicAdd(&seen[b], 1);
        order[atomicAdd(next, 1)] = b;
    }
    if (blockDim.x != 64 || gridDim.x != 7 || gridDim.y != 5) seen[b] = -1000;
}

static void test_blocks(void) {
    const int nb = 35;
    std::vector<int> order_a(nb), order_b(nb);
    for (int run = 0; run < 2; run++) {
        std::vector<int> seen(nb, 0), &order = run ? order_b : order_a;
        int next = 0;
        cudaError_t e = dsmoe_emu_launch(blocks_kernel, dim3(7, 5), dim3(64), 0, 0, 0, seen.data(), order.data(), &next);
        CHECK(e == cudaSuccess, "launch: %d", (int)e);
        for (int b = 0; b < nb; b++) CHECK(seen[b] == 1, "block %d ran %d times", b, seen[b]);
        CHECK(next == nb, "%d blocks ran", next);
    }
    int identity = 1;
    for (int i = 0; i < nb; i++) identity &= order_a[i] == i;
    CHECK(!identity, "the blocks ran in index order");
    CHECK(order_a != order_b, "two launches ran the blocks in the same order");
}

// ---------------------------------------------------------------------------------------------------
// Cooperative grid: after grid.sync() each block reads what every other block wrote before it, and its
// shared memory is its own though the blocks are resident at once.

__global__ void coop_kernel(int *slots, int *out) {
    __shared__ int mine;
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    if (threadIdx.x == 0) mine = 100 + (int)blockIdx.x;
    if (threadIdx.x == 1) slots[blockIdx.x] = 10 * (int)blockIdx.x;
    grid.sync();
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (unsigned b = 0; b < gridDim.x; b++) s += slots[b];
        out[blockIdx.x * 2] = s;
        out[blockIdx.x * 2 + 1] = mine;
    }
}

static void test_cooperative(void) {
    const int nb = 4;
    std::vector<int> slots(nb, -1), out(nb * 2, -1);
    cudaError_t e = dsmoe_emu_launch(coop_kernel, dim3(nb), dim3(64), 0, 0, 1, slots.data(), out.data());
    CHECK(e == cudaSuccess, "cooperative launch: %d", (int)e);
    for (int b = 0; b < nb; b++) {
        CHECK(out[b * 2] == 10 * (0 + 1 + 2 + 3), "block %d sum %d", b, out[b * 2]);
        CHECK(out[b * 2 + 1] == 100 + b, "block %d shared %d", b, out[b * 2 + 1]);
    }
    e = dsmoe_emu_launch(coop_kernel, dim3(64), dim3(64), 0, 0, 1, slots.data(), out.data());
    CHECK(e == cudaErrorCooperativeLaunchTooLarge, "64 cooperative blocks: %d", (int)e);
    CHECK(cudaGetLastError() == cudaErrorCooperativeLaunchTooLarge, "last error after the refused launch");
}

// ---------------------------------------------------------------------------------------------------
// Stream order (emu_streams.h): work on a created stream runs only when something needs it, in order;
// events order streams; copies follow CUDA's rules for pageable and pinned host memory.

__global__ void fill_kernel(int *p, int v) { p[threadIdx.x] = v; }

static std::vector<int> host_calls;
static void note_call(void *arg) { host_calls.push_back((int)(intptr_t)arg); }

static void test_stream_order(void) {
    cudaStream_t s1 = nullptr, s2 = nullptr;
    cudaEvent_t ev = nullptr;
    int *d = nullptr, *h = nullptr, *h2 = nullptr;
    bool made = cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking) == cudaSuccess &&
                cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking) == cudaSuccess &&
                cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) == cudaSuccess &&
                cudaMalloc((void **)&d, 16) == cudaSuccess && cudaHostAlloc((void **)&h, 16, 0) == cudaSuccess &&
                cudaHostAlloc((void **)&h2, 16, 0) == cudaSuccess;
    CHECK(made, "streams, an event, device and pinned memory");
    if (!made) return;
    // Nothing runs until asked for; a query runs it and says not ready, the next says done.
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(4), 0, s1, 0, d, 3);
    cudaMemcpyAsync(h, d, 16, cudaMemcpyDeviceToHost, s1);
    CHECK(h[0] == -1 && h[3] == -1, "queued work ran before anything needed it: h[0] = %d", h[0]);
    CHECK(cudaStreamQuery(s1) == cudaErrorNotReady, "a query of a stream with queued work");
    CHECK(h[0] == 3 && h[3] == 3, "after the query: h[0] = %d, expected 3", h[0]);
    CHECK(cudaStreamQuery(s1) == cudaSuccess, "a second query");
    // A wait for an event runs the other stream up to the record, not past it.
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(4), 0, s1, 0, d, 7);
    cudaEventRecord(ev, s1);
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(4), 0, s1, 0, d, 9);
    cudaStreamWaitEvent(s2, ev, 0);
    cudaMemcpyAsync(h, d, 16, cudaMemcpyDeviceToHost, s2);
    CHECK(cudaStreamSynchronize(s2) == cudaSuccess && h[0] == 7, "s2 after waiting for s1's event: %d, expected 7", h[0]);
    CHECK(cudaEventQuery(ev) == cudaSuccess, "the event after the wait ran its work");
    cudaMemcpyAsync(h, d, 16, cudaMemcpyDeviceToHost, s1);
    CHECK(cudaStreamSynchronize(s1) == cudaSuccess && h[0] == 9, "s1 synchronised: %d, expected 9", h[0]);
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(4), 0, s1, 0, d, 4);
    cudaEventRecord(ev, s1);
    CHECK(cudaEventQuery(ev) == cudaErrorNotReady, "a query of an event with work before it");
    CHECK(cudaEventQuery(ev) == cudaSuccess, "a second query of the event");
    // From pageable memory the bytes are taken at the call; from pinned memory when the copy runs; to
    // pageable memory the call returns with the copy done.
    int pageable[4] = {1, 2, 3, 4};
    cudaMemcpyAsync(d, pageable, 16, cudaMemcpyHostToDevice, s1);
    pageable[0] = 0;
    cudaMemcpyAsync(h, d, 16, cudaMemcpyDeviceToHost, s1);
    cudaStreamSynchronize(s1);
    CHECK(h[0] == 1 && h[3] == 4, "a pageable source rewritten after the call: %d, expected 1", h[0]);
    h2[0] = 5;
    cudaMemcpyAsync(d, h2, 16, cudaMemcpyHostToDevice, s1);
    h2[0] = 6;
    cudaMemcpyAsync(h, d, 16, cudaMemcpyDeviceToHost, s1);
    cudaStreamSynchronize(s1);
    CHECK(h[0] == 6, "a pinned source is read when the copy runs: %d, expected 6", h[0]);
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(4), 0, s1, 0, d, 11);
    cudaMemcpyAsync(pageable, d, 16, cudaMemcpyDeviceToHost, s1);
    CHECK(pageable[0] == 11 && pageable[3] == 11, "a copy to pageable memory is done on return: %d", pageable[0]);
    // Host functions and cudaFreeAsync in stream order.
    int *d2;
    cudaMalloc((void **)&d2, 16);
    host_calls.clear();
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(4), 0, s1, 0, d2, 1);
    cudaLaunchHostFunc(s1, note_call, (void *)(intptr_t)42);
    cudaFreeAsync(d2, s1);
    cudaPointerAttributes a;
    cudaPointerGetAttributes(&a, d2);
    CHECK(host_calls.empty() && a.type == cudaMemoryTypeDevice, "host function or free ran before the stream got there");
    cudaStreamSynchronize(s1);
    cudaPointerGetAttributes(&a, d2);
    CHECK(host_calls.size() == 1 && host_calls[0] == 42 && a.type == cudaMemoryTypeUnregistered,
          "after the synchronisation: %zu host calls, memory type %d", host_calls.size(), (int)a.type);
    // A destroyed stream's queued work still runs.
    dsmoe_emu_launch(fill_kernel, dim3(1), dim3(4), 0, s2, 0, d, 13);
    cudaStreamDestroy(s2);
    cudaMemcpy(h, d, 16, cudaMemcpyDeviceToHost);
    CHECK(h[0] == 13, "work of a destroyed stream: %d, expected 13", h[0]);
    cudaStreamDestroy(s1);
    cudaEventDestroy(ev);
    cudaFree(d);
    cudaFreeHost(h);
    cudaFreeHost(h2);
}

// Fills n ints of dynamic shared memory with 1 and counts them: out[0] = n.
__global__ void smem_kernel(int *out, int n) {
    int *words = (int *)dsmoe_emu_dynamic_shared();
    for (int i = threadIdx.x; i < n; i += blockDim.x) words[i] = 1;
    __syncthreads();
    if (threadIdx.x == 0) {
        int sum = 0;
        for (int i = 0; i < n; i++) sum += words[i];
        out[0] = sum;
    }
}

static void test_launch_errors(void) {
    std::vector<int> out(4096);
    cudaError_t e = dsmoe_emu_launch(warp_ops_kernel, dim3(1), dim3(2048), 0, 0, 0, out.data());
    CHECK(e == cudaErrorInvalidConfiguration, "2048 threads: %d", (int)e);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "last error: the configuration");
    CHECK(cudaGetLastError() == cudaSuccess, "the last error is cleared once read");
    e = dsmoe_emu_launch(warp_ops_kernel, dim3(0), dim3(32), 0, 0, 0, out.data());
    CHECK(e == cudaErrorInvalidConfiguration, "an empty grid: %d", (int)e);
    (void)cudaGetLastError();
    // More than 48 KiB of dynamic shared memory only after the kernel's limit was raised, and up to it.
    e = dsmoe_emu_launch(smem_kernel, dim3(1), dim3(32), 48 * 1024, 0, 0, out.data(), 48 * 1024 / 4);
    CHECK(e == cudaSuccess, "48 KiB of dynamic shared memory: %d", (int)e);
    e = dsmoe_emu_launch(smem_kernel, dim3(1), dim3(32), 48 * 1024 + 4, 0, 0, out.data(), 1);
    CHECK(e == cudaErrorInvalidValue, "48 KiB + 4 without the attribute: %d", (int)e);
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "last error: the shared memory");
    CHECK(cudaFuncSetAttribute((const void *)smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024) ==
              cudaSuccess, "raising the limit to 96 KiB");
    e = dsmoe_emu_launch(smem_kernel, dim3(1), dim3(32), 96 * 1024, 0, 0, out.data(), 96 * 1024 / 4);
    CHECK(e == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess, "96 KiB after the attribute: %d", (int)e);
    CHECK(out[0] == 96 * 1024 / 4, "the kernel saw its 96 KiB: %d ints", out[0]);
    e = dsmoe_emu_launch(smem_kernel, dim3(1), dim3(32), 96 * 1024 + 4, 0, 0, out.data(), 1);
    CHECK(e == cudaErrorInvalidValue, "past the raised limit: %d", (int)e);
    e = dsmoe_emu_launch(warp_ops_kernel, dim3(1), dim3(32), 64 * 1024, 0, 0, out.data());
    CHECK(e == cudaErrorInvalidValue, "another kernel keeps 48 KiB: %d", (int)e);
    (void)cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// Kernel bugs: the emulator must abort with its message.

__global__ void deadlock_kernel(int *) {
    if (threadIdx.x == 0)
        __syncwarp(); // lanes 1-31 never come: they wait at the block barrier
    else
        __syncthreads();
}
__global__ void exited_lane_kernel(int *out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}
__global__ void mixed_barriers_kernel(int *out) {
    if (threadIdx.x < 32)
        __syncthreads();
    else
        out[0] = __syncthreads_count(1);
}
__global__ void grid_sync_kernel(int *) { cooperative_groups::this_grid().sync(); }

static void expect_abort(const char *what, void (*kernel)(int *), const char *message) {
    expect_abort_child(what, [kernel] {
        std::vector<int> out(64);
        dsmoe_emu_launch(kernel, dim3(1), dim3(64), 0, 0, 0, out.data());
    }, &message, 1);
}

int main(void) {
    test_warp_ops();
    test_barriers();
    test_blocks();
    test_cooperative();
    test_stream_order();
    test_launch_errors();
    expect_abort("deadlock", deadlock_kernel, "deadlock");
    expect_abort("exited lane", exited_lane_kernel, "names a lane that has exited");
    expect_abort("mixed barriers", mixed_barriers_kernel, "different kinds of __syncthreads");
    expect_abort("grid.sync", grid_sync_kernel, "not launched cooperatively");
    printf("test_emu_device: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
