"""Protected offload through two real processes: the masked run equals the unmasked quantized model bit for bit,
every injected fault stops the run with an error naming the op, and what cannot be protected is refused."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, serving
from tsqp import weights as W
from tsqp.commands.run import fixed_prompt
from tsqp.stats import Stats
from tsqp.trusted.model import TrustedModel
from tsqp.trusted.protect.freivalds import VerificationError
from tsqp.trusted.protect.masked import ProtectedOffload, QuantizedOffload
from tsqp.wire.client import RemoteOffload

MODEL = "random:tiny"


def protected(endpoint: str, verify: bool = True, length_bucket: int = 1, deferred: bool = False) -> ProtectedOffload:
    cfg, weights = W.load(MODEL, torch.float32, "cpu")
    inner = RemoteOffload(endpoint, "shm", timeout_s=30, arena_bytes=32 * 2**20)
    offload = ProtectedOffload(inner, cfg, weights, verify=verify, pool_tokens=16, stats=Stats(),
                               length_bucket=length_bucket, deferred_checks=deferred)
    offload.expect_fingerprint(inner.info["fingerprint"])
    return offload


def prefill_and_decode(offload, cfg, norms, ids, steps=3):
    model = TrustedModel(cfg, norms, offload, "linear")
    cache = model.new_cache(ids.numel() + steps)
    logits = [model.prefill(ids, cache)]
    for _ in range(steps):
        logits.append(model.decode(int(logits[-1].argmax()), cache))
    return torch.stack(logits)


@pytest.fixture(scope="module")
def server():
    with serving(MODEL, extra=("--protect", "otp")) as (endpoint, proc):
        yield endpoint, proc


def test_masked_run_over_the_wire_equals_the_quantized_model_bit_for_bit(server):
    endpoint, _ = server
    cfg, weights = W.load(MODEL, torch.float32, "cpu")
    norms = W.norm_weights(weights)
    ids = fixed_prompt(cfg, 24)
    want = prefill_and_decode(QuantizedOffload(cfg, weights), cfg, norms, ids)
    offload = protected(endpoint)
    try:
        got = prefill_and_decode(offload, cfg, norms, ids)
        report = offload.report()
    finally:
        offload.close()
    assert torch.equal(got, want)
    assert report["checked_rows"] > 0 and report["pool"]["pads_consumed"] > 0


@pytest.mark.parametrize("deferred", [False, True], ids=["strict", "deferred"])
@pytest.mark.parametrize("kind", ["flip", "replay", "swap", "zero"])
def test_every_injected_fault_kind_stops_the_run_naming_the_op(kind, deferred):
    with serving(MODEL, extra=("--protect", "otp", "--inject-faults", kind)) as (endpoint, proc):
        assert "ALTERS results" in proc.banner
        cfg, weights = W.load(MODEL, torch.float32, "cpu")
        offload = protected(endpoint, deferred=deferred)
        try:
            with pytest.raises(VerificationError, match=r"op '(qkv|o|gate_up|down|lm_head)'"):
                prefill_and_decode(offload, cfg, W.norm_weights(weights), fixed_prompt(cfg, 24))
        finally:
            offload.close()


def test_cli_protected_generation_and_its_refusals(server, tmp_path):
    endpoint, _ = server
    base = ("run", "--endpoint", endpoint, "--model", MODEL, "--prompt-ids", "5,6,7,8", "--max-new-tokens", "4",
            "--ignore-eos", "--connect-timeout", "30")
    ok = run_cli(*base, "--protect", "otp", "--verify")
    assert ok.returncode == 0, ok.stderr
    local = run_cli("run", "--local", "--model", MODEL, "--device", "cpu", "--prompt-ids", "5,6,7,8",
                    "--max-new-tokens", "4", "--ignore-eos", "--protect", "otp", "--verify")
    assert local.returncode == 0, local.stderr
    pick = lambda out: out.split("Prompt")[1].split("\n")[1]        # the generated ids' line
    assert pick(ok.stdout) == pick(local.stdout)
    deferred = run_cli(*base, "--protect", "otp", "--verify", "--deferred-checks", "--json", str(tmp_path / "d.json"))
    assert deferred.returncode == 0, deferred.stderr
    assert pick(deferred.stdout) == pick(ok.stdout)
    protection = json.loads((tmp_path / "d.json").read_text())["protection"]
    assert protection["deferred_checks"] and protection["checked_rows"] == protection["pool"]["pads_consumed"]
    unchecked = run_cli(*base, "--protect", "otp", "--deferred-checks")
    assert unchecked.returncode == 2 and "add --verify" in unchecked.stderr
    flash = run_cli(*base, "--protect", "otp", "--policy", "flash")
    assert flash.returncode == 2 and "--protect needs --policy linear" in flash.stderr
    other = run_cli(*base[:4], "random:tiny@7", *base[5:], "--protect", "otp")       # another model's weights
    # refused at the hello: its norms differ from the runner's own (the fingerprint would be checked next)
    assert other.returncode == 2 and "differs from random:tiny@7: norm" in other.stderr, other.stderr
    plain = run_cli(*base, "--verify")
    assert plain.returncode == 2 and "needs --protect" in plain.stderr


def test_unprotected_server_is_refused():
    with serving(MODEL) as (endpoint, _):
        r = run_cli("run", "--endpoint", endpoint, "--model", MODEL, "--protect", "otp", "--tokens", "8")
        assert r.returncode == 2 and "not a protected server" in r.stderr


def protected_bytes(cfg, T: int) -> tuple[int, int]:
    """(sent, received) per prefill of T tokens, from the config and the op table: 5 limb bytes per masked
    input element, 8 bytes per int64 output element; the LM head sees the last row only; no embedding."""
    from tsqp.ops import MATMUL_OPS, matmul_widths
    sent = received = 0
    for op in MATMUL_OPS:
        width_in, width_out = matmul_widths(cfg, op)
        rows, times = (1, 1) if op == "lm_head" else (T, cfg.num_layers)
        sent += times * 5 * rows * width_in
        received += times * 8 * rows * width_out
    return sent, received


def test_protected_prefill_moves_the_bytes_the_config_implies(server):
    endpoint, _ = server
    cfg, weights = W.load(MODEL, torch.float32, "cpu")
    offload = protected(endpoint)
    try:
        model = TrustedModel(cfg, W.norm_weights(weights), offload, "linear")
        model.prefill(fixed_prompt(cfg, 40), model.new_cache(40))
        stats = offload.inner.stats
    finally:
        offload.close()
    assert (stats.shm_sent_bytes, stats.shm_received_bytes) == protected_bytes(cfg, 40)
    assert stats.rpc_calls == 4 * cfg.num_layers + 1          # no embed call: ids never leave the runner


def test_a_refused_request_gives_its_shared_memory_back_and_the_session_goes_on(server):
    """Activations that cannot be quantized (NaN) are refused before anything is sent; the limbs' region in
    the arena is freed (50 refusals leave nothing live) and the next request is answered."""
    endpoint, _ = server
    cfg, weights = W.load(MODEL, torch.float32, "cpu")
    offload = protected(endpoint)
    try:
        x = torch.randn(4, cfg.hidden_size)
        x[1, 3] = float("nan")
        for _ in range(50):
            with pytest.raises(ValueError, match="not finite"):
                offload.submit("qkv", 0, x)
        assert not offload.inner.arena.live and offload.inner.stats.rpc_calls == 0
        x[1, 3] = 0.0
        want = QuantizedOffload(cfg, weights).submit("qkv", 0, x).result()
        assert torch.equal(offload.submit("qkv", 0, x).result(), want)
    finally:
        offload.close()


def test_length_buckets_hide_the_prompt_length_and_change_no_logit(server):
    """--length-bucket 16: prompts of 17 and 29 tokens both reach the server as 32-row requests (the bytes the
    config implies for 32 tokens, but the LM head's one row); the logits equal the unpadded run's bit for bit."""
    endpoint, _ = server
    cfg, weights = W.load(MODEL, torch.float32, "cpu")
    norms = W.norm_weights(weights)
    moved = []
    for T in (17, 29):
        ids = fixed_prompt(cfg, T)
        want = prefill_and_decode(QuantizedOffload(cfg, weights), cfg, norms, ids, steps=2)
        offload = protected(endpoint, length_bucket=16)
        try:
            got = prefill_and_decode(offload, cfg, norms, ids, steps=2)
            stats = offload.inner.stats
            moved.append((stats.shm_sent_bytes, stats.shm_received_bytes))
        finally:
            offload.close()
        assert torch.equal(got, want), T
    sent, received = protected_bytes(cfg, 32)
    one_step = protected_bytes(cfg, 1)
    assert moved[0] == moved[1] == (sent + 2 * one_step[0], received + 2 * one_step[1])    # + 2 decode steps
    refused = run_cli("run", "--endpoint", endpoint, "--model", MODEL, "--tokens", "8", "--length-bucket", "4")
    assert refused.returncode == 2 and "--length-bucket pads masked requests: it needs --protect" in refused.stderr
