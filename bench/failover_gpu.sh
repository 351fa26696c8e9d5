#!/usr/bin/env bash
# Failover on a machine of several GPUs (nvidia-h100-x4): a single-GPU worker of the Qwen3-0.6B
# workload killed and taken over by a warm standby on another GPU; a cross-vendor takeover
# (cuda worker, reference standby on the CPU); a TP=2 job losing a rank. Ray travels as a
# slimmed copy (.whl/ray-slim.tar.xz) with its wheels. Usage: bench/failover_gpu.sh OUTDIR
set -u
out=${1:?usage: failover_gpu.sh OUTDIR}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
[ -e /tmp/site/ray/_raylet.so ] || tar -xJf .whl/ray-slim.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"
fo() { name=$1; shift; echo "== $name: concordia failover $*"; \
  timeout "${FO_TIMEOUT:-240}" python3 -m concordia failover "$@" --json "$out/$name.json" 2>&1 \
  | grep -v "(raylet)" | tee "$out/$name.txt"; }
fo single --workers 1 --standby 1 --kill 1 --config qwen3-0.6b --batch 2 --prompt 16 --tokens 160
fo cross --workers 1 --standby 1 --kill 1 --backend cuda --standby-backend reference --tokens 48
fo tp2 --tp 2 --standby 1 --kill 1 --config qwen3-0.6b --batch 2 --prompt 16 --tokens 64
