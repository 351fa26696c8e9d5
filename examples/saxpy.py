import numpy as np
from concordia import kernel, Runtime, f32, i32, Ptr, global_id

@kernel
def saxpy(a: f32, x: Ptr[f32], y: Ptr[f32], out: Ptr[f32], n: i32):
    i = global_id(0)
    if i < n:
        out[i] = a * x[i] + y[i]

if __name__ == "__main__":
    rt = Runtime("reference")          # later: "opencl", "cuda", "hip", "tenstorrent"
    x = rt.to_device(np.arange(1000, dtype=np.float32))
    y = rt.to_device(np.ones(1000, dtype=np.float32))
    out = rt.empty(1000, np.float32)
    rt.launch(saxpy, global_size=1024, local_size=64,
              args=(np.float32(2.0), x, y, out, np.int32(1000)))
    print(out.numpy()[:4])             # [1. 3. 5. 7.]
    print(saxpy.ir)                    # the kernel's IR text
