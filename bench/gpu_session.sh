#!/usr/bin/env bash
# One batch on a GPU machine: backends, conformance on every GPU backend, kernel benchmarks,
# the demo (every hop live), and the test suite. Usage: bench/gpu_session.sh OUTDIR   (wheels, if any, in .whl/)
set -u
out=${1:?usage: gpu_session.sh OUTDIR}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
mkdir -p /etc/OpenCL/vendors
[ -e /etc/OpenCL/vendors/nvidia.icd ] || echo libnvidia-opencl.so.1 > /etc/OpenCL/vendors/nvidia.icd
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m concordia backends --json > "$out/backends.json"; python3 -m concordia backends
python3 -m concordia demo --json "$out/demo.json" 2>&1 | tee "$out/demo.txt"
python3 -m concordia conformance --backend cuda hip-on-cuda opencl tenstorrent --json "$out/conformance_gpu.json" 2>&1 | tee "$out/conformance.txt"
[ -n "${SKIP_KERNEL_BENCH:-}" ] || python3 bench/kernels.py --json "$out/bench_kernels.json" 2>&1 | tee "$out/bench_kernels.txt"
python3 -m pytest -q -p no:cacheprovider -x tests ${PYTEST_ARGS:-} 2>&1 | tail -25 | tee "$out/pytest.txt"
