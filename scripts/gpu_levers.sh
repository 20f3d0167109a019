#!/usr/bin/env bash
# A second, shorter GPU-host run (after gpu_check.sh): polling the control pipes (--spin-us) and the runner's
# thread count, for prefill and decode. Results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tsqp-out}; DEV=${DEV:-cuda:0}; BIG=${BIG:-random:llama-3.2-1b}; TOK=${TOK:-1024}; DT=${DT:-bfloat16}
SPIN=${SPIN:-1000}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import zmq" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
bench() { timeout 150 python3 -m tsqp.cli bench --device $DEV --model $BIG --tokens $TOK --dtype $DT --repeat 5 --no-references "$@"; }
bench --transport local,shm --policy linear,flash --chunks 1,2 --spin-us $SPIN --json "$OUT/bench_spin.json" 2>&1 | tail -n 14
bench --transport shm --policy flash --chunks 2 --spin-us $SPIN --threads 15 --json "$OUT/bench_spin15.json" 2>&1 | tail -n 5

ep=ipc:///tmp/tsqp-gpu-levers-$$.ipc
W=$(mktemp -d)
python3 -m tsqp.cli serve --model $BIG --device $DEV --dtype $DT --endpoint $ep --spin-us $SPIN > "$W/serve.txt" 2>&1 &
srv=$!
for _ in $(seq 120); do grep -q ready "$W/serve.txt" && break; sleep 1; done
ids=$(python3 -c "print(','.join(str(i * 37 % 500 + 3) for i in range(128)))")
for v in "spin:--spin-us $SPIN" "spin_t8:--spin-us $SPIN --threads 8" "spin_t4:--spin-us $SPIN --threads 4"; do
  timeout 60 python3 -m tsqp.cli run --endpoint $ep ${v#*:} --prompt-ids $ids --max-new-tokens 64 --ignore-eos \
    --json "$OUT/decode_${v%%:*}.json" > /dev/null 2>&1
done
kill $srv; wait $srv
python3 - "$OUT" <<'PY'
import json, sys
for name in ("spin", "spin_t8", "spin_t4"):
    try:
        g = json.load(open(f"{sys.argv[1]}/decode_{name}.json"))["stats"]
    except (OSError, ValueError) as e:
        print(f"{name:8s} failed: {e}"); continue
    print(f"{name:8s}", {k: round(v, 3) for k, v in g.items() if k.startswith("decode_ms") or k.endswith("per_token")})
PY
echo done
