"""Bad input never hangs and always says what is wrong: no server, missing or unsupported models, token ids
outside the vocabulary, and malformed requests sent as raw frames to a real server, which keeps serving."""
from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import time

import numpy as np
import pytest
import torch
import zmq

from conftest import run_cli, run_cli_many, serving, short_endpoint
from tsqp import cli
from tsqp.wire import protocol as P
from tsqp import weights as W
from tsqp.untrusted.compute import Compute
from tsqp.trusted.model import KVCache, TrustedModel
from tsqp.local import LocalOffload
from tsqp.wire.client import RemoteOffload
from tsqp.wire.shm import Arena
from tsqp.wire.transport import ServerTimeout

REPLY_TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def server():
    with serving("random:tiny", extra=("--threads", "1")) as (endpoint, proc):
        yield endpoint, proc


@pytest.fixture(scope="module")
def tiny():
    """The server's weights, rebuilt here (the preset is deterministic): the oracle for single requests."""
    return W.load("random:tiny", torch.float32)


class Raw:
    """A bare DEALER socket speaking the protocol by hand, so requests can be as wrong as we like."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = iter(range(100, 10_000))

    def send_raw(self, *frames) -> tuple[dict, list]:
        self.sock.send_multipart(list(frames))
        if not self.sock.poll(REPLY_TIMEOUT_MS):
            raise AssertionError("the server did not answer")
        reply = self.sock.recv_multipart()
        return P.decode(reply[0]), reply[1:]

    def send(self, header: dict, *tensors) -> tuple[dict, list]:
        """header gets an id; tensors go as raw frames (bytes or tensors)."""
        header = {"id": next(self.ids), **header}
        frames = [t if isinstance(t, bytes) else P.tensor_bytes(t) for t in tensors]
        head, rest = self.send_raw(P.encode(header), *frames)
        if head["type"] in ("result", "error"):         # replies to requests carry the request's id
            assert head.get("id") == header["id"], head
        return head, rest

    def call(self, op, layer, *tensors, metas=None, output=None, code=None) -> tuple[dict, list]:
        """A binary call; `output` (a TensorMeta) defaults to a placeholder the checks reach only after the
        inputs; `code` forces an op code the table does not have."""
        rid = next(self.ids)
        metas = metas if metas is not None else [P.TensorMeta.of(t) for t in tensors]
        output = output or P.TensorMeta("float32", (1,))
        header = bytearray(P.encode_call(op if code is None else "qkv", layer, rid, metas, output))
        if code is not None:
            header[3] = code
        frames = [t if isinstance(t, bytes) else P.tensor_bytes(t) for t in tensors]
        head, rest = self.send_raw(bytes(header), *frames)
        if head["type"] in ("result", "error"):         # replies to requests carry the request's id
            assert head.get("id") == rid, head
        return head, rest

    def close(self) -> None:
        self.sock.close(linger=0)


def server_info(endpoint: str) -> dict:
    raw = Raw(endpoint)
    try:
        head, _ = raw.send({"type": "info"})
    finally:
        raw.close()
    assert head["type"] == "info"
    return head


def assert_error(head: dict, *words: str) -> None:
    assert head["type"] == "error", head
    for w in words:
        assert w in head["error"], f"{w!r} not in {head['error']!r}"


# ---- no server ---------------------------------------------------------------------------------------

def test_no_server_fails_fast_naming_the_endpoint(tmp_path):
    """Nothing at the path, and a stale socket file nobody listens on: `tsqp run` exits non-zero with the
    endpoint in its message (the subprocess timeout is only a guard against a hang)."""
    missing = f"ipc://{tmp_path}/none.ipc"
    stale_path = tmp_path / "stale.ipc"
    with socket.socket(socket.AF_UNIX) as s:         # a dead server's leftover: a socket file, no listener
        s.bind(str(stale_path))
    stale = f"ipc://{stale_path}"
    results = run_cli_many([["run", "--endpoint", ep, "--connect-timeout", 2, "--tokens", 4, "--no-warmup"]
                            for ep in (missing, stale)], timeout_s=60)
    for endpoint, r in zip((missing, stale), results):
        assert r.returncode != 0
        assert endpoint in r.stderr, r.stderr
        assert "2 s" in r.stderr, r.stderr          # it was the settable timeout that fired
        assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["missing", "stale"])
@pytest.mark.parametrize("transport", ["shm", "frames"])
def test_no_server_times_out_on_time(tmp_path, kind, transport):
    """The timing itself, measured in-process (a subprocess's start-up on a busy 2-core box would swamp it)."""
    path = tmp_path / "x.ipc"
    if kind == "stale":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    t0 = time.monotonic()
    with pytest.raises(ServerTimeout, match=re.escape(f"ipc://{path}")):
        RemoteOffload(f"ipc://{path}", transport, connect_timeout_s=1.0)
    # the connect timeout and no more (no goodbye waited for from a server that never answered)
    assert 0.9 < time.monotonic() - t0 < 1.8


def test_server_dying_mid_run_is_reported_not_waited_on():
    with serving("random:tiny", extra=("--threads", "1")) as (endpoint, proc):
        remote = RemoteOffload(endpoint, "frames", timeout_s=1.0)
        try:
            model = TrustedModel(remote.cfg, remote.norms, remote)
            model.prefill(torch.tensor([1, 2, 3]), KVCache(remote.cfg, 3))     # works while it lives
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(ServerTimeout, match=re.escape(endpoint)):
                model.prefill(torch.tensor([1, 2, 3]), KVCache(remote.cfg, 3))
            assert time.monotonic() - t0 < 5
        finally:
            remote.close()


# ---- models the runtime cannot load ------------------------------------------------------------------

def cli_error(capsys, *argv) -> str:
    rc = cli.main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert rc != 0, err
    return err


def test_missing_model_path_names_the_file(tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_cli("serve", "--model", missing, "--device", "cpu", "--endpoint", short_endpoint(), timeout_s=60)
    assert r.returncode != 0
    assert str(missing / "config.json") in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


def edited_copy(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _drop(key):
    return lambda c: c.pop(key)


UNSUPPORTED = {
    "model_type": lambda c: c.update(model_type="mistral"),
    "hidden_act": lambda c: c.update(hidden_act="gelu"),
    "attention_bias": lambda c: c.update(attention_bias=True),
    "mlp_bias": lambda c: c.update(mlp_bias=True),
    "rope_scaling": lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    "num_key_value_heads": lambda c: c.update(num_key_value_heads=3),
    "vocab_size": _drop("vocab_size"),
}


@pytest.mark.parametrize("field", list(UNSUPPORTED))
def test_unsupported_config_names_file_and_field(checkpoints, tmp_path, capsys, restore_sigterm, field):
    model = edited_copy(checkpoints["mha_plain_untied"], tmp_path / "m", UNSUPPORTED[field])
    err = cli_error(capsys, "run", "--local", "--model", model, "--device", "cpu", "--tokens", 4, "--no-warmup")
    assert f"{model}/config.json" in err and f"'{field}'" in err, err


def test_config_disagreeing_with_the_weights_names_file_and_tensor(checkpoints, tmp_path, capsys, restore_sigterm):
    model = edited_copy(checkpoints["mha_plain_untied"], tmp_path / "m", lambda c: c.update(intermediate_size=128))
    err = cli_error(capsys, "run", "--local", "--model", model, "--device", "cpu", "--tokens", 4, "--no-warmup")
    assert f"{model}/model.safetensors" in err and "tensor 'model.layers.0.mlp." in err, err
    assert "config.json implies" in err, err


def test_broken_model_directory(checkpoints, tmp_path, capsys, restore_sigterm):
    model = edited_copy(checkpoints["mha_plain_untied"], tmp_path / "m", lambda c: None)
    (tmp_path / "m" / "model.safetensors").unlink()
    err = cli_error(capsys, "run", "--local", "--model", model, "--device", "cpu", "--tokens", 4, "--no-warmup")
    assert model in err and "safetensors" in err, err
    (tmp_path / "m" / "config.json").write_text("{not json")
    err = cli_error(capsys, "run", "--local", "--model", model, "--device", "cpu", "--tokens", 4, "--no-warmup")
    assert f"{model}/config.json" in err and "JSON" in err, err


def test_unknown_preset_lists_the_presets(capsys, restore_sigterm):
    err = cli_error(capsys, "run", "--local", "--model", "random:huge", "--device", "cpu", "--tokens", 4)
    assert "random:huge" in err and "random:tiny" in err, err


# ---- token ids outside the vocabulary ----------------------------------------------------------------

def test_token_ids_outside_vocabulary_fail_before_any_tensor_is_sent(server, capsys, restore_sigterm):
    endpoint, _ = server
    before = server_info(endpoint)["requests"]
    too_big = run_cli("run", "--endpoint", endpoint, "--prompt-ids", "5,512,7", "--no-warmup")
    assert too_big.returncode != 0 and "token id 512 is outside the vocabulary 0..511" in too_big.stderr, \
        too_big.stderr
    err = cli_error(capsys, "run", "--endpoint", endpoint, "--prompt-ids=-1,3", "--no-warmup")
    assert "token id -1 is outside the vocabulary 0..511" in err, err
    assert server_info(endpoint)["requests"] == before          # no call reached the server
    # the server itself refuses them too (a runner that skipped the check), naming the op
    raw = Raw(endpoint)
    try:
        raw.send({"type": "hello"})
        head, _ = raw.call("embed", None, torch.tensor([1, 512]))
        assert_error(head, "op embed", "512", "vocabulary")
    finally:
        raw.close()
    assert server_info(endpoint)["requests"] == before


# ---- malformed requests: an error naming the op, and the server keeps serving ------------------------

def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, tiny):
    endpoint, proc = server
    cfg, w = tiny
    D = cfg.hidden_size
    x = torch.randn(3, D)
    raw = Raw(endpoint)
    try:
        head, _ = raw.call("qkv", 0, x)
        assert_error(head, "op qkv", "hello")                                      # before hello
        head, frames = raw.send({"type": "hello"})
        assert head["type"] == "welcome" and head["config"]["hidden_size"] == D

        head, _ = raw.call("qkv", 0, torch.randn(3, D + 1))
        assert_error(head, "op qkv", f"[T, {D}]")                                  # wrong shape
        head, _ = raw.call("o", 99, torch.randn(3, cfg.q_size))
        assert_error(head, "op o", "layer 99")                                     # layer out of range
        head, _ = raw.call("gate_up", None, x)
        assert_error(head, "op gate_up", "layer None")                             # no layer for a layer op
        head, _ = raw.call("down", 0, x.to(torch.bfloat16))
        assert_error(head, "op down", "dtype")                                     # wrong dtype
        head, _ = raw.call("lm_head", None, metas=[P.TensorMeta.of(x)])
        assert_error(head, "op lm_head", "frames")                                 # meta without its frame
        head, _ = raw.call("lm_head", None, x[:2].contiguous(), metas=[P.TensorMeta.of(x)],
                           output=P.TensorMeta("float32", (3, cfg.vocab_size)))
        assert_error(head, "op lm_head", "bytes")                                  # frame shorter than meta
        head, _ = raw.call("qkv", 0, x, metas=[P.TensorMeta("float32", (3, 2**32 - 1))])
        assert_error(head, "op qkv", f"[T, {D}]")                                  # a dimension past any size
        head, _ = raw.call("qk", 0, x)
        assert_error(head, "op qk", "2 input")                                     # wrong number of inputs
        head, _ = raw.call("softmax", 0, x, code=77)
        assert_error(head, "unknown op code 77")                                   # not an op
        head, _ = raw.send({"type": "call", "layer": 0, "inputs": "x"})
        assert_error(head, "unknown message type 'call'")                          # calls are binary

        head, _ = raw.send_raw(b"\xff not json")
        assert_error(head, "neither a binary header nor JSON")
        head, _ = raw.send_raw(b"[" * 50_000)                                      # nests past the recursion limit
        assert head["type"] == "error"
        head, _ = raw.send_raw(json.dumps({"v": 99, "type": "call", "op": "embed"}).encode())
        assert_error(head, "version")
        head, _ = raw.send({"type": "no-such-type"})
        assert_error(head, "no-such-type")
        head, _ = raw.send({"type": "attach", "arena": {"name": "../../etc/passwd", "size": 4096}})
        assert_error(head, "arena")

        # ... and still serving, correctly
        assert proc.poll() is None
        ids = torch.tensor([4, 0, 511])
        head, frames = raw.call("embed", None, ids, output=P.TensorMeta("float32", (3, D)))
        assert head["type"] == "result" and head["compute_s"] >= 0
        got = P.tensor_from_frame(head["output"], frames[0])
        assert torch.equal(got, w["model.embed_tokens.weight"][ids])
        n = W.layer_names(1)
        head, frames = raw.call("qkv", 1, x, output=P.TensorMeta("float32", (3, cfg.qkv_size)))
        got = P.tensor_from_frame(head["output"], frames[0])
        want = x @ torch.cat([w[n["q"]], w[n["k"]], w[n["v"]]]).T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        raw.close()


def test_malformed_shared_memory_requests(server, tiny):
    """The same over a shared-memory session: offsets outside the arena, output over an input."""
    endpoint, _ = server
    cfg, w = tiny
    D = cfg.hidden_size
    raw = Raw(endpoint)
    arena = Arena.create(1 << 20)
    try:
        raw.send({"type": "hello"})
        head, _ = raw.send({"type": "attach", "arena": {"name": arena.name, "size": arena.size}})
        assert head["type"] == "attached"
        x_meta = P.TensorMeta("float32", (2, D), 0)
        x = arena.view(x_meta)                                                      # [2, D] at offset 0
        x.copy_(torch.randn(2, D))
        out_meta = P.TensorMeta("float32", (2, 2 * cfg.intermediate_size), 64 * 1024)
        out = arena.view(out_meta)
        at = lambda off: P.TensorMeta(out_meta.dtype, out_meta.shape, off)

        head, _ = raw.call("gate_up", 0, metas=[P.TensorMeta("float32", (2, D), arena.size - 8)], output=out_meta)
        assert_error(head, "op gate_up", "outside")                                # input past the end
        head, _ = raw.call("gate_up", 0, metas=[x_meta], output=at(arena.size))
        assert_error(head, "op gate_up", "outside")                                # output past the end
        head, _ = raw.call("gate_up", 0, metas=[x_meta], output=at(0))
        assert_error(head, "op gate_up", "overlaps")                               # output over the input
        head, _ = raw.call("gate_up", 0, metas=[x_meta], output=at(3))
        assert_error(head, "op gate_up", "misaligned")
        head, _ = raw.call("gate_up", 0, x, metas=[x_meta], output=out_meta)
        assert_error(head, "op gate_up", "frames")                                 # frames in a shm session

        head, _ = raw.call("gate_up", 0, metas=[x_meta], output=out_meta)
        assert head["type"] == "result", head
        n = W.layer_names(0)
        torch.testing.assert_close(out, x @ torch.cat([w[n["gate"]], w[n["up"]]]).T, rtol=1e-5, atol=1e-5)
        raw.send({"type": "bye"})
    finally:
        raw.close()
        arena.close()


def test_server_still_matches_local_after_bad_requests(server, tiny):
    """A whole prefill through the server that has seen all of the above equals the in-process one."""
    endpoint, _ = server
    cfg, w = tiny
    ids = torch.arange(0, 512, 37)
    logits = {}
    for name, make in (("local", lambda: LocalOffload(Compute(cfg, w, "cpu"))),
                       ("remote", lambda: RemoteOffload(endpoint, "shm", timeout_s=30))):
        offload = make()
        try:
            norms = W.norm_weights(w)
            model = TrustedModel(cfg, norms, offload, "seed")
            logits[name] = model.prefill(ids, KVCache(cfg, ids.numel()), 2)
        finally:
            offload.close()
    np.testing.assert_allclose(logits["remote"].numpy(), logits["local"].numpy(), atol=1e-5, rtol=0)
