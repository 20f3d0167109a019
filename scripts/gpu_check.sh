#!/usr/bin/env bash
# One prepared run on a lent GPU host (the device tool): install the carried pyzmq wheel, then, most
# important first: the protected prefill and decode (issue 13's targets), `tsqp bench` on the Llama-3.2-1B
# shape (eager, compiled, all levers), decode latency, CUDA-vs-CPU logits.
# Everything lands in $OUT. DEV=cpu runs the same steps on a machine without a GPU (a dry run).
set -uo pipefail
OUT=${OUT:-/tmp/tsqp-out}          # what comes back: at most 8 files (8 here)
W=$(mktemp -d)                      # everything else
DEV=${DEV:-cuda:0}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import zmq" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
# the compiled per-row passes (tsqp/_fastpath.c), built here as `pip install -e .` builds them; where the build
# fails the torch reference runs, and host.txt says which
python3 setup.py build_ext --inplace > "$W/build_ext.txt" 2>&1 || tail -5 "$W/build_ext.txt"
tsqp() { python3 -m tsqp.cli "$@"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo "cores: $(nproc); amx: $(grep -o -m1 amx_bf16 /proc/cpuinfo || echo none)"
  python3 -c "import torch, zmq; print('torch', torch.__version__, 'zmq', zmq.zmq_version(), torch.cuda.is_available() and torch.cuda.get_device_name())"
  python3 -c "from tsqp.trusted.protect import fast; print('protected passes:', fast.KERNEL)"
} 2>&1 | tee "$W/host.txt"
BIG=${BIG:-random:llama-3.2-1b}; TOK=${TOK:-1024}; DT=${DT:-bfloat16}
TRANSPORTS=${TRANSPORTS:-local,shm}; POLICIES=${POLICIES:-linear,flash}; CHUNKS=${CHUNKS:-1,2}
SPIN=${SPIN:-1000}       # --spin-us of the polling bench (step 3) and of the decode server
LEVER_THREADS=${LEVER_THREADS:-12}   # runner threads in step 3: leave the server's poller a core
DIAG=${DIAG:-0}          # 1: step 5, `tsqp diagnose`
bench() { timeout 200 python3 -m tsqp.cli bench --device $DEV --model $BIG --tokens $TOK --dtype $DT "$@"; }
summary() {   # one line per row: the median and where its time went, per trusted step
  python3 - "$@" <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        d = json.load(open(path))
    except (OSError, ValueError) as e:
        print(path, "missing:", e); continue
    s = d["settings"]
    print(f"== {path.rsplit('/', 1)[-1]}: compile={s.get('compile')} threads={s.get('threads')} spin_us={s.get('spin_us')}"
          f" refs={d.get('references')}")
    for r in d["rows"]:
        t = r["stats"]["trusted_s"]
        steps = " ".join(f"{k}={v * 1e3:.0f}" for k, v in t.items() if v)
        print(f"{r['transport']:5s} {r['policy']:6s} x{r['chunks']} median {r['median_s'] * 1e3:6.1f} ms "
              f"(min {r['min_s'] * 1e3:.1f}) trusted {r['trusted_s'] * 1e3:.0f} [{steps}] "
              f"server {r['server_s'] * 1e3:.0f} transport {r['transport_s'] * 1e3:.0f} "
              f"x local {r.get('vs_local', 0):.2f} (paired {r.get('vs_local_paired', 0):.2f})")
PY
}

# 0. issue 13's targets first: the protected prefill (--protect otp, then with --verify; pads pooled before each
#    timed prefill) beside shm and the whole model on this host's cores (the cpu-only reference), and 32 decode
#    steps after each, protected (strict and deferred checks) beside unprotected; tsqp run's decode in step 4;
#    then the pool's fill against the int8 peak and the sustained rows (pool cold, back to back, the whole model
#    on this host's cores: issue 28, items 4 and 5)
timeout ${PROTECT_S:-360} python3 -m tsqp.cli bench --device $DEV --model $BIG --tokens $TOK --decode 32 \
  --transport shm,shm-otp,shm-otp-verify,shm-otp-verify-deferred --policy linear --repeat 3 \
  --pad-rate $TOK --sustained 3 \
  --json "$OUT/bench_protect.json" 2>&1 | tee "$W/bench_protect.txt"
# 0b. the runner's own share on this host's cores: per decode token (strict and deferred checks, replies at once
#     and after 100 us) and per prefill of $TOK tokens, the compiled passes beside the torch reference
timeout ${SHARE_S:-200} python3 scripts/protect_decode_cost.py --model $BIG --checks strict,deferred \
  --server-us 0,100 --kernels torch,c --repeat 3 --tokens 16 2>&1 | tee "$W/share.txt"
timeout ${SHARE_S:-200} python3 scripts/protect_host_cost.py --model $BIG --tokens $TOK --repeat 3 --kernels torch,c \
  2>&1 | tee -a "$W/share.txt"
# 1. the benchmark: 1024 tokens of the Llama-3.2-1B shape, bf16, with the no-split references (eager torch)
bench --transport $TRANSPORTS --policy $POLICIES --chunks $CHUNKS --json "$OUT/bench.json" --plot "$OUT/bench.png" \
  2>&1 | tee "$W/bench.txt"
# 2. the same with the trusted steps fused by torch.compile
bench --transport $TRANSPORTS --policy $POLICIES --chunks $CHUNKS --no-references --compile \
  --json "$OUT/bench_compile.json" 2>&1 | tee "$W/bench_compile.txt"
# 3. levers together: compiled steps, both sides polling the pipes, the runner leaving the server a core
bench --transport $TRANSPORTS --policy $POLICIES --chunks 2 --no-references --compile --spin-us $SPIN \
  --threads $LEVER_THREADS --json "$OUT/bench_levers.json" 2>&1 | tee "$W/bench_levers.txt"
summary "$OUT/bench.json" "$OUT/bench_compile.json" "$OUT/bench_levers.json" 2>&1 | tee "$W/summary.txt"

# 4. decode: 128-token prompt, 64 new tokens, the server polling its pipes; in-process
ep=ipc://$W/gpu.ipc              # mktemp -d: a 0700 directory of ours (the server refuses others)
python3 -m tsqp.cli serve --model $BIG --device $DEV --dtype $DT --endpoint $ep --spin-us $SPIN > "$W/serve_big.txt" 2>&1 &
srv=$!
for _ in $(seq 120); do grep -q ready "$W/serve_big.txt" && break; sleep 1; done
ids=$(python3 -c "print(','.join(str(i * 37 % 500 + 3) for i in range(128)))")
for v in "pipes:"; do
  timeout 90 python3 -m tsqp.cli run --endpoint $ep ${v#*:} --prompt-ids $ids --max-new-tokens 64 --ignore-eos \
    --json "$W/decode_${v%%:*}.json" > "$W/decode_${v%%:*}.txt" 2>&1
done
kill $srv; wait $srv
python3 -m tsqp.cli serve --protect otp --model $BIG --device $DEV --endpoint $ep > "$W/serve_otp.txt" 2>&1 &
srv=$!
for _ in $(seq 180); do grep -q ready "$W/serve_otp.txt" && break; sleep 1; done
timeout 240 python3 -m tsqp.cli run --endpoint $ep --protect otp --verify --model $BIG --pad-pool 256 \
  --prompt-ids $ids --max-new-tokens 64 --ignore-eos --json "$W/decode_otp.json" > "$W/decode_otp.txt" 2>&1
# the checks run while the runner waits for the next reply (deferred.py)
timeout 240 python3 -m tsqp.cli run --endpoint $ep --protect otp --verify --deferred-checks --model $BIG \
  --pad-pool 256 --prompt-ids $ids --max-new-tokens 64 --ignore-eos --json "$W/decode_otpd.json" \
  > "$W/decode_otpd.txt" 2>&1
kill $srv; wait $srv
timeout 90 python3 -m tsqp.cli run --local --device $DEV --dtype $DT --model $BIG --prompt-ids $ids \
  --max-new-tokens 64 --ignore-eos --json "$W/decode_local.json" > "$W/decode_local.txt" 2>&1
python3 - "$W" local pipes otp otpd <<'PY' 2>&1 | tee "$OUT/decode.txt"
import json, sys
for name in sys.argv[2:]:
    try:
        d = json.load(open(f"{sys.argv[1]}/decode_{name}.json"))
    except (OSError, ValueError) as e:
        print(f"{name:8s} failed: {e}"); continue
    g = d["stats"]
    print(f"{name:8s}", {k: round(v, 3) for k, v in g.items() if k.startswith("decode_ms") or k.endswith("per_token")})
PY

# 3. the CUDA server path gives the CPU's logits (random weights are drawn on the CPU, so they are equal)
tsqp run --local --device cpu --model random:small --tokens 200 --dump-logits "$W/cpu.npy" --no-warmup > /dev/null
python3 -m tsqp.cli serve --model random:small --device $DEV --endpoint $ep > "$W/serve_small.txt" 2>&1 &
srv=$!
for _ in $(seq 60); do grep -q ready "$W/serve_small.txt" && break; sleep 1; done
for pol in linear flash seed; do
  tsqp run --endpoint $ep --tokens 200 --policy $pol --chunks 3 --dump-logits "$W/gpu_$pol.npy" > /dev/null
done
kill $srv; wait $srv
tsqp run --local --device $DEV --model random:small --tokens 200 --chunks 3 --dump-logits "$W/gpu_local.npy" > /dev/null
python3 - "$W" <<'PY' 2>&1 | tee "$OUT/check.txt"
import sys, numpy as np
out = sys.argv[1]
ref = np.load(f"{out}/cpu.npy")
for name in ("linear", "flash", "seed", "local"):
    x = np.load(f"{out}/gpu_{name}.npy")
    err = float(np.abs(x - ref).max() / np.abs(ref).max())
    print(f"{name:6s} vs cpu float32: rel max err {err:.2e}, argmax {x.argmax()} vs {ref.argmax()}")
PY
# 5. the transports' round trips on this host (shm vs ipc frames), when asked
if [ "$DIAG" = 1 ]; then
  timeout 60 python3 -m tsqp.cli diagnose --sizes 1M 16M 64M --repeat 20 > "$W/diagnose.txt" 2>&1
  cat "$W/diagnose.txt" >> "$OUT/check.txt"
fi
cat "$W/host.txt" >> "$OUT/check.txt"
cat "$W/bench_protect.txt" "$W/share.txt" "$W/bench.txt" "$W/bench_compile.txt" "$W/bench_levers.txt" "$W/summary.txt" \
  > "$OUT/tables.txt" 2>/dev/null
echo "done"
