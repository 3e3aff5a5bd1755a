// tests/cuda_emu/include/cub/device/device_segmented_radix_sort.cuh: cub's segmented radix sort of keys for
// the CUDA emulator. The DoubleBuffer form always leaves its result in the other buffer and flips the
// selector, as cub does after an odd number of passes, so that a caller reading the wrong buffer sees it.
#ifndef DSMOE_CUDA_EMU_CUB_DEVICE_SEGMENTED_RADIX_SORT_CUH
#define DSMOE_CUDA_EMU_CUB_DEVICE_SEGMENTED_RADIX_SORT_CUH
#include "device_radix_sort.cuh"

namespace cub {

struct DeviceSegmentedRadixSort {
    template <typename Key, typename NumItems, typename NumSegments, typename BeginOffsets, typename EndOffsets>
    static cudaError_t SortKeys(void *d_temp_storage, size_t &temp_storage_bytes, DoubleBuffer<Key> &d_keys,
                                NumItems num_items, NumSegments num_segments, BeginOffsets d_begin_offsets,
                                EndOffsets d_end_offsets, int begin_bit = 0, int end_bit = (int)(sizeof(Key) * 8),
                                cudaStream_t stream = 0) {
        if (!emu::bits_ok(begin_bit, end_bit, (int)(sizeof(Key) * 8)) || num_items < 0 || num_segments < 0)
            return cudaErrorInvalidValue;
        bool done;
        const cudaError_t e = emu::temp_storage(d_temp_storage, temp_storage_bytes, done);
        if (e != cudaSuccess || done)
            return e;
        Key *in = d_keys.Current(), *out = d_keys.Alternate();
        // Keys outside every segment are not written (cub leaves them as they are in the output buffer).
        emu::in_stream_order(stream, [=] {
            for (NumSegments s = 0; s < num_segments; s++) {
                const long long b = d_begin_offsets[s], e = d_end_offsets[s];
                if (e > b)
                    emu::sort_range(in + b, out + b, (size_t)(e - b), begin_bit, end_bit);
            }
        });
        d_keys.selector ^= 1;
        return cudaSuccess;
    }
};

} // namespace cub
#endif
