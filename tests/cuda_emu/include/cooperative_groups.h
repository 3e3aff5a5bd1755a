// tests/cuda_emu/include/cooperative_groups.h: stands in for CUDA's header when kernels/*.cu are built for
// the CUDA emulator; the grid group it provides is in ../emu_device.h (grid.sync() over a cooperative launch).
#ifndef DSMOE_CUDA_EMU_COOPERATIVE_GROUPS_H
#define DSMOE_CUDA_EMU_COOPERATIVE_GROUPS_H
#include "../emu_device.h"
#endif
