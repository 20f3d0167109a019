"""The control pipes beside the arena (doorbell.py, the default for shm): same logits as the ZeroMQ socket
path, bad control messages answered with errors, a dead server reported within the timeout, the socket still
served meanwhile."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from conftest import run_here, serving
from tsqp.wire import protocol as P
from tsqp.trusted.model import TrustedModel
from tsqp.wire.client import RemoteOffload
from tsqp.commands.run import fixed_prompt
from tsqp.wire.transport import ServerTimeout

def prefill(remote, policy="linear", chunks=1, T=40):
    model = TrustedModel(remote.cfg, remote.norms, remote, policy, remote.stats)
    return model.prefill(fixed_prompt(remote.cfg, T), model.new_cache(T), chunks)


def ask(remote: RemoteOffload, payload: bytes) -> dict:
    """One raw message down the request pipe; its reply, decoded."""
    remote.bell.send(payload, 5.0)
    assert remote.bell.wait(5.0)
    (reply,) = remote.bell.receive()
    return P.decode(reply)


@pytest.fixture(scope="module")
def server():
    with serving("random:tiny") as (endpoint, proc):
        yield endpoint, proc


@pytest.mark.parametrize("policy,chunks", [("linear", 1), ("flash", 3), ("seed", 2)])
def test_same_logits_as_the_socket_path(server, policy, chunks):
    endpoint, _ = server
    plain = RemoteOffload(endpoint, "shm", control="socket")
    bell = RemoteOffload(endpoint, "shm", control="pipes")
    try:
        want = prefill(plain, policy, chunks)
        got = prefill(bell, policy, chunks)
        socket_bytes_before = bell.stats.sent_bytes
        assert torch.equal(got, want)
        assert bell.stats.rpc_calls == plain.stats.rpc_calls
        assert bell.stats.shm_sent_bytes == plain.stats.shm_sent_bytes
        # both sessions live side by side: the socket one still answers while the bell one is active
        assert torch.equal(prefill(plain, policy, chunks), want)
        assert socket_bytes_before > 0
        assert not bell.arena.live                # every region was given back
        layouts = len(bell.layouts)
        prefill(bell, policy, chunks)
        assert len(bell.layouts) == layouts       # the same regions again: each call's header was reused
    finally:
        plain.close()
        bell.close()


def test_bad_control_messages_get_errors(server):
    endpoint, _ = server
    bell = RemoteOffload(endpoint, "shm", control="pipes")

    try:
        assert ask(bell, b"not json")["type"] == "error"
        err = ask(bell, P.encode({"type": "hello", "id": 2}))                    # only calls travel here
        assert err["type"] == "error" and err["id"] == 2 and "calls only" in err["error"], err
        bad = {"type": "call", "id": 3, "op": "qkv", "layer": 0, "output": {"offset": 0},
               "inputs": [{"dtype": "float32", "shape": [4, bell.cfg.hidden_size], "offset": bell.arena.size}]}
        err = ask(bell, P.encode(bad))                                           # an input beyond the arena
        assert err["type"] == "error" and err["id"] == 3 and "outside" in err["error"], err
        ref = RemoteOffload(endpoint, "shm", control="socket")
        try:
            assert torch.equal(prefill(bell), prefill(ref))                 # and the session still works
        finally:
            ref.close()
        os.write(bell.bell.out_fd, b"\xff\xff\xff\x7f")                 # a length no message has: framing lost
        assert bell.bell.wait(5.0)
        (reply,) = bell.bell.receive()
        err = P.decode(reply)
        assert err["type"] == "error" and "corrupt" in err["error"] and "session dropped" in err["error"], err
    finally:
        bell.close()


def test_dead_server_is_reported_within_the_timeout():
    with serving("random:tiny") as (endpoint, proc):
        bell = RemoteOffload(endpoint, "shm", control="pipes", timeout_s=2.0)
        try:
            prefill(bell)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(ServerTimeout, match=r"op embed|op qkv"):
                prefill(bell)
            assert time.monotonic() - t0 < 5
        finally:
            bell.close()


def test_polling_on_both_sides_gives_the_same_logits():
    """--spin-us: the server polls the pipes after each call and the runner polls for its reply."""
    with serving("random:tiny", extra=("--spin-us", "300")) as (endpoint, _):
        plain = RemoteOffload(endpoint, "shm", control="socket")
        polled = RemoteOffload(endpoint, "shm", spin_s=300e-6)
        try:
            want = prefill(plain, "flash", 2)
            assert torch.equal(prefill(polled, "flash", 2), want)
            assert torch.equal(prefill(plain, "flash", 2), want)     # the socket is served while the server polls
        finally:
            plain.close()
            polled.close()
        for flags in (["--spin-us", "200"], ["--control", "socket"]):
            assert run_here("--endpoint", endpoint, "--tokens", "8", "--no-warmup", *flags) == 0


def test_repeated_call_bytes_are_served_and_anything_else_is_checked(server):
    """The server answers a call whose bytes (but for the id) match an earlier checked one without decoding
    it again: it must still compute on the current data, echo the new id, and leave odd ids to the checks."""
    endpoint, _ = server
    bell = RemoteOffload(endpoint, "shm", control="pipes")
    ref = RemoteOffload(endpoint, "shm", control="socket")

    try:
        D = bell.cfg.hidden_size
        x = bell.arena.empty((3, D), bell.dtype)
        y = bell.arena.empty((3, bell.cfg.qkv_size), bell.dtype)
        head = P.encode({"type": "call", "op": "qkv", "layer": 1, "output": {"offset": bell.arena.offset_of(y)},
                         "inputs": [P.TensorMeta.of(x, bell.arena.offset_of(x)).to_json()], "id": 10})
        prefix = head[:head.rindex(b',"id":')]
        results = []
        for rid in (10, 11):
            x.copy_(torch.randn(3, D))
            reply = ask(bell, prefix + b',"id":%d}' % rid)
            assert reply["type"] == "result" and reply["id"] == rid, reply
            results.append(y.clone())
            want = ref.submit("qkv", 1, x.clone())
            assert torch.equal(results[-1], want.result())        # computed on the data now in the region
            want.release()
        assert not torch.equal(results[0], results[1])
        reply = ask(bell, prefix + b',"id":"x"}')                     # not a repeat: decoded, then served
        assert reply["type"] == "result" and reply["id"] == "x", reply   # from the checked views
        err = ask(bell, prefix + b',"id":011}')                             # not a repeat, and not JSON either
        assert err["type"] == "error" and "not JSON" in err["error"], err
        bad = prefix.replace(b'"layer":1', b'"layer":99') + b',"id":12}'
        err = ask(bell, bad)                                                # other bytes: checked again
        assert err["type"] == "error" and err["id"] == 12 and "layer 99" in err["error"], err
    finally:
        bell.close()
        ref.close()


def test_result_fast_parse_agrees_with_json_and_leaves_the_rest_to_it():
    """The runner reads a result's id and compute_s without a JSON parse; anything unusual returns None
    and goes through protocol.decode instead."""
    good = P.encode({"type": "result", "id": 42, "compute_s": 0.00125, "output": {"dtype": "bfloat16"}})
    assert P.parse_result(good) == {"type": "result", "id": 42, "compute_s": 0.00125}
    assert {k: P.decode(good)[k] for k in ("type", "id", "compute_s")} == P.parse_result(good)
    for other in (P.encode({"type": "error", "id": 3, "error": "op qkv: ..."}),
                  P.encode({"type": "result", "id": None, "compute_s": 0.1}),
                  P.encode({"type": "result", "id": -1, "compute_s": 0.1}),
                  P.encode({"type": "result", "id": 7, "output": {}}),              # no compute_s
                  P.encode({"type": "result", "id": 7, "compute_s": "soon", "x": 1}),
                  b'{"v":1,"type":"result","id":7,"compute_s":0.1',                   # cut short
                  b"garbage"):
        assert P.parse_result(other) is None, other
