// Concordia's scalar tier on Tenstorrent: what generated TT-Metalium kernels use beyond the
// dataflow API. Every global access is a NoC transfer through a one-element L1 staging slot,
// so the same kernel source builds against tt-metal's dataflow_api.h on hardware and against
// Concordia's host shim (lowering/include/tt_host) for validation on a CPU.
#pragma once
#include <stdint.h>
#include "dataflow_api.h"

#ifndef CC_TT_HOST
// On a Tensix core (untested: no hardware here): L1 addresses are pointers, and a buffer
// argument is (address within its DRAM bank, bank id) — a single-bank buffer.
static inline void* cc_l1_ptr(uint32_t addr) { return (void*)(uintptr_t)addr; }
static inline uint64_t cc_dram_noc_addr(uint32_t addr, uint32_t bank) {
    return get_noc_addr_from_bank_id<true>(bank, addr);
}
static inline uint64_t cc_l1_addr_as_noc(void* p) { return get_noc_addr((uint32_t)(uintptr_t)p); }
#endif

#ifndef CC_MAX_LANES
#define CC_MAX_LANES 1024   // work-items per group; per-lane arrays of grouped kernels use it
#endif

// Math through compiler builtins (no libm header on a baby core): correctly rounded on the
// host; on RISC-V without an FPU they become soft-float library calls.
#define CC_MATH1(fn) \
    static inline float cc_##fn##f(float x) { return __builtin_##fn##f(x); } \
    static inline double cc_##fn(double x) { return __builtin_##fn(x); }
CC_MATH1(sqrt)
CC_MATH1(floor)
CC_MATH1(ceil)
CC_MATH1(fabs)
static inline float cc_fmodf(float a, float b) { return __builtin_fmodf(a, b); }
static inline double cc_fmod(double a, double b) { return __builtin_fmod(a, b); }
static inline float cc_fmaf(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
static inline double cc_fma(double a, double b, double c) { return __builtin_fma(a, b, c); }

// Work-item state of the one group this core is running (kernels run groups one at a time).
static int cc_l;                       // current lane of the group
static int cc_lanes;                   // lanes per group
static int cc_gsz[3], cc_lsz[3], cc_ngr[3], cc_grp[3];
static unsigned char cc_alive[CC_MAX_LANES];

static inline int cc_local_id(int d) {
    return d == 0 ? cc_l % cc_lsz[0]
         : d == 1 ? (cc_l / cc_lsz[0]) % cc_lsz[1] : cc_l / (cc_lsz[0] * cc_lsz[1]);
}
static inline int cc_global_id(int d) { return cc_grp[d] * cc_lsz[d] + cc_local_id(d); }

// The first lane still running: where a group-uniform value is read.
static inline int cc_uniform_lane() {
    for (int l = 0; l < cc_lanes; ++l)
        if (cc_alive[l]) return l;
    return -1;
}

static inline void cc_start_group(uint32_t g) {
    cc_grp[0] = (int)(g % (uint32_t)cc_ngr[0]);
    cc_grp[1] = (int)((g / (uint32_t)cc_ngr[0]) % (uint32_t)cc_ngr[1]);
    cc_grp[2] = (int)(g / (uint32_t)(cc_ngr[0] * cc_ngr[1]));
    for (int l = 0; l < cc_lanes; ++l) cc_alive[l] = 1;
}

// Runtime args: words 0..5 global and local size, 6 first group, 7 group count; then the
// kernel's parameters (buffers: a 64-bit NoC address as two words; scalars: 1 or 2 words).
static inline uint32_t cc_word(uint32_t i) { return get_arg_val<uint32_t>(i); }

template <typename T> static inline T cc_arg_scalar(uint32_t i) {
    union { uint32_t w[2]; T v; } u;
    u.w[0] = cc_word(i);
    u.w[1] = sizeof(T) > 4 ? cc_word(i + 1) : 0;
    return u.v;
}

// One L1 slot (a circular buffer page) stages every element that crosses the NoC.
#define CC_STAGE_CB 0

static inline void cc_noc_read(uint64_t src, void* dst, uint32_t n) {
    cb_reserve_back(CC_STAGE_CB, 1);
    uint32_t l1 = get_write_ptr(CC_STAGE_CB);
    noc_async_read(src, l1, n);
    noc_async_read_barrier();
    __builtin_memcpy(dst, cc_l1_ptr(l1), n);
}

static inline void cc_noc_write(const void* src, uint64_t dst, uint32_t n) {
    cb_reserve_back(CC_STAGE_CB, 1);
    uint32_t l1 = get_write_ptr(CC_STAGE_CB);
    __builtin_memcpy(cc_l1_ptr(l1), src, n);
    noc_async_write(l1, dst, n);
    noc_async_write_barrier();
}

// A buffer in device DRAM, indexed by element: reads and writes are NoC transfers.
template <typename T> struct cc_ref {
    uint64_t addr;
    operator T() const { T v; cc_noc_read(addr, &v, sizeof(T)); return v; }
    cc_ref& operator=(T v) { cc_noc_write(&v, addr, sizeof(T)); return *this; }
    cc_ref& operator=(const cc_ref& o) { return *this = (T)o; }
};

// An access outside its buffer is not made: the first one is recorded for the host to report.
static uint32_t cc_fault[4];           // set?, word of the kernel's buffer arg, index lo, index hi
static unsigned char cc_fault_sink[8];

template <typename T> struct cc_global {
    uint64_t base;
    uint32_t count, arg;
    cc_ref<T> operator[](long long i) const {
        if (i < 0 || (unsigned long long)i >= count) {
            if (!cc_fault[0]) {
                cc_fault[0] = 1; cc_fault[1] = arg;
                cc_fault[2] = (uint32_t)i; cc_fault[3] = (uint32_t)((unsigned long long)i >> 32);
            }
            return cc_ref<T>{cc_l1_addr_as_noc(cc_fault_sink)};
        }
        return cc_ref<T>{base + (uint64_t)i * sizeof(T)};
    }
};

// A buffer argument is three words: its NoC address (two words) and its size in bytes.
template <typename T> static inline cc_global<T> cc_arg_buffer(uint32_t i) {
    return cc_global<T>{cc_dram_noc_addr(cc_word(i), cc_word(i + 1)),
                        (uint32_t)(cc_word(i + 2) / sizeof(T)), i};
}

// Atomics: one core runs every work-item of a launch in turn, so read-modify-write through
// the NoC is atomic with respect to the kernel (kernels are not split over cores that share
// a word). Local memory is plain L1.
#define CC_ATOMIC(name, expr)                                                                \
    template <typename B, typename I, typename T> static inline T cc_##name(B buf, I i, T v) { \
        T old = buf[i]; buf[i] = (expr); return old; }
CC_ATOMIC(atomic_add, (T)(old + v))
CC_ATOMIC(atomic_min, (v < old ? v : old))
CC_ATOMIC(atomic_max, (v > old ? v : old))
CC_ATOMIC(atomic_xchg, v)
template <typename B, typename I, typename T>
static inline T cc_atomic_cas(B buf, I i, T cmp, T v) {
    T old = buf[i];
    if (old == cmp) buf[i] = v;
    return old;
}
