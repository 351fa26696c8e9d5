// Host shim of the part of TT-Metalium's dataflow API that Concordia's scalar tier uses.
// It lets generated kernels run on a CPU for validation (`tenstorrent-scalar-host`): L1 is a
// static array, "DRAM" is host memory, and a NoC transfer is a copy. Not a simulator of the
// hardware's timing or of its NoC; only of what the kernel computes.
#pragma once
#define CC_TT_HOST 1
#include <stdint.h>


static uint32_t cc_shim_args[512];
static unsigned char cc_shim_l1[4096];

template <typename T> static inline T get_arg_val(int i) { return (T)cc_shim_args[i]; }

static inline void cb_reserve_back(int, int) {}
static inline uint32_t get_write_ptr(int) { return 0; }
static inline void* cc_l1_ptr(uint32_t addr) { return cc_shim_l1 + addr; }
static inline uint64_t cc_dram_noc_addr(uint32_t lo, uint32_t hi) {
    return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t cc_l1_addr_as_noc(void* p) { return (uint64_t)(uintptr_t)p; }

// The compiler barriers make every transfer touch memory again: a kernel polling a flag the
// host writes (a safepoint's pause request) must see the new value.
static inline void noc_async_read(uint64_t src, uint32_t dst, uint32_t n) {
    __asm__ __volatile__("" ::: "memory");
    __builtin_memcpy(cc_l1_ptr(dst), (const void*)(uintptr_t)src, n);
}
static inline void noc_async_read_barrier() { __asm__ __volatile__("" ::: "memory"); }
static inline void noc_async_write(uint32_t src, uint64_t dst, uint32_t n) {
    __builtin_memcpy((void*)(uintptr_t)dst, cc_l1_ptr(src), n);
    __asm__ __volatile__("" ::: "memory");
}
static inline void noc_async_write_barrier() { __asm__ __volatile__("" ::: "memory"); }
