// hip_on_cuda.h: lets NVRTC compile Concordia's HIP lowering unchanged, so that the HIP
// text (helpers, casts, control flow) is checked bit for bit on an NVIDIA GPU. It maps only
// the AMDGPU builtins that the HIP dialect spells; nothing else of the source is touched.
#define __builtin_amdgcn_workitem_id_x() threadIdx.x
#define __builtin_amdgcn_workitem_id_y() threadIdx.y
#define __builtin_amdgcn_workitem_id_z() threadIdx.z
#define __builtin_amdgcn_workgroup_id_x() blockIdx.x
#define __builtin_amdgcn_workgroup_id_y() blockIdx.y
#define __builtin_amdgcn_workgroup_id_z() blockIdx.z
#define __builtin_amdgcn_workgroup_size_x() blockDim.x
#define __builtin_amdgcn_workgroup_size_y() blockDim.y
#define __builtin_amdgcn_workgroup_size_z() blockDim.z
#define __builtin_amdgcn_grid_size_x() (gridDim.x * blockDim.x)
#define __builtin_amdgcn_grid_size_y() (gridDim.y * blockDim.y)
#define __builtin_amdgcn_grid_size_z() (gridDim.z * blockDim.z)
#define __builtin_amdgcn_s_barrier() __syncthreads()
#define __builtin_amdgcn_fence(order, scope) __threadfence_block()
#ifndef __ATOMIC_RELAXED
#define __ATOMIC_RELAXED 0
#endif
#define __HIP_MEMORY_SCOPE_WORKGROUP 2
#define __HIP_MEMORY_SCOPE_AGENT 3
template <class T> __device__ T __hip_atomic_fetch_add(T* p, T v, int, int) { return atomicAdd(p, v); }
template <class T> __device__ T __hip_atomic_fetch_min(T* p, T v, int, int) { return atomicMin(p, v); }
template <class T> __device__ T __hip_atomic_fetch_max(T* p, T v, int, int) { return atomicMax(p, v); }
template <class T> __device__ T __hip_atomic_exchange(T* p, T v, int, int) { return atomicExch(p, v); }
template <class T> __device__ bool __hip_atomic_compare_exchange_strong(T* p, T* expected, T desired,
                                                                        int, int, int)
{
    T old = atomicCAS(p, *expected, desired);
    bool ok = old == *expected;
    *expected = old;
    return ok;
}
