// tests/cuda_emu/include/cub/device/device_radix_sort.cuh: cub's device-wide radix sort of keys for the CUDA
// emulator, run in the stream's order (emu_streams.h: deferred on a created stream; the offsets and keys are
// read when it runs, as on a GPU). Sorted by bits [begin_bit, end_bit) of
// the key only, stably, as cub's LSD radix sort is; the storage query answers a small non-zero size so that
// callers' scratch arithmetic is exercised.
#ifndef DSMOE_CUDA_EMU_CUB_DEVICE_RADIX_SORT_CUH
#define DSMOE_CUDA_EMU_CUB_DEVICE_RADIX_SORT_CUH
#include <cuda_runtime.h>
#include <stdint.h>

#include "emu_streams.h" // dsmoe_emu_enqueue

#include <algorithm>
#include <vector>

namespace cub {

template <typename Key> struct DoubleBuffer {
    Key *d_buffers[2];
    int selector;
    DoubleBuffer() : d_buffers{nullptr, nullptr}, selector(0) {}
    DoubleBuffer(Key *current, Key *alternate) : d_buffers{current, alternate}, selector(0) {}
    Key *Current() { return d_buffers[selector]; }
    Key *Alternate() { return d_buffers[selector ^ 1]; }
};

namespace emu {
static const size_t temp_bytes = 512;

template <typename Key> static Key radix_bits(Key k, int begin_bit, int end_bit) {
    const int n = end_bit - begin_bit;
    const Key field = n >= (int)(8 * sizeof(Key)) ? ~(Key)0 : (((Key)1 << n) - 1);
    return (Key)(k >> begin_bit) & field;
}

template <typename Key> static void sort_range(const Key *in, Key *out, size_t n, int begin_bit, int end_bit) {
    std::vector<Key> v(in, in + n);
    std::stable_sort(v.begin(), v.end(), [=](Key x, Key y) {
        return radix_bits(x, begin_bit, end_bit) < radix_bits(y, begin_bit, end_bit);
    });
    std::copy(v.begin(), v.end(), out);
}

// f() in the stream's order.
template <typename F> static void in_stream_order(cudaStream_t stream, F f) {
    dsmoe_emu_enqueue(stream, [](void *job) {
        F *j = (F *)job;
        (*j)();
        delete j;
    }, new F(f));
}

static inline bool bits_ok(int begin_bit, int end_bit, int key_bits) {
    return begin_bit >= 0 && begin_bit <= end_bit && end_bit <= key_bits;
}

// cub's two calls: without storage a call only says how much it needs (done = true); with too little it fails.
static inline cudaError_t temp_storage(const void *d_temp_storage, size_t &temp_storage_bytes, bool &done) {
    done = d_temp_storage == nullptr;
    if (done)
        temp_storage_bytes = temp_bytes;
    return !done && temp_storage_bytes < temp_bytes ? cudaErrorInvalidValue : cudaSuccess;
}
} // namespace emu

struct DeviceRadixSort {
    template <typename Key, typename NumItems>
    static cudaError_t SortKeys(void *d_temp_storage, size_t &temp_storage_bytes, const Key *d_keys_in,
                                Key *d_keys_out, NumItems num_items, int begin_bit = 0,
                                int end_bit = (int)(sizeof(Key) * 8), cudaStream_t stream = 0) {
        if (!emu::bits_ok(begin_bit, end_bit, (int)(sizeof(Key) * 8)) || num_items < 0)
            return cudaErrorInvalidValue;
        bool done;
        const cudaError_t e = emu::temp_storage(d_temp_storage, temp_storage_bytes, done);
        if (e != cudaSuccess || done)
            return e;
        const size_t n = (size_t)num_items;
        emu::in_stream_order(stream, [=] { emu::sort_range(d_keys_in, d_keys_out, n, begin_bit, end_bit); });
        return cudaSuccess;
    }
};

} // namespace cub
#endif
