#!/usr/bin/env bash
# One prepared run on a lent GPU host (the device tool): install the carried pyzmq wheel, check the CUDA
# paths against the CPU, then `tsqp bench` on the Llama-3.2-1B shape. Everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tsqp-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cores: $(nproc); amx: $(grep -o -m1 amx_bf16 /proc/cpuinfo || echo none)"
  python3 -c "import torch, zmq; print('torch', torch.__version__, 'zmq', zmq.zmq_version(), torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/host.txt"

tsqp() { python3 -m tsqp.cli "$@"; }

# 1. the CUDA server path gives the CPU's logits (random weights are drawn on the CPU, so they are equal)
tsqp run --local --device cpu --model random:small --tokens 200 --dump-logits "$OUT/cpu.npy" --no-warmup > /dev/null
ep=ipc:///tmp/tsqp-gpu-check.ipc
tsqp serve --model random:small --device cuda:0 --endpoint $ep > "$OUT/serve_small.txt" 2>&1 &
srv=$!
for _ in $(seq 60); do grep -q ready "$OUT/serve_small.txt" && break; sleep 1; done
for pol in linear flash seed; do
  tsqp run --endpoint $ep --tokens 200 --policy $pol --chunks 3 --dump-logits "$OUT/gpu_$pol.npy" > /dev/null
done
tsqp run --local --device cuda:0 --model random:small --tokens 200 --chunks 3 --dump-logits "$OUT/gpu_local.npy" > /dev/null
kill $srv; wait $srv
python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/check.txt"
import sys, numpy as np
out = sys.argv[1]
ref = np.load(f"{out}/cpu.npy")
for name in ("linear", "flash", "seed", "local"):
    x = np.load(f"{out}/gpu_{name}.npy")
    err = float(np.abs(x - ref).max() / np.abs(ref).max())
    print(f"cuda {name:6s} vs cpu float32: rel max err {err:.2e}, argmax {x.argmax()} vs {ref.argmax()}")
PY

# 2. the benchmark: 1024 tokens of the Llama-3.2-1B shape, bf16
timeout 330 python3 -m tsqp.cli bench --transport local,shm,ipc,tcp --policy linear,flash --chunks 1,4 \
  --repeat 5 --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.txt"
# 3. levers: spinning OpenMP workers, bf16 vs fp32 trusted attention, the prototype's policy
OMP_WAIT_POLICY=ACTIVE timeout 150 python3 -m tsqp.cli bench --transport local,shm --policy linear,flash \
  --chunks 1,4 --attn-dtype float32,bfloat16 --repeat 5 --no-references --json "$OUT/bench_levers.json" 2>&1 | tee "$OUT/bench_levers.txt"
timeout 100 python3 -m tsqp.cli bench --transport shm --policy seed --repeat 3 --no-references \
  --json "$OUT/bench_seed.json" 2>&1 | tee "$OUT/bench_seed.txt"
