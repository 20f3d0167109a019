"""Issue 4: the bytes moved match what the policy has to move (computed from the config and the op table,
independently of the runtime's own accounting), and `tsqp bench` produces its table, JSON and plot."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import serving
from tsqp.config import PRESETS, ModelConfig
from tsqp.ops import matmul_widths
from tsqp.trusted.model import TrustedModel
from tsqp.wire.client import RemoteOffload
from tsqp.commands.run import fixed_prompt


def expected_tensor_bytes(cfg: ModelConfig, T: int, itemsize: int, policy: str) -> tuple[int, int]:
    """(sent, received) tensor bytes for a one-chunk prefill of T tokens, logits for the last position.
    The x @ W ops move [rows, in] out and [rows, out] back, widths from the op table (the server's real
    weights enforce them); what each policy's attention moves follows from the config."""
    D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def matmul(op: str, rows: int = T) -> tuple[int, int]:
        width_in, width_out = matmul_widths(cfg, op)
        return rows * width_in * itemsize, rows * width_out * itemsize

    sent, recv = T * 8, T * D * itemsize                              # token ids (int64) -> embeddings
    for _ in range(cfg.num_layers):
        ops = ["qkv", "gate_up", "down"]                              # normed x, normed x, silu(gate) * up
        if policy == "flash":
            sent += (T * H * hd + 2 * KV * T * hd) * itemsize         # rotated q, k, v -> attention + o
            recv += T * D * itemsize
        else:
            ops.append("o")                                           # attention output -> o
        if policy == "seed":
            sent += (H * T * hd + KV * T * hd) * itemsize             # q, k -> scores
            recv += H * T * T * itemsize
            sent += (H * T * T + KV * T * hd) * itemsize              # probabilities, v -> P V
            recv += H * T * hd * itemsize
        for op in ops:
            s, r = matmul(op)
            sent, recv = sent + s, recv + r
    s, r = matmul("lm_head", rows=1)                                  # last position -> logits
    return sent + s, recv + r


def test_llama_1b_bf16_moves_about_1_25_gb():
    sent, recv = expected_tensor_bytes(PRESETS["llama-3.2-1b"], 1024, 2, "linear")
    assert 1.2e9 < sent + recv < 1.3e9      # the prototype moved about 7 GB


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("bfloat16", 2)])
def test_bytes_moved_match_the_config(dtype, itemsize):
    T = 48
    with serving("random:tiny", dtype) as (endpoint, _):
        for policy in ("linear", "flash", "seed"):
            for transport in ("shm", "frames"):
                remote = RemoteOffload(endpoint, transport)
                try:
                    cfg = remote.cfg
                    model = TrustedModel(cfg, remote.norms, remote, policy, remote.stats)
                    model.prefill(fixed_prompt(cfg, T), model.new_cache(T), 1)
                    st = remote.stats
                finally:
                    remote.close()
                sent, recv = expected_tensor_bytes(cfg, T, itemsize, policy)
                if transport == "shm":
                    assert (st.shm_sent_bytes, st.shm_received_bytes) == (sent, recv), policy
                    assert st.sent_bytes + st.received_bytes < 400 * st.rpc_calls    # control messages only
                else:
                    headers = 600 * st.rpc_calls
                    assert sent <= st.sent_bytes < sent + headers, policy
                    assert recv <= st.received_bytes < recv + headers, policy
                    assert st.shm_sent_bytes == st.shm_received_bytes == 0


def test_bench_writes_table_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tsqp.cli", "bench", "--model", "random:tiny", "--tokens", "32", "--repeat", "2",
         "--transport", "local,shm,shm-socket,ipc,tcp", "--policy", "linear,flash", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference: cpu (server's device) alone" in proc.stdout and "reference: runner's CPU alone" in proc.stdout
    result = json.loads(out.read_text())
    for key in ("model", "device", "gpu", "cpu_count", "torch"):
        assert key in result["settings"]
    refs = result["references"]
    assert refs["device_only_s"] > 0 and refs["cpu_only_s"] > 0
    rows = result["rows"]
    assert len(rows) == 10 and "errors" not in result
    transports = ("local", "shm", "shm-socket", "ipc", "tcp")
    assert {(r["transport"], r["policy"]) for r in rows} == {(t, p) for t in transports for p in ("linear", "flash")}
    for r in rows:
        for key in ("transport", "dtype", "policy", "tokens", "median_s", "min_s", "max_s", "bytes_moved",
                    "vs_device_only", "vs_cpu_only", "vs_local"):
            assert key in r, key
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert len(r["times_s"]) == 2 and sorted(r["times_s"]) == [r["min_s"], r["max_s"]]
        base = next(b for b in rows if b["transport"] == "local" and b["policy"] == r["policy"])
        paired = (r["times_s"][0] / base["times_s"][0] + r["times_s"][1] / base["times_s"][1]) / 2
        assert r["vs_local_paired"] == pytest.approx(paired)
        sent, recv = expected_tensor_bytes(PRESETS["tiny"], 32, 4, r["policy"])
        if r["transport"].startswith("shm"):
            assert r["bytes_moved"] - (sent + recv) < 400 * r["stats"]["rpc_calls"]
        elif r["transport"] != "local":
            assert sent + recv <= r["bytes_moved"] < sent + recv + 1200 * r["stats"]["rpc_calls"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "x local, paired by round" in proc.stdout and "shm float32 flash" in proc.stdout.split("paired by round")[1]


def test_bench_protected_rows_report_the_pool_and_move_the_config_count(tmp_path):
    """`--transport shm-otp-verify(-deferred)`: a --protect otp server of its own, pads already pooled, the
    pool's figures in the row, the masked bytes of a prefill equal to what the config implies (5 limb bytes in,
    8 bytes out), and with --decode each row's decode per token and its ratio to the plain shm row's."""
    from test_protect_wire import protected_bytes
    out = tmp_path / "b.json"
    repeat, steps = 2, 3
    proc = subprocess.run([sys.executable, "-m", "tsqp.cli", "bench", "--model", "random:tiny", "--device", "cpu",
                           "--tokens", "24", "--transport", "shm,shm-otp-verify,shm-otp-verify-deferred",
                           "--dtype", "float32", "--repeat", str(repeat), "--decode", str(steps),
                           "--no-references", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["transport"]: r for r in json.loads(out.read_text())["rows"]}
    sent, received = protected_bytes(PRESETS["tiny"], 24)
    layers = PRESETS["tiny"].num_layers
    for transport in ("shm-otp-verify", "shm-otp-verify-deferred"):
        row = rows[transport]
        pool, protection = row["protection"]["pool"], row["protection"]
        assert protection["verify"] and protection["deferred_checks"] == transport.endswith("deferred")
        # a warm-up prefill and the timed rounds' (24 rows per layer op, one LM-head row), each timed one followed
        # by `steps` decode steps (a row per op)
        assert protection["checked_rows"] == pool["pads_consumed"] == \
            (1 + repeat) * (4 * layers * 24 + 1) + repeat * steps * (4 * layers + 1)
        assert pool["fill_tokens_per_s"] > 0 and pool["on_demand"] == 0      # every pad was ready
        assert (row["stats"]["shm_sent_bytes"], row["stats"]["shm_received_bytes"]) == (sent, received)
        assert row["decode_ms"] > 0 and len(row["decode_ms_rounds"]) == repeat
        paired = sorted(t / b for t, b in zip(row["decode_ms_rounds"], rows["shm"]["decode_ms_rounds"]))
        assert row["decode_vs_shm_paired"] == pytest.approx(sum(paired) / 2)
    assert rows["shm"]["decode_vs_shm_paired"] == 1.0
    assert "decode, median ms per token over 3 steps" in proc.stdout


def test_bench_pad_rate_and_sustained_rows_are_consistent(tmp_path):
    """--pad-rate and --sustained (issue 28, items 4 and 5): the printed share is the printed fill rate over
    the printed ideal, the ideal is the peak over a token's multiply-adds counted from the config, a cold
    prefill makes every pad it uses as it runs (as many rows as a prefill takes) and is slower than the
    warm one, and the whole model on the runner's CPU stands beside the protected rows."""
    import re
    out, T, count = tmp_path / "s.json", 32, 3
    proc = subprocess.run([sys.executable, "-m", "tsqp.cli", "bench", "--model", "random:small", "--device", "cpu",
                           "--tokens", str(T), "--transport", "shm-otp-verify", "--dtype", "float32", "--repeat", "3",
                           "--no-references", "--pad-rate", "64", "--sustained", str(count), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    cfg = PRESETS["small"]          # small, not tiny: a cold prefill's pads must cost more than the machine's noise
    D, I = cfg.hidden_size, cfg.intermediate_size
    macs = 10 * (cfg.num_layers * (cfg.qkv_size * D + D * cfg.q_size + 2 * I * D + D * I) + cfg.vocab_size * D)
    p = result["pad_rate"]
    assert p["token_macs"] == macs and p["fill_tokens"] == pytest.approx(64)
    assert p["ideal_tokens_per_s"] == pytest.approx(p["int8_peak_macs_per_s"] / macs)
    assert p["share_of_ideal"] == pytest.approx(p["fill_tokens_per_s"] / p["ideal_tokens_per_s"])
    assert p["ideal_tokens_per_cpu_s"] == pytest.approx(p["int8_peak_macs_per_cpu_s"] / macs)
    assert p["share_of_ideal_cpu"] == pytest.approx(p["fill_tokens_per_cpu_s"] / p["ideal_tokens_per_cpu_s"])
    assert p["fill_tokens_per_cpu_s"] == pytest.approx(p["fill_tokens"] / p["fill_cpu_s"])
    printed = proc.stdout.replace("\n", " ")
    line = re.search(r"ideal ([\d.]+) tokens/s; .*: ([\d.]+) tokens/s, (\d+)% of ideal; per CPU second: .* "
                     r"ideal ([\d.]+), fill ([\d.]+) tokens/s, (\d+)% of ideal", printed)
    assert line, proc.stdout
    for ideal, fill, share in (line.group(1, 2, 3), line.group(4, 5, 6)):
        assert abs(100 * float(fill) / float(ideal) - int(share)) <= 1
    rows = result["sustained"]
    whole_row = "whole model on the runner's CPU (all in the enclave)"
    assert [r["row"].split(",")[0] for r in rows] == ["shm-otp-verify"] * 3 + [whole_row]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(T / r["s_per_prefill"]) and r["runner_cpu_s"] > 0
        assert r["tokens_per_s_runner_bound"] == pytest.approx(T * r["threads"] / r["runner_cpu_s"])
    warm, cold, run, whole = rows
    assert warm["on_demand_rows"] == 0 and len(warm["times_s"]) == 3
    assert cold["on_demand_rows"] == 4 * cfg.num_layers * T + 1                # every pad made as it ran
    # the runner's CPU seconds, not wall: here the server computes on the same shared cores
    assert cold["runner_cpu_s"] > 1.5 * warm["runner_cpu_s"], (cold, warm)
    assert f"{count} prefills back to back" in run["row"] and run["prefills"] == count
    assert whole["s_per_prefill"] > 0 and "sustained: 32-token prefills" in proc.stdout
