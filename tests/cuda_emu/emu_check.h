// tests/cuda_emu/emu_check.h: the check macro of the emulator's own test programs (test_emu_device.cc,
// test_emu_cublaslt.cc): a failing condition prints its file:line and message and is counted; the
// program ends with the counts and exit status 1 when any failed.
#ifndef DSMOE_EMU_CHECK_H
#define DSMOE_EMU_CHECK_H
#include <stdio.h>

static int failures, checks;
#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        checks++;                                                                                                      \
        if (!(cond)) {                                                                                                 \
            failures++;                                                                                                \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                                \
            printf(__VA_ARGS__);                                                                                       \
            printf("\n");                                                                                              \
        }                                                                                                              \
    } while (0)

#endif
